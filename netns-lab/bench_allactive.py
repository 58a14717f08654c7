"""All-active benchmark: how the work is shared, what losing a member costs its flows, and
what the ownership rules cost per packet, with single-active in the same run as the
baseline.

    .venv/bin/python netns-lab/bench_allactive.py [--runs 3] [--out results/all-active.json]

Topology (topologies/trio.yaml): clients - lanA - r1, r2, r3 - lanB - server, sync link.
A strict stateful firewall on every router; 100 ms adverts; 16 buckets.

1. Share: 300 long-lived flows (200 TCP from client, 100 UDP from client2); the flows each
   member handles (the owner of each flow's bucket, hashed as the members hash it) and the
   packets each member took (its rules' counter) over 10 s.
2. Loss: r1's ports are cut (all of them); for the flows r1 carried, each flow's longest
   gap between echoes (median and max), against the same cut of the single-active master
   (r1, priority 200; r2 backup; same flows, all carried by r1).
3. Cost of the rules: UDP packets per second forwarded client -> server by one sender
   process (64 flows, 5 s), all-active (three members, every frame reaching all three)
   against single-active (one master, unicast MAC), as a ratio.
All members share this machine's two cores, so total throughput gains cannot be shown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from lab import Lab, Topology, cleanup_on_signals, wait_for  # noqa: E402
from scenario import (  # noqa: E402
    TRIO,
    cluster_config,
    cluster_status,
    flow_bucket_of,
    flow_client,
    flow_result,
    flow_server,
    holder,
    start_vipd,
    stateful_firewall,
    states,
    vipd_config,
)

SERVER = "198.51.100.100"
BUCKETS = 16

BLAST = """
import socket, sys, time
n, secs = int(sys.argv[1]), float(sys.argv[2])
socks = []
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((sys.argv[3], 6000 + i))
    socks.append(s)
payload = bytes(64)
sent, end = 0, time.monotonic() + secs
while time.monotonic() < end:
    for s in socks:
        try:
            s.send(payload)
            sent += 1
        except OSError:
            pass
print(sent)
"""

SINK = """
import selectors, socket, sys, time
n, secs = int(sys.argv[1]), float(sys.argv[2])
sel = selectors.DefaultSelector()
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("0.0.0.0", 6000 + i))
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
got, first, last = 0, None, None
end = time.monotonic() + secs
while time.monotonic() < end:
    for key, _ in sel.select(timeout=0.1):
        while True:
            try:
                key.fileobj.recv(2048)
            except BlockingIOError:
                break
            now = time.monotonic()
            first = first or now
            last = now
            got += 1
