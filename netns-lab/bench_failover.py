"""Failover benchmark: outage seen by a 1 ms probe through the VIPs, vipd against keepalived.

    python netns-lab/bench_failover.py [--runs 7] [--intervals 1000,100,10]

Each run builds a fresh lab (pair topology), starts the two speakers with the same VRIDs,
priorities (200 and 100) and advert interval, waits for r1 to be master, starts the probe
(client -> server, through the VIP of each VLAN), then makes the fault:
  cut          r1's switch ports down in one batch (unplanned)
  sigterm      the daemon on r1 stopped with SIGTERM (planned)
  maintenance  `vipctl maintenance on` on r1 (planned, vipd only)
  linkloss     r1's lanA port down only (its other links stay up): vipd with the sync link
               as a second channel, single-active; keepalived with a sync group
  nodedeath    as cut, with the sync link configured (and cut too): vipd's second channel
               against keepalived with a sync group
and keeps probing until r2 holds both VIPs plus a margin. vipd and keepalived runs
alternate so slow spells of this noisy machine hit both. Figures: the outage of the loss
run at the fault (first to last unanswered request, plus one interval; docs/benchmarks.md), the
number of lost requests, the longest reply gap, and the probe's own longest send gap.
Results go to stdout and, as JSON, to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab import (  # noqa: E402
    Lab,
    Topology,
    cleanup_on_signals,  # noqa: E402
    wait_for,
)
from scenario import (  # noqa: E402
    AdvertWatch,
    Probe,
    holder,
    keepalived_available,
    start_keepalived,
    start_vipd,
    sync_section,
    sync_status,
    vipctl,
    vipd_config,
)

TARGET = "198.51.100.100"


def master_down_ms(priority: int, interval_ms: int) -> float:
    return 3 * interval_ms + (256 - priority) * interval_ms / 256


def one_run(kind: str, interval_ms: int, fault: str, phase: float,
            with_sync: bool = False) -> dict[str, Any]:
    """One fault, made `phase` (0..1) of an advert interval after one of r1's adverts was
    seen on lanA: the outage depends on that phase, so every kind gets the same phases.
    `with_sync`: vipd runs with the sync link (single-active) for the other faults too."""
    second = fault in ("linkloss", "nodedeath") or with_sync
    with Lab(Topology.load()) as lab:
        s2 = None
        if kind == "vipd":
            cfgs = {r: vipd_config(lab, r, p, interval_ms,
                                   **({"mode": "single-active"} if second else {}))
                    for r, p in (("r1", 200), ("r2", 100))}
            if second:
                for r, cfg in cfgs.items():
                    cfg["sync"] = sync_section(lab, r)
            s1 = start_vipd(lab, "r1", cfgs["r1"])
            s2 = start_vipd(lab, "r2", cfgs["r2"])
            if second:
                wait_for(lambda: sync_status(lab, s2)["ready"], 10, what="r2 synced")
        else:
            s1 = start_keepalived(lab, "r1", 200, interval_ms, sync_group=second)
            start_keepalived(lab, "r2", 100, interval_ms, sync_group=second)
        settle = 5 + 5 * interval_ms / 1000
        wait_for(lambda: holder(lab, "lanA") == ["r1"] and holder(lab, "lanB") == ["r1"],
                 settle, what=f"{kind}: r1 master")
        time.sleep(3 * interval_ms / 1000 + 0.3)  # r2 has heard r1 and the probe warms up
        probe = Probe(lab, "client", TARGET, 1.0, 120)
        watch = AdvertWatch(lab, "client")
        cut = (lab.prepare_cut("r1") if fault in ("cut", "nodedeath") else
               lab.prepare_cut("r1", segments=["lanA"]) if fault == "linkloss" else None)
        time.sleep(0.5)
        seen = watch.wait_advert("192.0.2.11", 2 + 2 * interval_ms / 1000)
        watch.close()
        time.sleep(max(0.0, seen + phase * interval_ms / 1000 - time.monotonic()))
        watcher = DualMasterWatch([s1, s2]) if kind == "vipd" else None
        t_fault = time.monotonic()
        if cut is not None:
            cut()
        elif fault == "sigterm":
            s1.proc.send_signal(15)
        elif fault == "maintenance":
            vipctl(lab, s1, "maintenance", "on")
        wait_for(lambda: "r2" in holder(lab, "lanA") and "r2" in holder(lab, "lanB"),
                 settle, interval=0.002, what=f"{kind}: r2 holds the VIPs")
        moved_ms = (time.monotonic() - t_fault) * 1000
        time.sleep(max(0.5, 2 * interval_ms / 1000))
        dual_ms = watcher.stop() if watcher is not None else None
        res = probe.finish()
    runs = [r for r in res["loss_runs"] if r["last_send"] >= t_fault - 0.002]
    worst = max(runs, key=lambda r: r["count"], default=None)
    return {
        "kind": kind, "interval_ms": interval_ms,
        "fault": f"{fault}+sync" if with_sync and fault not in ("linkloss", "nodedeath")
        else fault,
        "phase": round(phase, 3), "late_ms": round((t_fault - seen) * 1000 - phase * interval_ms,
                                                   2),
        "outage_ms": worst["outage_ms"] if worst else 0.0,
        "lost": sum(r["count"] for r in runs),
        "longest_reply_gap_ms": res["longest_reply_gap_ms"],
        "max_send_gap_ms": res["max_send_gap_ms"],
        "vip_moved_ms": round(moved_ms, 1),
        "dual_master_ms": dual_ms,
        "sent": res["sent"], "received": res["received"],
    }


class DualMasterWatch:
    """Both daemons' status every few ms over their control sockets (from here: a vipctl
    process per poll would be too slow): the longest time both called themselves MASTER
    of the same virtual router."""

    def __init__(self, speakers: list[Any]) -> None:
        import threading

        self.socks = [str(sp.socket) for sp in speakers if sp is not None]
        self.worst = 0.0
        self._since: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from vipd.io.control_client import request

        while not self._stop.is_set():
            masters: dict[str, int] = {}
            for sock in self.socks:
                try:
                    st = request(sock, {"command": "status"}, timeout=0.5)["status"]
                except Exception:
                    continue  # a daemon cut off or killed: not a master on the LAN
                for i in st["instances"]:
                    if i["state"] == "MASTER" and i.get("effective_priority", 1) > 0:
                        masters[i["name"]] = masters.get(i["name"], 0) + 1
            now = time.monotonic()
            for name in set(self._since) | set(masters):
                if masters.get(name, 0) >= 2:
                    self._since.setdefault(name, now)
                elif name in self._since:
                    self.worst = max(self.worst, now - self._since.pop(name))
            time.sleep(0.003)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(2)
        now = time.monotonic()
        for since in self._since.values():
            self.worst = max(self.worst, now - since)
        return round(self.worst * 1000, 1)


def stats(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 1), "median": round(statistics.median(values), 1),
            "max": round(max(values), 1)}


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (fault, interval): min/median/max per kind, and vipd/keepalived median ratios."""
    summary: list[dict[str, Any]] = []
    keys = list(dict.fromkeys((r["fault"], r["interval_ms"]) for r in results))
    for fault, interval_ms in keys:
        rows: dict[str, list[dict[str, Any]]] = {}
        for r in results:
            if (r["fault"], r["interval_ms"]) == (fault, interval_ms):
                rows.setdefault(r["kind"], []).append(r)
        line: dict[str, Any] = {"fault": fault, "interval_ms": interval_ms,
                                "master_down_interval_ms": master_down_ms(100, interval_ms)}
        for kind, rs in rows.items():
            duals = [r["dual_master_ms"] for r in rs if r.get("dual_master_ms") is not None]
            line[kind] = {"outage_ms": stats([r["outage_ms"] for r in rs]),
                          **({"dual_master_ms": stats(duals)} if duals else {}),
                          "reply_gap_ms": stats([r["longest_reply_gap_ms"] for r in rs]),
                          "lost": stats([r["lost"] for r in rs]), "runs": len(rs)}
        if "vipd" in rows and "keepalived" in rows:
            for metric, name in (("outage_ms", "ratio"), ("reply_gap_ms", "ratio_reply_gap")):
                kd = line["keepalived"][metric]["median"]
                vd = line["vipd"][metric]["median"]
                line[name] = round(vd / kd, 3) if kd else None
            # the runs are paired by phase: the mean paired difference is the sharper figure
            by_phase = {r["phase"]: r["outage_ms"] for r in rows["keepalived"]}
            diffs = [r["outage_ms"] - by_phase[r["phase"]] for r in rows["vipd"]
                     if r["phase"] in by_phase]
            line["paired_diff_ms"] = round(statistics.mean(diffs), 1) if diffs else None
        summary.append(line)
    return summary


