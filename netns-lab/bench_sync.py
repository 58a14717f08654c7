"""Connection-state sync benchmark: vipd against conntrackd 1.4.7 (FTFW over UDP on the same
sync link) in the same run, with ratios.

    .venv/bin/python netns-lab/bench_sync.py [--flows 100000] [--kinds vipd,conntrackd]
    .venv/bin/python netns-lab/bench_sync.py --summarize netns-lab/results/sync.json

Topology (topologies/pair.yaml): client - lanA - r1, r2 - lanB - server, sync link sync0.
Both routers run a strict stateful firewall (vipd.scenario.stateful_firewall). For each
kind: r1 forwards (vipd: r1 is master; conntrackd: r1 holds the gateway addresses), the
client opens N new UDP flows through r1 to the server as fast as it can, and we measure:

  flows/s     N / time from the first flow sent until r2 holds all N from r1
  lag_ms      from the last flow sent until r2 holds all N
  cpu_us      CPU time of the sync daemon per flow, on r1 (sender) and r2 (receiver)
  rss_mib     of each daemon after the run
  commit_s    putting the N flows into r2's kernel: vipd's takeover commit (r1's ports
              cut; reported by `vipctl sync`), conntrackd's `conntrackd -c` (timed)
  lost        flows r2 did not get within 60 s
  tcp         200 long-lived TCP connections, r1's ports cut (sync link too): each one's
              longest stall (its recovery), min / median / max over --tcp-runs runs; the
              conntrackd side is keepalived + conntrackd with Debian's primary-backup
              commit in notify_master
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_scale import cpu_s, rss_mib  # noqa: E402
from lab import Lab, Topology, cleanup_on_signals, socket_in, wait_for  # noqa: E402
from scenario import (  # noqa: E402
    holder,
    start_keepalived,
    start_vipd,
    stateful_firewall,
    states,
    sync_section,
    sync_status,
    vipd_config,
)

SERVER = "198.51.100.100"
# conntrackd runs at SCHED_RR 99 by default; vipd gets a real-time priority too
# (node.realtime_priority), so neither waits behind the flow generator
RT_PRIORITY = 50

CONNTRACKD = """
Sync {{
    Mode FTFW {{
        DisableExternalCache Off
    }}
    UDP {{
        IPv4_address {local}
        IPv4_Destination_Address {peer}
        Port 3781
        Interface sync0
        SndSocketBuffer 24985600
        RcvSocketBuffer 24985600
        Checksum on
    }}
}}
General {{
    Systemd off
    HashSize 65536
    HashLimit 524288
    LogFile {work}/{router}.conntrackd.log
    Syslog off
    LockFile {work}/{router}.conntrackd.lock
    UNIX {{
        Path {work}/{router}.conntrackd.sock
    }}
    NetlinkBufferSize 2097152
    NetlinkBufferSizeMaxGrowth 33554432
    Filter From Userspace {{
        Protocol Accept {{
            TCP
            UDP
        }}
        Address Ignore {{
            IPv4_address 127.0.0.1
            IPv4_address 203.0.113.0/24
        }}
    }}
}}
"""


def prepare(lab: Lab) -> None:
    for r in ("r1", "r2"):
        stateful_firewall(lab, r)
        lab.sysctl(lab.ns(r), "net.netfilter.nf_conntrack_max=524288")


def send_flows(lab: Lab, n: int) -> tuple[float, float]:
    """N new UDP flows from the client to the server (one datagram each, distinct
    ports); returns when the first and the last were sent (monotonic)."""
    socks = []
    for i in range((n + 59999) // 60000):
        s = socket_in(lab.ns("client"), socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("192.0.2.100", 20000 + i))
        socks.append(s)
    t0 = time.monotonic()
    for i in range(n):
        s = socks[i // 60000]
        while True:
            try:
                s.sendto(b"x", (SERVER, 1024 + i % 60000))
                break
            except OSError:  # the send queue is full: a moment
                time.sleep(0.0005)
    t1 = time.monotonic()
    for s in socks:
        s.close()
    return t0, t1


def vipd_sync(speaker: Any) -> dict[str, Any]:
    """`vipctl sync --json`, asked over the control socket from here: polling through a
    new vipctl process every time would be slower than what is measured."""
    from vipd.io.control_client import request

    return dict(request(str(speaker.socket), {"command": "sync"})["sync"])


def ct_count(lab: Lab, router: str) -> int:
    out = lab.run(router, ["conntrack", "-C"]).stdout.strip()
    return int(out or 0)


def run_vipd(n: int) -> dict[str, Any]:
    res: dict[str, Any] = {"kind": "vipd", "flows": n}
    with Lab(Topology.load()) as lab:
        prepare(lab)
        sp = {}
        for r, prio in (("r1", 200), ("r2", 100)):
            cfg = vipd_config(lab, r, prio, 100, mode="single-active")
            cfg["sync"] = sync_section(lab, r)
            cfg["node"]["realtime_priority"] = RT_PRIORITY
            sp[r] = start_vipd(lab, r, cfg)
            if r == "r1":
                wait_for(lambda: holder(lab, "lanA") == ["r1"], 10, what="r1 master")
        wait_for(lambda: sync_status(lab, sp["r2"])["ready"]
                 and set(states(lab, sp["r2"])) == {"BACKUP"}, 15, what="r2 ready")
        c1, c2 = cpu_s(sp["r1"].proc.pid), cpu_s(sp["r2"].proc.pid)
        t0, t1 = send_flows(lab, n)
        done = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = vipd_sync(sp["r2"])["external_flows"]
            if got >= n:
                done = time.monotonic()
                break
            time.sleep(0.01)
        res["lost"] = 0 if done else n - vipd_sync(sp["r2"])["external_flows"]
        end = done or time.monotonic()
        res["flows_per_s"] = round(n / (end - t0))
        res["lag_ms"] = round((end - t1) * 1000, 1)
        time.sleep(0.5)
        res["cpu_us_sender"] = round((cpu_s(sp["r1"].proc.pid) - c1) / n * 1e6, 1)
        res["cpu_us_receiver"] = round((cpu_s(sp["r2"].proc.pid) - c2) / n * 1e6, 1)
        res["rss_mib_sender"] = rss_mib(sp["r1"].proc.pid)
        res["rss_mib_receiver"] = rss_mib(sp["r2"].proc.pid)
        res["sender_peer_counters"] = vipd_sync(sp["r1"])["peers"][0]["counters"]
        res["receiver_peer_counters"] = vipd_sync(sp["r2"])["peers"][0]["counters"]
        lab.cut("r1")
        wait_for(lambda: (sync_status(lab, sp["r2"]).get("last_commit") or {}).get(
            "entries", 0) >= n, 30, what="r2's takeover commit")
        lc = sync_status(lab, sp["r2"])["last_commit"]
        res["commit_s"] = round(lc["duration_ms"] / 1000, 3)
        res["committed"] = lc["created"] + lc["existed"]
        res["commit_failed"] = lc["failed"]
    return res


def conntrackd(lab: Lab, router: str, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.run(router, ["conntrackd", "-C", str(lab.workdir / f"{router}.ctd.conf"),
                            *args], check=False, timeout=120)


def ctd_external(lab: Lab, router: str) -> int:
    """Entries in conntrackd's external cache (from `conntrackd -s cache`)."""
    out = conntrackd(lab, router, "-s", "cache").stdout
    m = re.search(r"cache:external\s+active objects:\s*(\d+)", out)
    return int(m.group(1)) if m else 0


