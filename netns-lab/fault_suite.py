"""The fault suite: a vipd pair under every fault an operator meets, measured.

    .venv/bin/python netns-lab/fault_suite.py [--modes per-vlan-active,single-active]
                                              [--faults all|name,...] [--interval-ms 100]
    .venv/bin/python netns-lab/fault_suite.py --summarize netns-lab/results/faults.json

Each fault runs in a fresh lab (two routers, priorities 200 and 100, two VLANs) with a 1 ms
probe from the client to the server through both VIPs and 20 long-lived TCP flows. Measured
for each: the time both routers held a VIP at once (from `ip monitor address` in each
router, so from the kernel), the probe's outage (first to last unanswered request of the
longest loss run), transitions of both daemons, TCP flows broken or stalled, the daemons'
CPU time and peak RSS, crashes (a daemon that died unasked, or a traceback in its log), and
for the floods and the storm: how late r2 took over after r1's ports were cut during the
fault (r2's own clock: last advert heard to takeover, minus Master_Down_Interval) and the
slowest status answer. Results go to stdout as a table and, as JSON, to --out.

The clock-step fault steps the machine's wall clock forward by an hour and back (vipd runs
on the monotonic clock; the wall clock only dates packets): run it only where that is fine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lab import Lab, Topology, cleanup_on_signals, wait_for  # noqa: E402
from scenario import (  # noqa: E402
    Probe,
    Speaker,
    holder,
    rewrite_config,
    start_vipd,
    status,
    vipd_config,
)

TARGET = "198.51.100.100"
VIPS = {"lanA": "192.0.2.1", "lanB": "198.51.100.1"}
PY = sys.executable
_ADDR = re.compile(r"^(Deleted )?\d+: (\S+)\s+inet6? (\S+?)/")


class AddrWatch:
    """`ip monitor address` in each router: when each VIP came and went, from the kernel."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.events: list[tuple[float, str, str, bool]] = []
        self.initial = {r: {ip for ip in VIPS.values() if ip in lab.addresses(r)}
                        for r in lab.topo.routers}
        self.procs = []
        for r in lab.topo.routers:
            p = lab.popen(r, ["ip", "-o", "monitor", "address"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL)
            self.procs.append(p)
            threading.Thread(target=self._read, args=(r, p), daemon=True).start()

    def _read(self, router: str, p: subprocess.Popen[bytes]) -> None:
        assert p.stdout is not None
        for raw in p.stdout:
            m = _ADDR.match(raw.decode(errors="replace"))
            if m and m.group(3) in VIPS.values():
                self.events.append((time.monotonic(), router, m.group(3), not m.group(1)))

    def dual_ms(self, start: float, end: float) -> float:
        """Longest total time, over the VIPs, that both routers held one."""
        worst = 0.0
        for vip in VIPS.values():
            held = {r: vip in ips for r, ips in self.initial.items()}
            both_since: float | None = start if all(held.values()) else None
            total = 0.0
            for t, r, ip, present in sorted(self.events):
                if ip != vip or t > end:
                    continue
                held[r] = present
                if all(held.values()) and both_since is None:
                    both_since = max(t, start)
                elif not all(held.values()) and both_since is not None:
                    total += max(0.0, t - both_since)
                    both_since = None
            if both_since is not None:
                total += end - both_since
            worst = max(worst, total)
        return round(worst * 1000, 1)

    def close(self) -> None:
        for p in self.procs:
            self.lab.stop_process(p)  # type: ignore[arg-type]


def proc_cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_peak_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


@dataclass
class Ctx:
    lab: Lab
    mode: str
    interval_ms: int
    speakers: dict[str, Speaker]
    cfgs: dict[str, dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)
    killed: set[int] = field(default_factory=set)  # PIDs we ended on purpose
    cpu_s: float = 0.0  # CPU time of daemons that ended during the fault
    peak_rss: float = 0.0

    @property
    def mdi_s(self) -> float:
        return (3 * self.interval_ms + (256 - 100) * self.interval_ms / 256) / 1000

    def r1_alone(self, timeout: float = 10.0) -> None:
        wait_for(lambda: holder(self.lab, "lanA") == ["r1"]
                 and holder(self.lab, "lanB") == ["r1"], timeout, what="r1 alone holds both")

    def retire(self, sp: Speaker) -> None:
        """Note what a daemon used before it is ended on purpose."""
        self.cpu_s += proc_cpu_s(sp.proc.pid)
        self.peak_rss = max(self.peak_rss, proc_peak_rss_mib(sp.proc.pid))
        self.killed.add(sp.proc.pid)

    def takeover_late_ms(self) -> float:
        """Cut r1 now; how late r2 took over, by r2's own clock."""
        self.lab.cut("r1")
        r2 = self.speakers["r2"]
        wait_for(lambda: holder(self.lab, "lanA") == ["r2"], 5 + self.mdi_s * 3,
                 what="r2 takes over")
        inst = [i for i in status(self.lab, r2)["instances"] if i["vlan"] == "lanA"][0]
        waited_ms = inst["last_transition"]["master_silent_ms"]
        self.lab.restore("r1")
        return round(waited_ms - inst["master_down_interval_ms"], 1)


def slowest_status_ms(ctx: Ctx, sp: Speaker, seconds: float) -> float:
    from vipd.io.control_client import request

    assert sp.socket is not None
    worst, end = 0.0, time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        try:
            request(str(sp.socket), {"command": "status"}, timeout=5)
        except (OSError, ValueError):
            return float("inf")
        worst = max(worst, time.monotonic() - t0)
        time.sleep(0.05)
    return round(worst * 1000, 1)


# ---------------------------------------------------------------- the faults


def f_kill9_restart(ctx: Ctx) -> None:
    r1 = ctx.speakers["r1"]
    ctx.retire(r1)
    os.kill(r1.proc.pid, signal.SIGKILL)
    r1.proc.wait(5)
    # the dead daemon's VIPs stay in r1's kernel until the restart removes them
    wait_for(lambda: {i["state"] for i in status(ctx.lab, ctx.speakers["r2"])["instances"]}
             == {"MASTER"}, 5, what="r2 takes over")
    ctx.speakers["r1"] = start_vipd(ctx.lab, "r1", ctx.cfgs["r1"])


def f_sigstop(ctx: Ctx) -> None:
    pid = ctx.speakers["r1"].proc.pid
    os.kill(pid, signal.SIGSTOP)
    time.sleep(2 * ctx.mdi_s)
    os.kill(pid, signal.SIGCONT)


def f_link_cut_restore(ctx: Ctx) -> None:
    ctx.lab.cut("r1", include_sync=False)
    wait_for(lambda: holder(ctx.lab, "lanA") == ["r2"], 5, what="r2 takes over")
    ctx.lab.restore("r1", include_sync=False)


def f_link_flaps(ctx: Ctx) -> None:
    sw = ctx.lab.switch
    lines = "".join(f"link set {ctx.lab.port('r1', 'lanA')} {s}\n"
                    for _ in range(20) for s in ("down", "up"))
    t0 = time.monotonic()
    for line in lines.splitlines():  # 20 flaps within one second
        subprocess.run(["ip", "-n", sw, "link", *line.split()[1:]], check=True)
        time.sleep(max(0.0, 0.0125 - (time.monotonic() - t0) % 0.0125))
    ctx.extra["flap_s"] = round(time.monotonic() - t0, 2)


def f_one_way_loss(ctx: Ctx) -> None:
    rules = ("add table inet faultsuite\n"
             "add chain inet faultsuite in { type filter hook input priority -20; }\n"
             "add rule inet faultsuite in ip saddr 192.0.2.11 ip protocol 112 drop\n")
    subprocess.run(ctx.lab.cmd("r2", ["nft", "-f", "-"]), input=rules, text=True, check=True)
    time.sleep(2.0)
    ctx.lab.run("r2", ["nft", "delete", "table", "inet", "faultsuite"])


def f_reloads_20(ctx: Ctx) -> None:
    for sp in ctx.speakers.values():
        for _ in range(20):
            sp.proc.send_signal(signal.SIGHUP)
            time.sleep(0.02)
    wait_for(lambda: all(status(ctx.lab, sp)["reloads"] >= 1 for sp in ctx.speakers.values()),
             10, what="reloads done")


def f_reload_add_remove_vlan(ctx: Ctx) -> None:
    r1 = ctx.speakers["r1"]
    cfg = json.loads(json.dumps(ctx.cfgs["r1"]))
    cfg["vlans"] = cfg["vlans"][:1]  # lanB removed
    rewrite_config(r1, cfg)
    r1.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: holder(ctx.lab, "lanB") == ["r2"], 5, what="lanB moves to r2")
    rewrite_config(r1, ctx.cfgs["r1"])  # and added back
    r1.proc.send_signal(signal.SIGHUP)


