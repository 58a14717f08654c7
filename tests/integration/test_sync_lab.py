"""Connection-state sync on a real kernel: 200 long-lived TCP connections through a strict
stateful firewall on both routers survive a cut of the master, a planned handoff and a
kill -9 of the master's vipd; without sync the same connections stall (so the test can
fail). Polls observable state with deadlines."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from lab import Lab, wait_for
from scenario import (
    Speaker,
    flow_client,
    flow_result,
    flow_server,
    holder,
    start_vipd,
    stateful_firewall,
    states,
    sync_section,
    sync_status,
    vipctl,
    vipd_config,
)

INTERVAL_MS = 100
FLOWS = 200
SERVER = "198.51.100.100"


def start(lab: Lab, sync: bool) -> tuple[Speaker, Speaker]:
    for r in ("r1", "r2"):
        stateful_firewall(lab, r)
    speakers = {}
    for r, prio in (("r1", 200), ("r2", 100)):
        cfg = vipd_config(lab, r, prio, INTERVAL_MS, mode="single-active")
        if sync:
            cfg["sync"] = sync_section(lab, r)
        speakers[r] = start_vipd(lab, r, cfg)
        if r == "r1":
            wait_for(lambda: holder(lab, "lanA") == ["r1"], 10, what="r1 master")
    r1, r2 = speakers["r1"], speakers["r2"]
    wait_for(lambda: set(states(lab, r2)) == {"BACKUP"}, 10, what="r2 backup")
    if sync:
        wait_for(lambda: sync_status(lab, r1)["ready"] and sync_status(lab, r2)["ready"], 10,
                 what="bulk sync done on both")
    return r1, r2


def flows(lab: Lab, udp: bool = False) -> subprocess.Popen[bytes]:
    flow_server(lab)
    return flow_client(lab, "client", SERVER, FLOWS, 60, udp)


def cut_master(lab: Lab, client: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Cut r1 off (all its ports), wait for r2 to hold both VIPs, let the flows run 4 s
    more, and return what the client saw."""
    lab.cut("r1")
    wait_for(lambda: holder(lab, "lanA") == ["r2"] and holder(lab, "lanB") == ["r2"], 5,
             what="r2 holds both VIPs")
    time.sleep(4)
    return flow_result(lab, client, 20)


def synced_to_r2(lab: Lab, r2: Speaker, n: int) -> None:
    wait_for(lambda: sync_status(lab, r2)["external_flows"] >= n, 10,
             what=f"r2 holds {n} flows of r1")


def test_tcp_flows_survive_a_cut_of_the_master(lab: Lab) -> None:
    r1, r2 = start(lab, sync=True)
    client = flows(lab)
    synced_to_r2(lab, r2, FLOWS)
    time.sleep(1)
    res = cut_master(lab, client)
    st = sync_status(lab, r2)
    print("sync cut:", res, "commit", st["last_commit"])
    assert res["broken"] == 0 and res["stalled"] == 0, res
    assert st["last_commit"]["created"] >= FLOWS
    # the commit ran before the VIPs went up (the order is checked in the unit tests;
    # here: the flows were usable as soon as the VIPs moved)
    assert res["stall_ms_min_median_max"][2] < 3000


def test_udp_flows_survive_a_cut(lab: Lab) -> None:
    """200 UDP flows (client asks, server answers). Without sync these recover too, once
    the client's next datagram creates the state again on r2 (the firewall lets new flows
    in from lanA); with sync the server's answers pass from the first moment. The TCP test
    above is the one that shows the difference."""
    r1, r2 = start(lab, sync=True)
    client = flows(lab, udp=True)
    synced_to_r2(lab, r2, FLOWS)
    time.sleep(1)
    res = cut_master(lab, client)
    print("udp:", res)
    assert res["stalled"] == 0, res
    assert res["stall_ms_min_median_max"][2] < 1500, res


def test_without_sync_the_same_flows_stall(lab: Lab) -> None:
    start(lab, sync=False)
    client = flows(lab)
    time.sleep(1.5)
    res = cut_master(lab, client)
    print("no sync cut:", res)
    assert res["stalled"] + res["broken"] >= FLOWS * 0.9, res