def run_conntrackd(n: int) -> dict[str, Any]:
    res: dict[str, Any] = {"kind": "conntrackd", "flows": n}
    with Lab(Topology.load()) as lab:
        prepare(lab)
        for r, me, peer in (("r1", 11, 12), ("r2", 12, 11)):
            (lab.workdir / f"{r}.ctd.conf").write_text(CONNTRACKD.format(
                local=f"203.0.113.{me}", peer=f"203.0.113.{peer}", work=lab.workdir,
                router=r))
        # r1 carries the traffic: the gateway addresses, as a VRRP master would hold them
        lab.run("r1", ["ip", "addr", "add", "192.0.2.1/24", "dev", "lanA"])
        lab.run("r1", ["ip", "addr", "add", "198.51.100.1/24", "dev", "lanB"])
        procs = {r: lab.popen(r, ["conntrackd", "-C", str(lab.workdir / f"{r}.ctd.conf")],
                              log=f"{r}.conntrackd.out") for r in ("r1", "r2")}
        wait_for(lambda: all((lab.workdir / f"{r}.conntrackd.sock").exists()
                             for r in procs), 10, what="conntrackd up")
        time.sleep(1)
        c1, c2 = cpu_s(procs["r1"].pid), cpu_s(procs["r2"].pid)
        t0, t1 = send_flows(lab, n)
        done = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if ctd_external(lab, "r2") >= n:
                done = time.monotonic()
                break
            time.sleep(0.01)
        res["lost"] = 0 if done else n - ctd_external(lab, "r2")
        end = done or time.monotonic()
        res["flows_per_s"] = round(n / (end - t0))
        res["lag_ms"] = round((end - t1) * 1000, 1)
        time.sleep(0.5)
        res["cpu_us_sender"] = round((cpu_s(procs["r1"].pid) - c1) / n * 1e6, 1)
        res["cpu_us_receiver"] = round((cpu_s(procs["r2"].pid) - c2) / n * 1e6, 1)
        res["rss_mib_sender"] = rss_mib(procs["r1"].pid)
        res["rss_mib_receiver"] = rss_mib(procs["r2"].pid)
        before = ct_count(lab, "r2")
        t = time.monotonic()
        conntrackd(lab, "r2", "-c")
        res["commit_s"] = round(time.monotonic() - t, 3)
        res["committed"] = ct_count(lab, "r2") - before
        for p in procs.values():
            lab.stop_process(p)
    return res