def print_summary(summary: list[dict[str, Any]]) -> None:
    print(f"{'fault':<12}{'interval':>9}{'MDI':>9}   {'vipd outage min/med/max':<27}"
          f"{'keepalived outage min/med/max':<31}{'ratio':>6}{'gap ratio':>10}"
          f"{'paired diff':>12}")
    for s in summary:
        def fmt(kind: str, s: dict[str, Any] = s) -> str:
            if kind not in s:
                return "-"
            o = s[kind]["outage_ms"]
            return f"{o['min']}/{o['median']}/{o['max']} ms"

        def num(key: str, s: dict[str, Any] = s) -> str:
            return "-" if s.get(key) is None else str(s[key])
        print(f"{s['fault']:<12}{s['interval_ms']:>7} ms{s['master_down_interval_ms']:>7.0f} ms"
              f"   {fmt('vipd'):<27}{fmt('keepalived'):<31}{num('ratio'):>6}"
              f"{num('ratio_reply_gap'):>10}{num('paired_diff_ms'):>9} ms")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--intervals", default="1000,100,10")
    ap.add_argument("--kinds", default="vipd,keepalived")
    ap.add_argument("--faults", default="cut,sigterm,maintenance")
    ap.add_argument("--planned-interval", type=int, default=100,
                    help="advert interval (ms) for the planned handoff runs")
    ap.add_argument("--out", default="netns-lab/results/failover.json")
    ap.add_argument("--with-sync", action="store_true",
                    help="vipd with the sync link (single-active) for cut, sigterm and "
                         "maintenance too; keepalived with a sync group")
    ap.add_argument("--summarize", metavar="JSON",
                    help="print the summary of an earlier run's results file and exit")
    args = ap.parse_args(argv)
    if args.summarize:
        print_summary(summarize(json.loads(Path(args.summarize).read_text())["results"]))
        return 0
    cleanup_on_signals()
    kinds = args.kinds.split(",")
    if "keepalived" in kinds and not keepalived_available():
        print("keepalived is not installed: run scripts/bootstrap.sh", file=sys.stderr)
        return 2
    plan: list[tuple[int, str]] = []
    faults = args.faults.split(",")
    if "cut" in faults:
        plan += [(int(i), "cut") for i in args.intervals.split(",")]
    plan += [(args.planned_interval, f) for f in faults if f != "cut"]  # 100 ms adverts
    results: list[dict[str, Any]] = []
    for interval_ms, fault in plan:
        these = [k for k in kinds if not (fault == "maintenance" and k == "keepalived")]
        for n in range(args.runs):
            phase = (n + 0.5) / args.runs  # stratified, identical for every kind
            for kind in these:
                r = one_run(kind, interval_ms, fault, phase, args.with_sync)
                results.append(r)
                print(f"  {fault:<11} {interval_ms:>5} ms  {kind:<10} run {n + 1} (phase "
                      f"{phase:.2f}): outage "
                      f"{r['outage_ms']:7.1f} ms, lost {r['lost']:4d}, reply gap "
                      f"{r['longest_reply_gap_ms']:7.1f} ms, probe send gap "
                      f"{r['max_send_gap_ms']:5.1f} ms, two masters "
                      f"{r.get('dual_master_ms')} ms", flush=True)
    summary = summarize(results)
    print()
    print_summary(summary)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": args.runs,
                               "summary": summary, "results": results}, indent=1))
    print(f"\nwritten to {out}")
    from plots import after_benchmark

    after_benchmark("failover", results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