def test_tcp_flows_survive_a_planned_handoff_and_come_back(lab: Lab) -> None:
    r1, r2 = start(lab, sync=True)
    client = flows(lab)
    synced_to_r2(lab, r2, FLOWS)
    assert vipctl(lab, r1, "maintenance", "on").returncode == 0
    wait_for(lambda: holder(lab, "lanA") == ["r2"] and holder(lab, "lanB") == ["r2"], 5,
             what="handoff to r2")
    time.sleep(2)
    # and back: r1 needs r2's view of the flows (they are r1's own, still in its kernel)
    assert vipctl(lab, r1, "maintenance", "off").returncode == 0
    wait_for(lambda: holder(lab, "lanA") == ["r1"] and holder(lab, "lanB") == ["r1"], 5,
             what="r1 back")
    time.sleep(2)
    res = flow_result(lab, client, 20)
    print("handoff:", res)
    assert res["broken"] == 0 and res["stalled"] == 0, res
    # both ways without a retransmission timeout: r2 told r1 of the flows it took over,
    # so r1 replaced its stale entries (whose TCP windows would reject the packets)
    assert res["stall_ms_min_median_max"][2] < 1000, res


def test_tcp_flows_survive_kill_9_of_the_masters_vipd(lab: Lab) -> None:
    r1, r2 = start(lab, sync=True)
    client = flows(lab)
    synced_to_r2(lab, r2, FLOWS)
    r1.proc.send_signal(signal.SIGKILL)
    r1.proc.wait(5)
    # r1's kernel keeps forwarding and keeps the VIPs it held (nobody removes them); r2
    # takes over and announces, so the hosts move to r2, which has the flows
    wait_for(lambda: set(states(lab, r2)) == {"MASTER"}, 5, what="r2 takes over")
    time.sleep(4)
    res = flow_result(lab, client, 20)
    print("kill -9:", res)
    assert res["broken"] == 0 and res["stalled"] == 0, res


def test_sync_status_and_vipctl_sync_text(lab: Lab) -> None:
    n = 1
    r1, r2 = start(lab, sync=True)
    text = vipctl(lab, r1, "sync")
    assert text.returncode == 0, text.stderr
    assert "203.0.113.12" in text.stdout and "yes" in text.stdout
    st = json.loads(vipctl(lab, r1, "status", "--json").stdout)
    assert st["sync"]["ready"] and st["sync"]["peers_reachable"] == n
    lab.cut("r2")
    wait_for(lambda: any("unreachable on the sync link" in p for p in
                         json.loads(vipctl(lab, r1, "status", "--json").stdout)["problems"]),
             5, what="r1 reports r2 unreachable on the sync link")
    assert vipctl(lab, r1, "sync").returncode == 1


HOLD_SNIPPET = """
import asyncio, json, sys, time
sys.path.insert(0, {root!r})
from vipd.io.hold import NfqueueHold

async def main():
    h = NfqueueHold("sync0", max_s=5.0)
    if h.unavailable:
        print(json.dumps({{"unavailable": h.unavailable}}))
        return
    await h.start()
    print("held", flush=True)
    await asyncio.sleep(0.8)  # the commit would run here
    r = await h.release()
    print(json.dumps({{"held": r.held, "over": r.passed_over_limit,
                      "after_ms": r.released_after_s * 1000}}), flush=True)

asyncio.run(main())
"""


def test_takeover_hold_queues_packets_and_releases_them_all(lab: Lab) -> None:
    """NFQUEUE before conntrack: packets arriving while the commit runs wait and then pass;
    none is lost. (A kernel or host without NFQUEUE, iptables or netfilterqueue skips,
    saying which.)"""
    root = str(Path(__file__).resolve().parents[2])
    holder_proc = lab.popen("r1", [sys.executable, "-c", HOLD_SNIPPET.format(root=root)],
                            stdout=subprocess.PIPE)
    assert holder_proc.stdout is not None
    first = holder_proc.stdout.readline().decode()
    if first.startswith("{"):
        pytest.skip(f"takeover hold unavailable here: {json.loads(first)['unavailable']}")
    assert first.strip() == "held"
    ping = lab.run("client", ["ping", "-c", "4", "-i", "0.1", "-W", "3", "192.0.2.11"],
                   check=False)
    out = json.loads(holder_proc.communicate(timeout=20)[0].decode().strip().splitlines()[-1])
    lab.procs.pop(holder_proc.pid, None)
    print("hold:", out, ping.stdout.splitlines()[-1])
    assert out["held"] >= 3 and out["over"] == 0
    assert " 0% packet loss" in ping.stdout
    # the first echo waited for the release
    rtts = [float(x.split("time=")[1].split()[0]) for x in ping.stdout.splitlines()
            if "time=" in x]
    assert max(rtts) > 300
    # the rule is gone: nothing is held any more
    assert "NFQUEUE" not in lab.run("r1", ["iptables", "-t", "raw", "-S"]).stdout