PRIMARY = """#!/bin/sh
# keepalived's notify_master, as Debian's primary-backup.sh does it
C="-C {conf}"
conntrackd $C -c
conntrackd $C -f internal
conntrackd $C -R
conntrackd $C -B
"""


def tcp_recovery(kind: str, runs: int) -> dict[str, Any]:
    """200 long-lived TCP connections through the firewall; r1's ports (sync link too) cut:
    each connection's longest stall is its recovery. vipd (sync, commit before VIPs)
    against keepalived + conntrackd (commit in notify_master, after the VIPs moved)."""
    per_run: list[list[float]] = []
    stalled = 0
    for _ in range(runs):
        with Lab(Topology.load()) as lab:
            prepare(lab)
            if kind == "vipd":
                sp = {}
                for r, prio in (("r1", 200), ("r2", 100)):
                    cfg = vipd_config(lab, r, prio, 100, mode="single-active")
                    cfg["sync"] = sync_section(lab, r)
                    sp[r] = start_vipd(lab, r, cfg)
                    if r == "r1":
                        wait_for(lambda: holder(lab, "lanA") == ["r1"], 10, what="r1")
                r2 = sp["r2"]
                wait_for(lambda r2=r2: vipd_sync(r2)["ready"], 15, what="r2 ready")

                def synced(r2: Any = r2) -> bool:
                    return bool(vipd_sync(r2)["external_flows"] >= 200)
            else:
                for r, me, peer in (("r1", 11, 12), ("r2", 12, 11)):
                    conf = lab.workdir / f"{r}.ctd.conf"
                    conf.write_text(CONNTRACKD.format(
                        local=f"203.0.113.{me}", peer=f"203.0.113.{peer}", work=lab.workdir,
                        router=r))
                    script = lab.workdir / f"{r}.primary.sh"
                    script.write_text(PRIMARY.format(conf=conf))
                    script.chmod(0o700)
                    lab.popen(r, ["conntrackd", "-C", str(conf)], log=f"{r}.conntrackd.out")
                wait_for(lambda: all((lab.workdir / f"{r}.conntrackd.sock").exists()
                                     for r in ("r1", "r2")), 10, what="conntrackd up")
                for r, prio in (("r1", 200), ("r2", 100)):
                    start_keepalived(lab, r, prio, 100,
                                     notify_master=str(lab.workdir / f"{r}.primary.sh"))
                    if r == "r1":
                        wait_for(lambda: holder(lab, "lanA") == ["r1"], 10, what="r1")
                time.sleep(1)

                def synced() -> bool:
                    return ctd_external(lab, "r2") >= 200
            lab.popen("server", [sys.executable, str(HERE / "tcpflows.py"), "serve"],
                      log="tcp-server.log")
            time.sleep(0.3)
            client = lab.popen("client", [sys.executable, str(HERE / "tcpflows.py"), "run",
                                          SERVER, "--flows", "200", "--seconds", "60"],
                               stdout=subprocess.PIPE)
            wait_for(synced, 15, what="r2 holds the 200 flows")
            time.sleep(1)
            lab.cut("r1")
            wait_for(lambda: holder(lab, "lanA") == ["r2"] and holder(lab, "lanB") == ["r2"],
                     10, what="r2 holds both VIPs")
            time.sleep(4)
            os.kill(client.pid, signal.SIGTERM)
            out = json.loads(client.communicate(timeout=20)[0] or b"{}")
            lab.procs.pop(client.pid, None)
            per_run.append(out["stall_ms_min_median_max"])
            stalled += out["stalled"] + out["broken"]
    return {"tcp_recovery_ms": [min(r[0] for r in per_run),
                                sorted(r[1] for r in per_run)[len(per_run) // 2],
                                max(r[2] for r in per_run)],
            "tcp_recovery_runs": per_run, "tcp_stalled": stalled}


def table(results: list[dict[str, Any]]) -> str:
    cols = ["flows_per_s", "lag_ms", "cpu_us_sender", "cpu_us_receiver", "rss_mib_sender",
            "rss_mib_receiver", "commit_s", "lost"]
    lines = ["| kind | flows | " + " | ".join(cols) + " |",
             "| --- | --- | " + " | ".join("---" for _ in cols) + " |"]
    for r in results:
        lines.append(f"| {r['kind']} | {r['flows']} | "
                     + " | ".join(str(r.get(c, "-")) for c in cols) + " |")
    by = {r["kind"]: r for r in results}
    if "vipd" in by and "conntrackd" in by:
        v, c = by["vipd"], by["conntrackd"]
        ratio = {k: round(v[k] / c[k], 2) for k in cols if k != "lost" and c.get(k)}
        lines.append("| vipd / conntrackd | | " + " | ".join(
            str(ratio.get(k, "-")) for k in cols) + " |")
    tcp = [r for r in results if "tcp_recovery_ms" in r]
    if tcp:
        lines += ["", "| kind | TCP recovery after the cut, ms (min / median / max) | "
                  "connections stalled |", "| --- | --- | --- |"]
        for r in tcp:
            name = r["kind"] if r["kind"] == "vipd" else "keepalived + conntrackd"
            lines.append(f"| {name} | {' / '.join(str(x) for x in r['tcp_recovery_ms'])} | "
                         f"{r['tcp_stalled']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flows", type=int, default=100_000)
    ap.add_argument("--kinds", default="vipd,conntrackd")
    ap.add_argument("--out", default=str(HERE / "results" / "sync.json"))
    ap.add_argument("--summarize")
    ap.add_argument("--tcp-runs", type=int, default=3,
                    help="TCP recovery runs per kind (0: skip)")
    args = ap.parse_args()
    if args.summarize:
        print(table(json.loads(Path(args.summarize).read_text())["results"]))
        return 0
    if os.geteuid() != 0:
        print("bench_sync.py needs root (network namespaces)", file=sys.stderr)
        return 2
    cleanup_on_signals()
    results = []
    for kind in args.kinds.split(","):
        if kind == "conntrackd" and shutil.which("conntrackd") is None:
            print("conntrackd is not installed (apt-get install conntrackd conntrack)",
                  file=sys.stderr)
            continue
        r = run_vipd(args.flows) if kind == "vipd" else run_conntrackd(args.flows)
        if args.tcp_runs and (kind == "vipd" or shutil.which("keepalived")):
            r.update(tcp_recovery(kind, args.tcp_runs))
        print(json.dumps(r), flush=True)
        results.append(r)
    Path(args.out).write_text(json.dumps({"results": results}, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