print(got, (last - first) if first and last else 0)
"""


def flows(lab: Lab, host: str, n: int, udp: bool) -> subprocess.Popen[bytes]:
    return flow_client(lab, host, SERVER, n, 300, udp)


def bucket_of(lab: Lab, host: str, proto: int, port: int) -> int:
    return flow_bucket_of(lab, host, proto, port, SERVER, 5001, BUCKETS, b"lab")


def blast(lab: Lab, seconds: float = 5.0) -> float:
    """UDP packets per second received by the server from one sender (64 flows)."""
    sink = lab.popen("server", [sys.executable, "-c", SINK, "64", str(seconds + 3)],
                     stdout=subprocess.PIPE)
    time.sleep(0.5)
    lab.run("client", [sys.executable, "-c", BLAST, "64", str(seconds), SERVER], timeout=60)
    out = sink.communicate(timeout=30)[0].decode().split()
    lab.procs.pop(sink.pid, None)
    got, span = int(out[0]), float(out[1])
    return got / span if span else 0.0


def all_active_run() -> dict[str, Any]:
    res: dict[str, Any] = {"mode": "all-active"}
    with Lab(Topology.load(TRIO)) as lab:
        sp = {}
        for r in ("r1", "r2", "r3"):
            stateful_firewall(lab, r)
            sp[r] = start_vipd(lab, r, cluster_config(lab, r))
        wait_for(lambda: sum(len(cluster_status(lab, s)["owned"]) for s in sp.values())
                 == BUCKETS, 15, what="all buckets owned")
        time.sleep(1)
        res["pps"] = round(blast(lab))
        flow_server(lab)
        tcp, udp = flows(lab, "client", 200, False), flows(lab, "client2", 100, True)
        time.sleep(2)
        owner = {b: r for r, s in sp.items() for b in cluster_status(lab, s)["owned"]}
        taken0 = {r: cluster_status(lab, s)["accepted_packets"] or 0 for r, s in sp.items()}
        time.sleep(10)
        taken = {r: (cluster_status(lab, s)["accepted_packets"] or 0) - taken0[r]
                 for r, s in sp.items()}
        cut = lab.prepare_cut("r1")
        cut()
        wait_for(lambda: sum(len(cluster_status(lab, sp[r])["owned"]) for r in ("r2", "r3"))
                 == BUCKETS, 10, what="survivors own every bucket")
        time.sleep(3)
        rt, ru = flow_result(lab, tcp), flow_result(lab, udp)
        per: Counter[str] = Counter()
        r1_gaps = []
        for result, host, proto in ((rt, "client", 6), (ru, "client2", 17)):
            for port, gap in zip(result["ports"], result["stall_ms_per_flow"], strict=True):
                who = owner[bucket_of(lab, host, proto, port)]
                per[who] += 1
                if who == "r1":
                    r1_gaps.append(gap)
        total = sum(per.values())
        res["flows_share_pct"] = {r: round(100 * per[r] / total, 1) for r in sorted(per)}
        tt = sum(taken.values()) or 1
        res["packets_share_pct"] = {r: round(100 * taken[r] / tt, 1) for r in sorted(taken)}
        res["lost_member_flows"] = len(r1_gaps)
        res["lost_member_gap_ms_median_max"] = [round(statistics.median(r1_gaps), 1),
                                                round(max(r1_gaps), 1)] if r1_gaps else None
        res["broken"] = rt["broken"] + ru["broken"]
        res["udp_duplicates"] = ru["duplicates"]
    return res


def single_active_run() -> dict[str, Any]:
    res: dict[str, Any] = {"mode": "single-active"}
    with Lab(Topology.load(TRIO)) as lab:
        from scenario import sync_section

        sp = {}
        for r, prio in (("r1", 200), ("r2", 100)):
            stateful_firewall(lab, r)
            cfg = vipd_config(lab, r, prio, 100, mode="single-active")
            cfg["sync"] = sync_section(lab, r)
            cfg["sync"]["peers"] = [p for p in cfg["sync"]["peers"] if not p.endswith(".13")]
            sp[r] = start_vipd(lab, r, cfg)
            if r == "r1":
                wait_for(lambda: holder(lab, "lanA") == ["r1"], 10, what="r1 master")
        wait_for(lambda: set(states(lab, sp["r2"])) == {"BACKUP"}, 10, what="r2 backup")
        time.sleep(1)
        res["pps"] = round(blast(lab))
        flow_server(lab)
        tcp, udp = flows(lab, "client", 200, False), flows(lab, "client2", 100, True)
        time.sleep(12)
        cut = lab.prepare_cut("r1")
        cut()
        wait_for(lambda: holder(lab, "lanA") == ["r2"] and holder(lab, "lanB") == ["r2"], 10,
                 what="r2 holds both VIPs")
        time.sleep(3)
        rt, ru = flow_result(lab, tcp), flow_result(lab, udp)
        gaps = rt["stall_ms_per_flow"] + ru["stall_ms_per_flow"]
        res["lost_member_flows"] = len(gaps)
        res["lost_member_gap_ms_median_max"] = [round(statistics.median(gaps), 1),
                                                round(max(gaps), 1)]
        res["broken"] = rt["broken"] + ru["broken"]
        res["udp_duplicates"] = ru["duplicates"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description="vipd all-active benchmark")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "all-active.json"))
    args = ap.parse_args()
    cleanup_on_signals()
    results = []
    for i in range(args.runs):
        for fn in (single_active_run, all_active_run):
            r = fn()
            r["run"] = i + 1
            print(json.dumps(r), flush=True)
            results.append(r)
    aa = [r for r in results if r["mode"] == "all-active"]
    sa = [r for r in results if r["mode"] == "single-active"]
    summary = {
        "pps_all_active_over_single_active": round(
            statistics.median(r["pps"] for r in aa) / statistics.median(r["pps"] for r in sa),
            2),
        "lost_member_gap_ms_median_of_medians": {
            "all-active": statistics.median(r["lost_member_gap_ms_median_max"][0] for r in aa),
            "single-active": statistics.median(r["lost_member_gap_ms_median_max"][0]
                                               for r in sa)},
    }
    print(json.dumps(summary))
    Path(args.out).write_text(json.dumps({"results": results, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
