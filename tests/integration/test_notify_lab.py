"""Notify hooks on a real failover: r2's master hook runs with the router's name, state and
priority; a slow hook does not delay the takeover."""

from __future__ import annotations

import time

from lab import Lab, wait_for
from scenario import holder, start_vipd, states, vipd_config


def test_master_hook_runs_on_failover_and_a_slow_hook_delays_nothing(lab: Lab) -> None:
    out = lab.workdir / "r2.hooks"
    slow = ["/bin/sh", "-c", "sleep 3", "slow"]
    cfgs = {}
    for r, prio in (("r1", 200), ("r2", 100)):
        record = ["/bin/sh", "-c", f'echo "$VIPD_EVENT $1 $2 $3" >> {lab.workdir}/{r}.hooks',
                  "hook"]
        cfgs[r] = vipd_config(lab, r, prio, 100, mode="single-active")
        cfgs[r]["notify"] = {"backup": slow, "master": record, "timeout": "5s"}
    start_vipd(lab, "r1", cfgs["r1"])
    wait_for(lambda: holder(lab, "lanA") == ["r1"], 10, what="r1 master")
    r2 = start_vipd(lab, "r2", cfgs["r2"])
    wait_for(lambda: set(states(lab, r2)) == {"BACKUP"}, 5, what="r2 backup")
    t0 = time.monotonic()
    lab.cut("r1")
    # r2's slow backup hooks (3 s each, queued at its start) are still running: the
    # takeover does not wait for them
    wait_for(lambda: holder(lab, "lanA") == ["r2"], 2, what="r2 takes over")
    assert time.monotonic() - t0 < 1.5
    wait_for(lambda: out.exists() and len(out.read_text().splitlines()) == 2, 20,
             what="r2's master hooks ran (after the queued slow ones)")
    lines = sorted(out.read_text().splitlines())
    assert lines == ["master lanA/vrid 51/IPv4 MASTER 100",
                     "master lanB/vrid 52/IPv4 MASTER 100"], lines
