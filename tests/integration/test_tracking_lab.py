"""What keepalived users reach for, on the pair lab: a tracked uplink, a track script with
weight and rise/fall, `vipctl demote` of a group across a reload and a restart, unicast
peers (vipd with vipd, vipd with keepalived's unicast_peer)."""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from lab import Lab, wait_for
from scenario import (
    holder,
    keepalived_available,
    rewrite_config,
    start_keepalived,
    start_vipd,
    states,
    status,
    unicast_peers,
    vipctl,
    vipd_config,
)

INTERVAL = 100


def config(lab: Lab, router: str, priority: int, **extra: Any) -> dict[str, Any]:
    cfg = vipd_config(lab, router, priority, INTERVAL)
    cfg.update(extra)
    return cfg


def instance(cfg: dict[str, Any], vlan: str) -> dict[str, Any]:
    inst: dict[str, Any] = next(v for v in cfg["vlans"] if v["name"] == vlan)["instances"][0]
    return inst


def router_status(lab: Lab, sp: Any, vlan: str) -> dict[str, Any]:
    st = status(lab, sp)
    found: dict[str, Any] = next(i for i in st["instances"] if i["vlan"] == vlan)
    return found


def test_a_tracked_uplink_moves_exactly_its_routers(lab: Lab) -> None:
    cfgs = {}
    for r, prio in (("r1", 200), ("r2", 100)):
        cfgs[r] = config(lab, r, prio, trackers={"uplink": {"interface": "sync0"}})
        next(v for v in cfgs[r]["vlans"] if v["name"] == "lanA")["track"] = ["uplink"]
    r1 = start_vipd(lab, "r1", cfgs["r1"])
    start_vipd(lab, "r2", cfgs["r2"])
    wait_for(lambda: holder(lab, "lanA") == ["r1"] and holder(lab, "lanB") == ["r1"], 10,
             what="r1 master of both")
    t0 = time.monotonic()
    lab.cut("r1", segments=["sync"])  # r1's uplink (here its sync link) goes down
    wait_for(lambda: holder(lab, "lanA") == ["r2"], 2, interval=0.005,
             what="lanA moves to r2")
    moved_ms = (time.monotonic() - t0) * 1000
    # r1 said goodbye (priority 0) on the working VLAN: r2 waited Skew_Time (61 ms at
    # priority 100), not Master_Down_Interval (361 ms)
    print(f"uplink lost -> lanA on r2 in {moved_ms:.0f} ms")
    assert moved_ms < 361
    assert holder(lab, "lanB") == ["r1"]  # not following the uplink: stays
    a = router_status(lab, r1, "lanA")
    assert a["state"] == "FAULT" and a["last_transition"]["cause"] == "track uplink"
    assert a["priority_contributions"] == [
        {"source": "track uplink (vlan lanA)", "delta": 0, "fault": True}]
    st = status(lab, r1)
    assert not st["healthy"] and any("track uplink" in p for p in st["problems"])
    assert a["priority_zero_sent"] >= 1
    lab.restore("r1", segments=["sync"])
    wait_for(lambda: holder(lab, "lanA") == ["r1"], 3, what="lanA back on r1 (preempt)")
    assert holder(lab, "lanB") == ["r1"]


def test_a_failing_script_demotes_by_its_weight_with_rise_and_fall(lab: Lab) -> None:
    shared = Path(tempfile.mkdtemp(prefix="vipd-track-"))  # where user nobody can look
    shared.chmod(0o755)
    try:
        run_script_test(lab, shared / "gw-down")
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def run_script_test(lab: Lab, flag: Path) -> None:
    # fails unless it runs as the configured user: then r1 would never be master
    script = ["/bin/sh", "-c", f'test "$(id -un)" = nobody && test ! -e {flag}']
    tracker = {"gw": {"script": script, "interval": "100ms", "timeout": "1s", "rise": 2,
                      "fall": 3, "weight": -150, "user": "nobody"}}
    r1 = start_vipd(lab, "r1", config(lab, "r1", 200, trackers=tracker, track=["gw"]))
    start_vipd(lab, "r2", config(lab, "r2", 100))
    wait_for(lambda: holder(lab, "lanA") == ["r1"] and holder(lab, "lanB") == ["r1"], 10,
             what="r1 master")
    flag.touch()
    wait_for(lambda: holder(lab, "lanA") == ["r2"] and holder(lab, "lanB") == ["r2"], 5,
             what="both VLANs on r2 once the script failed 3 times")
    a = router_status(lab, r1, "lanA")
    assert a["effective_priority"] == 50 and a["state"] == "BACKUP"
    assert a["priority_contributions"] == [
        {"source": "track gw (node)", "delta": -150, "fault": False}]
    gw = next(t for t in status(lab, r1)["tracking"]["trackers"] if t["name"] == "gw")
    assert gw["ok"] is False and gw["failures"] >= 3 and gw["last"] == "exit 1"
    flag.unlink()
    wait_for(lambda: holder(lab, "lanA") == ["r1"] and holder(lab, "lanB") == ["r1"], 5,
             what="back on r1 after 2 passes")
    assert router_status(lab, r1, "lanA")["effective_priority"] == 200


