"""Plots of the benchmarks' results, vipd against keepalived (matplotlib: the `plots`
extra). The benchmark scripts call these after writing their JSON when matplotlib is
there; by hand:

    .venv/bin/python netns-lab/plots.py      # every plot from netns-lab/results/ to docs/img/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
IMG = HERE.parent / "docs" / "img"
COLORS = {"vipd": "#1f77b4", "keepalived": "#d62728"}


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def failover(results: list[dict[str, Any]], out: Path) -> Path | None:
    """Outage per run (the probe's longest loss), one panel per advert interval for a cut
    of the master, and one for planned handoffs; each run a dot, the median a bar. None
    (nothing drawn) for results of other faults only (the second channel's run)."""
    cuts = sorted({r["interval_ms"] for r in results if r["fault"] == "cut"}, reverse=True)
    planned = [f for f in ("sigterm", "maintenance") if any(r["fault"] == f for r in results)]
    panels = [("cut", i) for i in cuts] + [(f, None) for f in planned]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (fault, interval) in zip(axes[0], panels, strict=True):
        runs = [r for r in results if r["fault"] == fault
                and (interval is None or r["interval_ms"] == interval)]
        kinds = [k for k in ("vipd", "keepalived") if any(r["kind"] == k for r in runs)]
        for x, kind in enumerate(kinds):
            ys = sorted(r["outage_ms"] for r in runs if r["kind"] == kind)
            ax.scatter([x] * len(ys), ys, color=COLORS[kind], s=18, alpha=0.7)
            if ys:
                med = ys[len(ys) // 2]
                ax.hlines(med, x - 0.25, x + 0.25, color=COLORS[kind])
                ax.annotate(f"{med:.0f}", (x + 0.27, med), fontsize=8, va="center")
        if interval is not None:
            mdi = 3 * interval + (256 - 100) * interval / 256
            ax.axhline(mdi, color="grey", ls=":", lw=1)
            ax.set_title(f"cut, adverts {interval} ms\n(dotted: Master_Down_Interval)",
                         fontsize=9)
        else:
            ax.set_title(f"planned: {fault}", fontsize=9)
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set_xlim(-0.6, len(kinds) - 0.2)
        ax.set_ylim(0, max(10.0, ax.get_ylim()[1]))  # a run of zeros still shows a scale
        ax.set_ylabel("outage, ms")
    fig.suptitle("failover outage per run (1 ms probe through the VIP)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def scale(results: list[dict[str, Any]], out: Path) -> Path:
    """Per router count: steady CPU per instance, RSS, failover time, for both kinds."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for kind in ("vipd", "keepalived"):
        rs = sorted((r for r in results if r["kind"] == kind and r.get("cpu_master_pct")
                     is not None), key=lambda r: r["routers"])
        if not rs:
            continue
        n = [r["routers"] for r in rs]
        c = COLORS[kind]
        axes[0].plot(n, [1000 * r["cpu_master_pct"] / r["routers"] for r in rs], "o-",
                     color=c, label=f"{kind} master")
        axes[0].plot(n, [1000 * r["cpu_backup_pct"] / r["routers"] for r in rs], "s--",
                     color=c, label=f"{kind} backup")
        axes[1].plot(n, [r["rss_master_mib"] for r in rs], "o-", color=c, label=kind)
        axes[2].plot(n, [r["failover_s"] for r in rs], "o-", color=c, label=kind)
    axes[0].set_title("steady CPU per 1000 routers, %", fontsize=9)
    axes[1].set_title("RSS per node, MiB", fontsize=9)
    axes[2].set_title("all VIPs moved after the cut, s", fontsize=9)
    axes[2].axhline(3 + 156 / 256, color="grey", ls=":", lw=1)
    for ax in axes:
        ax.set_xlabel("virtual routers per node")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def from_files(results_dir: Path = RESULTS, img: Path = IMG) -> list[Path]:
    made: list[Path | None] = []
    f = results_dir / "failover.json"
    if f.exists():
        made.append(failover(json.loads(f.read_text())["results"], img / "failover.png"))
    s = results_dir / "scale.json"
    if s.exists():
        made.append(scale(json.loads(s.read_text())["results"], img / "scale.png"))
    return [p for p in made if p is not None]


def after_benchmark(kind: str, results: list[dict[str, Any]], out_json: str | Path) -> None:
    """Called by a benchmark script with its results: draw its plot if matplotlib is
    there, say so if not. Results written to the checked-in file (results/KIND.json)
    redraw docs/img; results written elsewhere (a partial or trial run) get their plot
    beside their JSON file."""
    if not available():
        print("(no plot: matplotlib, the `plots` extra, is not installed)")
        return
    out_json = Path(out_json)
    checked_in = out_json.resolve() == (RESULTS / f"{kind}.json").resolve()
    img = IMG / f"{kind}.png" if checked_in else out_json.with_suffix(".png")
    out = {"failover": failover, "scale": scale}[kind](results, img)
    print(f"plot: {out}" if out else "(no plot for these faults)")


if __name__ == "__main__":
    if not available():
        print("matplotlib is not installed: .venv/bin/pip install -e '.[plots]'",
              file=sys.stderr)
        sys.exit(1)
    for p in from_files():
        print(p)