def f_clock_step(ctx: Ctx) -> None:
    now = time.clock_gettime(time.CLOCK_REALTIME)
    time.clock_settime(time.CLOCK_REALTIME, now + 3600)
    try:
        time.sleep(2.0)
    finally:
        time.clock_settime(time.CLOCK_REALTIME, time.clock_gettime(time.CLOCK_REALTIME) - 3600)


def _flood(ctx: Ctx, kind: str, rate: int) -> None:
    args = [PY, str(HERE / "flood.py"), "--kind", kind, "--rate", str(rate), "--seconds", "6"]
    flood = ctx.lab.popen("client", args, stdout=subprocess.PIPE)
    time.sleep(1.0)
    ctx.extra["status_ms"] = slowest_status_ms(ctx, ctx.speakers["r2"], 1.0)
    ctx.extra["takeover_late_ms"] = ctx.takeover_late_ms()
    out, _ = flood.communicate(timeout=30)
    ctx.lab.procs.pop(flood.pid, None)
    ctx.extra["flood_packets"] = int(out or 0)


def f_spoof_flood(ctx: Ctx) -> None:
    _flood(ctx, "spoof", 1000)


def f_garbage_flood(ctx: Ctx) -> None:
    _flood(ctx, "garbage", 2000)


def f_control_storm(ctx: Ctx) -> None:
    storms = [subprocess.Popen([PY, str(HERE / "storm.py"), str(sp.socket), "--clients", "200",
                                "--idle", "100", "--seconds", "5"], stdout=subprocess.PIPE)
              for sp in ctx.speakers.values()]
    time.sleep(1.0)
    ctx.extra["status_ms"] = slowest_status_ms(ctx, ctx.speakers["r2"], 1.0)
    ctx.extra["takeover_late_ms"] = ctx.takeover_late_ms()
    ctx.extra["storm"] = [json.loads(p.communicate(timeout=30)[0] or b"{}") for p in storms]