def test_demote_moves_a_group_and_survives_reload_and_restart(lab: Lab) -> None:
    groups = {"edge": {"vlans": ["lanA", "lanB"]}}
    cfg1 = config(lab, "r1", 200, groups=groups)
    r1 = start_vipd(lab, "r1", cfg1)
    start_vipd(lab, "r2", config(lab, "r2", 100, groups=groups))
    wait_for(lambda: holder(lab, "lanA") == ["r1"] and holder(lab, "lanB") == ["r1"], 10,
             what="r1 master")
    out = vipctl(lab, r1, "demote", "edge", "+150")
    assert out.returncode == 0 and "demotion 150" in out.stdout, out
    bad = vipctl(lab, r1, "demote", "nosuch", "+1")
    assert bad.returncode == 3 and "not a group" in bad.stderr  # usage: UNKNOWN
    wait_for(lambda: holder(lab, "lanA") == ["r2"] and holder(lab, "lanB") == ["r2"], 3,
             what="the group moves to r2")
    # a rolling config change (a new VIP option on lanA's instance): demotion stays
    instance(cfg1, "lanA")["garp"] = {"count": 2, "interval": "100ms"}
    rewrite_config(r1, cfg1)
    assert vipctl(lab, r1, "reload").returncode == 0
    wait_for(lambda: status(lab, r1)["reloads"] == 1, 3, what="reloaded")
    assert status(lab, r1)["tracking"]["demotions"] == {"edge": 150}
    assert {i["effective_priority"] for i in status(lab, r1)["instances"]} == {50}
    assert holder(lab, "lanA") == ["r2"] and holder(lab, "lanB") == ["r2"]
    # a restart of vipd keeps it too (kept beside the control socket, as carpdemote)
    lab.stop_process(r1.proc, signal.SIGTERM)
    r1 = start_vipd(lab, "r1", cfg1)
    wait_for(lambda: set(states(lab, r1)) == {"BACKUP"}, 5, what="r1 back as backup")
    assert status(lab, r1)["tracking"]["demotions"] == {"edge": 150}
    assert holder(lab, "lanA") == ["r2"] and holder(lab, "lanB") == ["r2"]
    assert vipctl(lab, r1, "demote", "edge", "0").returncode == 0
    wait_for(lambda: holder(lab, "lanA") == ["r1"] and holder(lab, "lanB") == ["r1"], 3,
             what="back on r1")


def unicast_config(lab: Lab, router: str, priority: int) -> dict[str, Any]:
    cfg = config(lab, router, priority)
    for v in cfg["vlans"]:
        v["instances"][0]["unicast_peers"] = unicast_peers(lab, router, v["name"])
    return cfg


def test_unicast_pair_elects_fails_over_and_ignores_the_multicast_group(lab: Lab) -> None:
    r1 = start_vipd(lab, "r1", unicast_config(lab, "r1", 200))
    r2 = start_vipd(lab, "r2", unicast_config(lab, "r2", 100))
    wait_for(lambda: holder(lab, "lanA") == ["r1"] and holder(lab, "lanB") == ["r1"], 10,
             what="r1 master")
    wait_for(lambda: set(states(lab, r2)) == {"BACKUP"}, 3, what="r2 backup")
    a2 = router_status(lab, r2, "lanA")
    assert a2["unicast_peers"] == unicast_peers(lab, "r2", "lanA")
    assert [p["address"] for p in a2["peers"]] == unicast_peers(lab, "r2", "lanA")
    # a multicast speaker on the VLAN (vipd on the client, same VRID, priority 250) is
    # not a configured peer: dropped and counted, the election stands
    stranger = config(lab, "client", 250)
    stranger["vlans"] = [{"name": "lanA", "interface": "eth0",
                          "instances": [instance(stranger, "lanA")]}]
    st = start_vipd(lab, "client", stranger)
    wait_for(lambda: router_status(lab, r2, "lanA")["drops"].get("unknown_peer", 0) > 5, 3,
             what="the stranger's adverts dropped as unknown_peer")
    assert holder(lab, "lanA") == ["r1"]
    assert router_status(lab, r1, "lanA")["drops"].get("unknown_peer", 0) > 5
    lab.stop_process(st.proc)
    lab.cut("r1")
    wait_for(lambda: holder(lab, "lanA") == ["r2"] and holder(lab, "lanB") == ["r2"], 2,
             what="r2 takes over")
    lab.restore("r1")
    wait_for(lambda: holder(lab, "lanA") == ["r1"] and holder(lab, "lanB") == ["r1"], 3,
             what="r1 preempts back")
    assert router_status(lab, r1, "lanA")["dual_master"] is False


@pytest.mark.skipif(not keepalived_available(), reason="keepalived is not installed")
def test_unicast_against_keepalived_unicast_peer(lab: Lab) -> None:
    ka = start_keepalived(lab, "r1", 200, INTERVAL, unicast=True)
    r2 = start_vipd(lab, "r2", unicast_config(lab, "r2", 100))
    wait_for(lambda: holder(lab, "lanA") == ["r1"] and holder(lab, "lanB") == ["r1"], 10,
             what="keepalived master")
    wait_for(lambda: set(states(lab, r2)) == {"BACKUP"}, 3, what="vipd backup")
    a2 = router_status(lab, r2, "lanA")
    assert [p["address"] for p in a2["peers"]] == unicast_peers(lab, "r2", "lanA")
    assert a2["drops"] == {}, a2["drops"]
    lab.cut("r1")
    wait_for(lambda: holder(lab, "lanB") == ["r2"], 2, what="vipd takes over")
    lab.restore("r1")
    # keepalived hears vipd's unicast adverts (checksum over its own address) and preempts
    wait_for(lambda: holder(lab, "lanA") == ["r1"] and holder(lab, "lanB") == ["r1"], 5,
             what="keepalived preempts back")
    wait_for(lambda: set(states(lab, r2)) == {"BACKUP"}, 3, what="vipd backup again")
    lab.stop_process(ka.proc)
