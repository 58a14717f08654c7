"""The benchmarks' plots (netns-lab/plots.py) draw from the results the scripts write."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "netns-lab"))

import plots  # noqa: E402


@pytest.mark.skipif(not plots.available(), reason="matplotlib (the plots extra) is not "
                    "installed")
def test_plots_are_drawn_from_the_checked_in_results(tmp_path: Path) -> None:
    made = plots.from_files(img=tmp_path)
    assert sorted(p.name for p in made) == ["failover.png", "scale.png"]
    for p in made:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    # and from a benchmark's own results, as its script hands them over
    runs = json.loads((plots.RESULTS / "failover.json").read_text())["results"]
    assert plots.failover(runs[:4], tmp_path / "f.png").stat().st_size > 5_000


@pytest.mark.skipif(not plots.available(), reason="matplotlib (the plots extra) is not "
                    "installed")
def test_results_of_faults_without_a_panel_draw_nothing(tmp_path: Path) -> None:
    """bench_failover.py --faults linkloss,nodedeath (the second channel's run) has no cut
    or planned handoff to draw: no plot, no error (it used to raise after the run)."""
    runs = json.loads((plots.RESULTS / "failover-second-channel.json").read_text())["results"]
    assert runs and plots.failover(runs, tmp_path / "f.png") is None
    plots.after_benchmark("failover", runs, tmp_path / "second.json")
    assert not (tmp_path / "second.png").exists()
