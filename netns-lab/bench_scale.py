"""Scale benchmark: many virtual routers per node, vipd against keepalived in the same run.

    .venv/bin/python netns-lab/bench_scale.py [--counts 250,500,1000] [--kinds vipd,keepalived]
    .venv/bin/python netns-lab/bench_scale.py --soak-minutes 10      # 64 routers at 10 ms
    .venv/bin/python netns-lab/bench_scale.py --summarize netns-lab/results/scale.json

Topology (topologies/scale.yaml): two routers on four VLANs, N/4 virtual routers per VLAN,
1 s adverts, one VIP each: IPv4 on lanA, IPv6 on the three others; priorities 200 (r1) and
100 (r2); accept_mode true on vipd (keepalived accepts too) and no advertised link-local
(keepalived does not list one). For each kind and N:
  start      r1 alone, time until it holds all N VIPs; then r2 (staggered, as lab notes ask)
  steady     CPU of each node over 10 s (% of one CPU, the whole process tree) and RSS
  failover   r1's four switch ports cut: time until r2 holds all N VIPs, and the CPU time
             r2 spent meanwhile; Master_Down_Interval is 3.609 s for r2. vipd's masters
             advertise on whole seconds of CLOCK_MONOTONIC (the interval's grid), so the cut
             is made `--cut-phase` after one (default 50 ms: just after the burst of N
             adverts has arrived, the worst phase: every backup's timer runs nearly a full
             Master_Down_Interval from the cut); `over_mdi_ms` is failover - MDI.
             keepalived's adverts have no such grid: its phase is whatever it is.
  together   (vipd only: keepalived flapped for minutes and the kernel reported soft lockups
             here) both started at once: time until r1 holds all and r2 none
The soak runs 64 routers at 10 ms adverts and counts transitions after the election.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lab import Lab, Topology, cleanup_on_signals, wait_for  # noqa: E402
from scenario import Speaker, keepalived_available, start_vipd, status  # noqa: E402

from vipd.io.control_client import STATUS_REQUEST, expand_status, request  # noqa: E402

TOPOLOGY = HERE / "topologies" / "scale.yaml"
VLANS = ["lanA", "lanB", "lanC", "lanD"]
MDI_S = 3 + (256 - 100) / 256


def vips(n: int) -> dict[str, list[str]]:
    """N/4 VIPs per VLAN (N a multiple of 4)."""
    per = n // 4
    out = {"lanA": [f"203.0.113.{i + 1}/24" for i in range(per)]}
    for v in VLANS[1:]:
        out[v] = [f"2001:db8:{v[-1].lower()}::{0x1000 + i:x}/64" for i in range(per)]
    return out


def vipd_cfg(lab: Lab, router: str, prio: int, n: int, interval: str = "1s") -> dict[str, Any]:
    vlans = []
    for v, addrs in vips(n).items():
        vlans.append({"name": v, "interface": v, "instances": [
            {"vrid": i + 1, "priority": prio, "advert_interval": interval, "vips": [a],
             "accept_mode": True, "advertise_link_local": False, "garp": {"count": 1}}
            for i, a in enumerate(addrs)]})
    return {"node": {"name": router, "control_socket": str(lab.workdir / f"{router}.sock")},
            "mode": "per-vlan-active", "vlans": vlans}


def keepalived_cfg(router: str, prio: int, n: int) -> str:
    lines = ["global_defs {", f"  router_id {router}", "  vrrp_version 3",
             "  vrrp_garp_master_delay 0", "  vrrp_garp_master_repeat 1",
             "  enable_script_security", "}"]
    for v, addrs in vips(n).items():
        for i, a in enumerate(addrs):
            lines += [f"vrrp_instance {v}_{i + 1} {{", "  state BACKUP", f"  interface {v}",
                      f"  virtual_router_id {i + 1}", f"  priority {prio}", "  advert_int 1",
                      "  virtual_ipaddress {", f"    {a} dev {v}", "  }", "}"]
    return "\n".join(lines) + "\n"


def start(lab: Lab, kind: str, router: str, prio: int, n: int) -> subprocess.Popen[bytes]:
    if kind == "vipd":
        return start_vipd(lab, router, vipd_cfg(lab, router, prio, n)).proc
    tag = f"{router}-{time.monotonic_ns()}"
    conf = lab.workdir / f"{tag}.conf"
    conf.write_text(keepalived_cfg(router, prio, n))
    return lab.popen(router, ["keepalived", "-n", "-l", "-D", "-f", str(conf), "-p",
                              str(lab.workdir / f"{tag}.pid"), "-r",
                              str(lab.workdir / f"{tag}.vrrp.pid"), "-c",
                              str(lab.workdir / f"{tag}.chk.pid"), "--vrrp"],
                     log=f"{router}.keepalived.log")


def held(lab: Lab, router: str, n: int) -> int:
    """How many of the benchmark's N VIPs the router's kernel holds."""
    want = {a.split("/")[0] for addrs in vips(n).values() for a in addrs}
    out = lab.run(router, ["ip", "-o", "addr", "show"]).stdout
    return sum(1 for line in out.splitlines()
               if len(f := line.split()) > 3 and f[3].split("/")[0] in want)


def tree(pid: int) -> list[int]:
    pids, frontier = [pid], [pid]
    while frontier:
        p = frontier.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        pids += [int(k) for k in kids]
        frontier += [int(k) for k in kids]
    return pids


def cpu_s(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


def rss_mib(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return round(total / 1024, 1)


def wait_count(lab: Lab, router: str, want: int, timeout: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if held(lab, router, want) == want:
            return round(time.monotonic() - t0, 2)
        time.sleep(0.05)
    return None


class VipArrivals:
    """`ip -o monitor address` in a router, read in a thread: the moment the kernel
    reported the last of the benchmark's VIPs added (polling `ip addr` every 50 ms, as
    `wait_count` does, adds up to 80 ms at 1000 addresses)."""

    def __init__(self, lab: Lab, router: str, n: int) -> None:
        import threading

        self.want = {a.split("/")[0] for addrs in vips(n).values() for a in addrs}
        self.seen: set[str] = set()
        self.done_at: float | None = None
        self.proc = lab.popen(router, ["ip", "-o", "monitor", "address"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.lab = lab
        threading.Thread(target=self._read, daemon=True).start()
        time.sleep(0.2)  # subscribed before the fault

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            f = raw.decode(errors="replace").split()
            if len(f) > 3 and not f[0].startswith("Deleted") and \
                    f[3].split("/")[0] in self.want:
                self.seen.add(f[3].split("/")[0])
                if self.done_at is None and self.seen >= self.want:
                    self.done_at = time.monotonic()

    def close(self) -> None:
        self.lab.stop_process(self.proc)  # type: ignore[arg-type]


def run_one(kind: str, n: int, together: bool, cut_phase: float = 0.05) -> dict[str, Any]:
    res: dict[str, Any] = {"kind": kind, "routers": n}
    with Lab(Topology.load(TOPOLOGY)) as lab:
        if together:
            t0 = time.monotonic()
            p1, p2 = start(lab, kind, "r1", 200, n), start(lab, kind, "r2", 100, n)
            while time.monotonic() - t0 < 60:
                if held(lab, "r1", n) == n and held(lab, "r2", n) == 0:
                    res["together_converged_s"] = round(time.monotonic() - t0, 2)
                    break
                time.sleep(0.1)
            else:
                res["together_converged_s"] = None
            return res
        t0 = time.monotonic()
        p1 = start(lab, kind, "r1", 200, n)
        res["start_s"] = wait_count(lab, "r1", n, 120)
        if res["start_s"] is not None:
            res["start_s"] = round(time.monotonic() - t0, 2)
        p2 = start(lab, kind, "r2", 100, n)
        time.sleep(MDI_S + 3)
        c1, c2, t = cpu_s(p1.pid), cpu_s(p2.pid), time.monotonic()
        time.sleep(10)
        dt = time.monotonic() - t
        res["cpu_master_pct"] = round(100 * (cpu_s(p1.pid) - c1) / dt, 2)
        res["cpu_backup_pct"] = round(100 * (cpu_s(p2.pid) - c2) / dt, 2)
        res["rss_master_mib"], res["rss_backup_mib"] = rss_mib(p1.pid), rss_mib(p2.pid)
        if kind == "vipd":
            res.update(status_times(lab))
        cut = lab.prepare_cut("r1", include_sync=False)
        arrivals = VipArrivals(lab, "r2", n)
        b0 = cpu_s(p2.pid)
        target = int(time.monotonic()) + 1 + cut_phase
        time.sleep(max(0.0, target - time.monotonic()))
        t_cut, wall_cut = time.monotonic(), time.time()
        res["cut_phase_s"] = round(t_cut % 1, 4)
        cut()
        # wait on the monitor, not by polling `ip addr` (a dump of 1000 addresses every
        # 50 ms takes CPU from the daemons on this 2-CPU machine); then check once
        deadline = time.monotonic() + 60
        while arrivals.done_at is None and time.monotonic() < deadline:
            time.sleep(0.05)
        took = wait_count(lab, "r2", n, 10)
        arrivals.close()
        res["failover_s"] = None if took is None else round(
            (arrivals.done_at or time.monotonic()) - t_cut, 3)
        if res["failover_s"] is not None:
            res["over_mdi_ms"] = round((res["failover_s"] - MDI_S) * 1000, 1)
        res["failover_backup_cpu_s"] = round(cpu_s(p2.pid) - b0, 2)
        if kind == "vipd":  # the backup's own account: its netlink batches' durations
            log = (lab.workdir / "r2.vipd.log").read_text(errors="replace")
            res.update(takeover_log(log, wall_cut + MDI_S))
    return res


def status_times(lab: Lab, runs: int = 10) -> dict[str, Any]:
    """`vipctl status` on the master in steady state, median and slowest of `runs`: the
    daemon's answer to vipctl's request (connect to the parsed reply, in this process) and
    the whole command (the installed `vipctl` in a fresh interpreter, as an operator runs
    it, to its text output)."""
    sock = str(lab.workdir / "r1.sock")
    vipctl = Path(sys.executable).with_name("vipctl")
    answer, command = [], []
    for _ in range(runs):
        t = time.monotonic()
        reply = expand_status(request(sock, STATUS_REQUEST))
        answer.append(time.monotonic() - t)
        assert reply["status"]["instances"], reply
        t = time.monotonic()
        got = subprocess.run([str(vipctl), "-s", sock, "status"], capture_output=True,
                             timeout=10)
        command.append(time.monotonic() - t)
        assert got.returncode in (0, 1) and got.stdout.count(b"\n") > 1000, got.stderr
    return {"status_answer_ms": round(1000 * max(answer), 1),
            "status_answer_median_ms": round(1000 * statistics.median(answer), 1),
            "status_command_ms": round(1000 * max(command), 1),
            "status_command_median_ms": round(1000 * statistics.median(command), 1)}


def takeover_log(log: str, origin: float) -> dict[str, Any]:
    """The backup's own account of the takeover, from its log: its install batches
    (routers, ms) and a timeline in ms after cut + Master_Down_Interval (the log's
    timestamps are wall-clock milliseconds): first and last BACKUP -> MASTER, and when
    each batch was logged done."""
    import datetime

    def ms(stamp: str) -> float:
        t = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        return round((t - origin) * 1000, 1)

    became = [ms(m) for m in re.findall(r"^(\S+ \S+) .*BACKUP -> MASTER", log, re.M)]
    batches = re.findall(r"^(\S+ \S+) .*VIPs changed for (\d+) routers .* in ([\d.]+) ms",
                         log, re.M)
    return {"failover_install_ms": round(sum(float(b[2]) for b in batches), 1),
            "failover_batches": [[int(b[1]), float(b[2])] for b in batches],
            "failover_timeline_ms": {
                "first_master": became[0] if became else None,
                "last_master": became[-1] if became else None,
                "batches_done": [ms(b[0]) for b in batches]}}


def soak(minutes: float) -> dict[str, Any]:
    with Lab(Topology.load(TOPOLOGY)) as lab:
        sp: dict[str, Speaker] = {}
        for r, p in (("r1", 200), ("r2", 100)):
            sp[r] = start_vipd(lab, r, vipd_cfg(lab, r, p, 64, "10ms"))
        wait_for(lambda: held(lab, "r1", 64) == 64 and held(lab, "r2", 64) == 0, 30,
                 what="r1 holds all 64")
        time.sleep(1)
        before = {r: sum(i["transitions"] for i in status(lab, s)["instances"])
                  for r, s in sp.items()}
        cpu0, t0 = {r: cpu_s(s.proc.pid) for r, s in sp.items()}, time.monotonic()
        time.sleep(minutes * 60)
        dt = time.monotonic() - t0
        cpu = {r: round(100 * (cpu_s(s.proc.pid) - cpu0[r]) / dt, 2) for r, s in sp.items()}
        after = {r: sum(i["transitions"] for i in status(lab, s)["instances"])
                 for r, s in sp.items()}
        return {"kind": "vipd", "routers": 64, "interval_ms": 10, "minutes": minutes,
                "spurious_transitions": sum(after[r] - before[r] for r in sp),
                "cpu_master_pct": cpu["r1"], "cpu_backup_pct": cpu["r2"],
                "rss_master_mib": rss_mib(sp["r1"].proc.pid),
                "rss_backup_mib": rss_mib(sp["r2"].proc.pid),
                "r1_holds": held(lab, "r1", 64), "r2_holds": held(lab, "r2", 64)}


def over_mdi(r: dict[str, Any]) -> str:
    return f" (MDI {r['over_mdi_ms']:+} ms)" if "over_mdi_ms" in r else ""


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| kind | routers | all MASTER after start s | CPU master / backup % | "
            "RSS master / backup MiB | failover s | backup CPU for failover s | "
            "both at once: converged s |", "|" + " --- |" * 8]
    for r in results:
        if "spurious_transitions" in r:
            continue
        rows.append(f"| {r['kind']} | {r['routers']} | {r.get('start_s', '-')} | "
                    f"{r.get('cpu_master_pct', '-')} / {r.get('cpu_backup_pct', '-')} | "
                    f"{r.get('rss_master_mib', '-')} / {r.get('rss_backup_mib', '-')} | "
                    f"{r.get('failover_s', '-')}{over_mdi(r)} | "
                    f"{r.get('failover_backup_cpu_s', '-')} | "
                    f"{r.get('together_converged_s', '-')} |")
    for r in results:
        if "status_answer_ms" in r:
            rows.append(f"\n`vipctl status` at {r['routers']} routers, median / slowest of "
                        f"10: the daemon answers in {r.get('status_answer_median_ms', '-')} / "
                        f"{r['status_answer_ms']} ms, the command takes "
                        f"{r.get('status_command_median_ms', '-')} / "
                        f"{r['status_command_ms']} ms")
    for r in results:
        if "spurious_transitions" in r:
            rows.append(f"\nSoak: {r['routers']} routers at {r['interval_ms']} ms adverts for "
                        f"{r['minutes']} min: {r['spurious_transitions']} spurious transitions"
                        + (f"; CPU master / backup {r['cpu_master_pct']} / "
                           f"{r['cpu_backup_pct']} %; r1 holds {r['r1_holds']}, r2 "
                           f"{r['r2_holds']} VIPs at the end" if "r1_holds" in r else ""))
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description="vipd scale benchmark")
    ap.add_argument("--counts", default="248,500,1000")  # multiples of 4
    ap.add_argument("--kinds", default="vipd,keepalived")
    ap.add_argument("--soak-minutes", type=float, default=0)
    ap.add_argument("--cut-phase", type=float, default=0.05,
                    help="seconds after a whole second of CLOCK_MONOTONIC to cut r1")
    ap.add_argument("--failover-only", action="store_true",
                    help="skip the run with both nodes started at once")
    ap.add_argument("--out", help="results file (default: results/scale.json, or "
                    "results/soak.json for --soak-minutes)")
    ap.add_argument("--summarize")
    args = ap.parse_args()
    if args.summarize:
        print(table(json.loads(Path(args.summarize).read_text())["results"]))
        return 0
    if args.out is None:
        args.out = str(HERE / "results" / ("soak.json" if args.soak_minutes else "scale.json"))
    cleanup_on_signals()
    results = []
    if args.soak_minutes:
        results.append(soak(args.soak_minutes))
    else:
        for n in [int(x) // 4 * 4 for x in args.counts.split(",")]:
            for kind in args.kinds.split(","):
                if kind == "keepalived" and not keepalived_available():
                    continue
                r = run_one(kind, n, together=False, cut_phase=args.cut_phase)
                if kind == "vipd" and not args.failover_only:
                    r.update(run_one(kind, n, together=True))
                print(json.dumps(r), flush=True)
                results.append(r)
    Path(args.out).write_text(json.dumps({"results": results}, indent=1))
    print(table(results))
    if not args.soak_minutes:  # (the soak has nothing to plot)
        from plots import after_benchmark

        after_benchmark("scale", results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