def f_routes_60k(ctx: Ctx) -> None:
    batch = "".join(f"route add 2001:db8:ff::{i:x}/128 dev lanA\n" for i in range(60000))
    subprocess.run(ctx.lab.cmd("r1", ["ip", "-6", "-batch", "-"]), input=batch, text=True,
                   check=True, timeout=120)
    ctx.lab.cut("r1", include_sync=False)
    wait_for(lambda: holder(ctx.lab, "lanA") == ["r2"], 5, what="r2 takes over")
    wait_for(lambda: {i["state"] for i in status(ctx.lab, ctx.speakers["r1"])["instances"]}
             == {"FAULT"}, 3, what="r1 sees its links down")
    ctx.lab.restore("r1", include_sync=False)


FAULTS: dict[str, Callable[[Ctx], None]] = {
    "kill -9 + restart": f_kill9_restart,
    "SIGSTOP 2xMDI": f_sigstop,
    "link cut + restore": f_link_cut_restore,
    "20 link flaps in 1 s": f_link_flaps,
    "one-way advert loss 2 s": f_one_way_loss,
    "20 reloads": f_reloads_20,
    "reload -VLAN +VLAN": f_reload_add_remove_vlan,
    "wall clock +1 h": f_clock_step,
    "spoofed-sender flood": f_spoof_flood,
    "garbage flood (master's address)": f_garbage_flood,
    "control-socket storm": f_control_storm,
    "60,000 routes": f_routes_60k,
}


