"""Hang benchmark: the master's daemon frozen (SIGSTOP) and thawed (SIGCONT), vipd against
keepalived, in the same lab with the same timers.

    python netns-lab/bench_hang.py [--cycles 7] [--interval-ms 100] [--hang-s 2]

A hung daemon leaves the kernel forwarding, so a hung master still holds and answers for
its VIPs while the backup takes over: two masters until the hung one resumes. What matters
is what happens then: how many times the backup enters MASTER (the ideal is once per hang;
keepalived's backup was seen to flap here) and how long after SIGCONT until one router alone
holds the VIP. For keepalived the frozen process is its VRRP child (from its pid file).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab import Lab, Topology, cleanup_on_signals, wait_for  # noqa: E402
from scenario import (  # noqa: E402
    holder,
    keepalived_available,
    start_keepalived,
    start_vipd,
    status,
    vipd_config,
)


def keepalived_vrrp_pid(lab: Lab, conf: Path) -> int:
    pidfile = Path(str(conf).replace(".keepalived.conf", ".vrrp.pid"))
    return int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 5,
                        what="keepalived VRRP child pid"))


def master_entries(lab: Lab, kind: str, speaker: Any) -> int:
    """How many times r2 has entered MASTER for lanA."""
    if kind == "vipd":
        return int(next(i["became_master"] for i in status(lab, speaker)["instances"]
                        if i["vlan"] == "lanA"))
    log = (lab.workdir / "r2.keepalived.log").read_text(errors="replace")
    return sum(1 for line in log.splitlines()
               if "(lanA)" in line and "Entering MASTER STATE" in line)


def run(kind: str, cycles: int, interval_ms: int, hang_s: float) -> dict[str, Any]:
    with Lab(Topology.load()) as lab:
        if kind == "vipd":
            r1 = start_vipd(lab, "r1", vipd_config(lab, "r1", 200, interval_ms))
            r2 = start_vipd(lab, "r2", vipd_config(lab, "r2", 100, interval_ms))
            frozen = r1.proc.pid
        else:
            r1 = start_keepalived(lab, "r1", 200, interval_ms)
            wait_for(lambda: holder(lab, "lanA") == ["r1"], 10, what="keepalived r1 master")
            r2 = start_keepalived(lab, "r2", 100, interval_ms)
            frozen = keepalived_vrrp_pid(lab, r1.config)
        wait_for(lambda: holder(lab, "lanA") == ["r1"], 10, what=f"{kind}: r1 master")
        time.sleep(1.0)
        base = master_entries(lab, kind, r2)
        settle_ms: list[float] = []
        for _ in range(cycles):
            os.kill(frozen, signal.SIGSTOP)
            try:
                wait_for(lambda: "r2" in holder(lab, "lanA"), 5, what=f"{kind}: r2 takes over")
                time.sleep(hang_s)
            finally:
                os.kill(frozen, signal.SIGCONT)
            t0 = time.monotonic()
            wait_for(lambda: holder(lab, "lanA") == ["r1"], 15, interval=0.005,
                     what=f"{kind}: single master after SIGCONT")
            settle_ms.append((time.monotonic() - t0) * 1000)
            time.sleep(2.0)  # let any flapping show before the next cycle
        entries = master_entries(lab, kind, r2) - base
    return {"kind": kind, "cycles": cycles, "interval_ms": interval_ms, "hang_s": hang_s,
            "backup_master_entries": entries,
            "single_master_after_sigcont_ms": {
                "min": round(min(settle_ms), 1), "median": round(statistics.median(settle_ms), 1),
                "max": round(max(settle_ms), 1)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=7)
    ap.add_argument("--interval-ms", type=int, default=100)
    ap.add_argument("--hang-s", type=float, default=2.0)
    ap.add_argument("--kinds", default="vipd,keepalived")
    ap.add_argument("--out", default="netns-lab/results/hang.json")
    args = ap.parse_args(argv)
    cleanup_on_signals()
    kinds = args.kinds.split(",")
    if "keepalived" in kinds and not keepalived_available():
        print("keepalived is not installed: run scripts/bootstrap.sh", file=sys.stderr)
        return 2
    results = [run(k, args.cycles, args.interval_ms, args.hang_s) for k in kinds]
    print(f"{'daemon':<12}{'cycles':>7}{'backup MASTER entries':>24}"
          f"{'single master after SIGCONT min/med/max':>44}")
    for r in results:
        s = r["single_master_after_sigcont_ms"]
        print(f"{r['kind']:<12}{r['cycles']:>7}{r['backup_master_entries']:>24}"
              f"{s['min']:>24} / {s['median']} / {s['max']} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "results": results}, indent=1))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