def run_fault(name: str, mode: str, interval_ms: int) -> dict[str, Any]:
    with Lab(Topology.load()) as lab:
        cfgs = {r: vipd_config(lab, r, p, interval_ms, mode=mode)
                for r, p in (("r1", 200), ("r2", 100))}
        speakers = {r: start_vipd(lab, r, cfgs[r]) for r in ("r1", "r2")}
        ctx = Ctx(lab, mode, interval_ms, speakers, cfgs)
        ctx.r1_alone()
        lab.popen("server", [PY, str(HERE / "tcpflows.py"), "serve"], log="tcp-server.log")
        time.sleep(0.3)
        flows = lab.popen("client", [PY, str(HERE / "tcpflows.py"), "run", TARGET,
                                     "--seconds", "120"], stdout=subprocess.PIPE)
        time.sleep(3 * ctx.mdi_s + 0.5)  # r2 has heard r1; flows are up
        before = {(r, i["name"]): i["transitions"] for r, sp in speakers.items()
                  for i in status(lab, sp)["instances"]}
        cpu0 = {sp.proc.pid: proc_cpu_s(sp.proc.pid) for sp in speakers.values()}
        watch = AddrWatch(lab)
        probe = Probe(lab, "client", TARGET, 1.0, 120)
        time.sleep(0.5)
        t0 = time.monotonic()
        error = None
        try:
            FAULTS[name](ctx)
            ctx.r1_alone(15)
            time.sleep(3 * ctx.mdi_s)  # and it stays so
        except Exception as exc:  # a fault that never recovers is a result, not a crash
            error = f"{type(exc).__name__}: {exc}"
        t1 = time.monotonic()
        p = probe.finish()
        watch.close()
        os.kill(flows.pid, signal.SIGTERM)
        fl = json.loads(flows.communicate(timeout=15)[0] or b"{}")
        lab.procs.pop(flows.pid, None)
        live = {r: sp for r, sp in ctx.speakers.items() if sp.proc.poll() is None}
        crashes = sum(1 for sp in ctx.speakers.values()
                      if sp.proc.poll() is not None and sp.proc.pid not in ctx.killed)
        crashes += sum("Traceback" in (lab.workdir / f"{r}.vipd.log").read_text()
                       for r in ctx.speakers)
        after: dict[tuple[str, str], int] | None = {}
        try:
            after = {(r, i["name"]): i["transitions"] for r, sp in live.items()
                     for i in status(lab, sp)["instances"]}
        except Exception:
            after = None
        restarted = any(sp.proc.pid not in cpu0 for sp in ctx.speakers.values())
        # routers replaced by a reload count again from zero: those are left out
        transitions = None if restarted or after is None else \
            sum(n - before[k] for k, n in after.items() if k in before and n >= before[k])
        cpu = ctx.cpu_s + sum(proc_cpu_s(sp.proc.pid) - cpu0.get(sp.proc.pid, 0.0)
                              for sp in live.values())
        rss = max([ctx.peak_rss] + [proc_peak_rss_mib(sp.proc.pid) for sp in live.values()])
        return {
            "fault": name, "mode": mode, "interval_ms": interval_ms,
            "mdi_ms": round(ctx.mdi_s * 1000, 1), "window_s": round(t1 - t0, 2),
            "dual_master_ms": watch.dual_ms(t0, t1), "outage_ms": p["outage_ms"],
            "lost": p["lost"], "probe_max_send_gap_ms": p["max_send_gap_ms"],
            "transitions": transitions, "flows": fl.get("flows"),
            "flows_lost": (fl.get("broken", 0) + fl.get("stalled", 0)) if fl else None,
            "longest_flow_stall_ms": fl.get("longest_stall_ms"),
            "cpu_s": round(cpu, 2), "peak_rss_mib": rss, "crashes": crashes,
            "error": error, **ctx.extra,
        }


def fmt(v: Any) -> str:
    return "-" if v is None else str(v)


def table(results: list[dict[str, Any]]) -> str:
    head = ("| mode | fault | dual master ms | outage ms (lost) | transitions | flows lost "
            "| CPU s | peak RSS MiB | crashes | takeover late ms | slowest status ms |")
    lines = [head, "|" + " --- |" * 11]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['fault']} | {fmt(r['dual_master_ms'])} | "
            f"{fmt(r['outage_ms'])} ({fmt(r['lost'])}) | {fmt(r['transitions'])} | "
            f"{fmt(r['flows_lost'])}/{fmt(r['flows'])} | {fmt(r['cpu_s'])} | "
            f"{fmt(r['peak_rss_mib'])} | {r['crashes']} | {fmt(r.get('takeover_late_ms'))} | "
            f"{fmt(r.get('status_ms'))} |" + (f" ERROR {r['error']}" if r["error"] else ""))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description="vipd fault suite")
    ap.add_argument("--modes", default="per-vlan-active,single-active")
    ap.add_argument("--faults", default="all")
    ap.add_argument("--interval-ms", type=int, default=100)
    ap.add_argument("--out", default=str(HERE / "results" / "faults.json"))
    ap.add_argument("--summarize")
    args = ap.parse_args()
    if args.summarize:
        print(table(json.loads(Path(args.summarize).read_text())["results"]))
        return 0
    if os.geteuid() != 0:
        print("the fault suite needs root (network namespaces)", file=sys.stderr)
        return 2
    cleanup_on_signals()
    names = list(FAULTS) if args.faults == "all" else args.faults.split(",")
    results = []
    for mode in args.modes.split(","):
        for name in names:
            r = run_fault(name, mode, args.interval_ms)
            print(json.dumps(r), flush=True)
            results.append(r)
    Path(args.out).write_text(json.dumps({"results": results}, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
