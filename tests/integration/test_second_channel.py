"""The sync link as a second channel (issue 11, first part): a master that loses a VLAN's
link tells its peer at once; a node that dies (sync link and adverts silent) is replaced
after about two advert intervals; the sync link lost alone changes nothing. 1 ms probe."""

from __future__ import annotations

import signal
import time

import pytest
from lab import Lab, run, wait_for
from scenario import (
    Probe,
    Speaker,
    holder,
    start_vipd,
    stateful_firewall,
    states,
    status,
    sync_section,
    sync_status,
    vipctl,
    vipd_config,
)

INTERVAL_MS = 100
MDI_MS = 3 * INTERVAL_MS + (256 - 100) / 256 * INTERVAL_MS  # r2, priority 100: 360.9 ms
SERVER = "198.51.100.100"


def pair(lab: Lab, mode: str = "single-active") -> tuple[Speaker, Speaker]:
    speakers = {}
    for r, prio in (("r1", 200), ("r2", 100)):
        stateful_firewall(lab, r)
        cfg = vipd_config(lab, r, prio, INTERVAL_MS, mode=mode)
        cfg["sync"] = sync_section(lab, r)
        speakers[r] = start_vipd(lab, r, cfg)
        if r == "r1":
            wait_for(lambda: holder(lab, "lanA") == ["r1"], 10, what="r1 master")
    r1, r2 = speakers["r1"], speakers["r2"]
    wait_for(lambda: set(states(lab, r2)) == {"BACKUP"} and sync_status(lab, r2)["ready"]
             and sync_status(lab, r1)["ready"], 10, what="r2 backup, sync ready")
    time.sleep(0.5)  # a few ALIVEs: each side knows the other's VLAN addresses
    return r1, r2


def test_link_loss_on_the_master_hands_over_at_once(lab: Lab) -> None:
    r1, r2 = pair(lab)
    probe = Probe(lab, "client", SERVER, 1.0, 30)
    time.sleep(1)
    lab.cut("r1", segments=["lanA"])  # r1's lanA loses carrier; the sync link stays
    wait_for(lambda: holder(lab, "lanA") == ["r2"] and holder(lab, "lanB") == ["r2"], 5,
             what="r2 holds both VLANs")
    time.sleep(1)
    p = probe.finish()
    told = sync_status(lab, r1)["handoffs_told"]
    heard = sync_status(lab, r2)["handoffs_heard"]
    print("link loss:", {k: p[k] for k in ("lost", "outage_ms", "outage_lost")}, told, heard)
    assert told >= 1 and heard >= 1
    # without the second channel r2 waits Master_Down_Interval for lanA
    assert p["outage_ms"] < MDI_MS / 3, (
        p, (lab.workdir / "r2.vipd.log").read_text()[-3000:],
        (lab.workdir / "r1.vipd.log").read_text()[-3000:])


def test_node_death_is_noticed_after_about_two_advert_intervals(lab: Lab) -> None:
    r1, r2 = pair(lab)
    probe = Probe(lab, "client", SERVER, 1.0, 30)
    time.sleep(1)
    r1.proc.send_signal(signal.SIGKILL)  # the daemon dies and the node with it:
    r1.proc.wait(5)
    lab.cut("r1")  # every port, the sync link too
    # (r1's kernel keeps the VIPs nobody removed; it is cut off)
    wait_for(lambda: "r2" in holder(lab, "lanA") and "r2" in holder(lab, "lanB"), 5,
             what="r2 holds both VLANs")
    time.sleep(1)
    p = probe.finish()
    fast = sum(i["fast_takeovers_armed"] for i in status(lab, r2)["instances"])
    print("node death:", {k: p[k] for k in ("lost", "outage_ms", "outage_lost")}, fast)
    assert fast >= 1
    assert p["outage_ms"] < MDI_MS, p  # Master_Down_Interval alone would be 361 ms + phase


def test_losing_only_the_sync_link_changes_nothing(lab: Lab) -> None:
    r1, r2 = pair(lab)
    before = [i["transitions"] for i in status(lab, r2)["instances"]]
    lab.cut("r1", segments=["sync"])
    wait_for(lambda: any("unreachable on the sync link" in x
                         for x in status(lab, r2)["problems"]), 5, what="r2 notices")
    time.sleep(3 * MDI_MS / 1000)
    assert holder(lab, "lanA") == ["r1"] and holder(lab, "lanB") == ["r1"]
    assert [i["transitions"] for i in status(lab, r2)["instances"]] == before, (
        (lab.workdir / "r2.vipd.log").read_text()[-3000:],
        (lab.workdir / "r1.vipd.log").read_text()[-3000:])
    lab.restore("r1", segments=["sync"])
    wait_for(lambda: not any("unreachable" in x for x in status(lab, r2)["problems"]), 5,
             what="the sync link is back")


ONE_WAY = """
table bridge vipd_test_oneway {{
  chain filter_forward {{
    type filter hook forward priority 0;
    iifname "{src}" oifname "{dst}" ip protocol 112 drop
  }}
}}
"""


@pytest.mark.parametrize("policy", ["takeover", "hold"])
def test_one_way_advert_loss_alarms_and_applies_the_policy(lab: Lab, policy: str) -> None:
    """r1's adverts to r2 are lost on lanA (dropped in the switch, one direction); the sync
    link and everything else work. takeover: r2 becomes a second master and both report it;
    hold: r2 stays backup, reports the broken VLAN, and nothing flaps."""
    speakers = {}
    for r, prio in (("r1", 200), ("r2", 100)):
        cfg = vipd_config(lab, r, prio, INTERVAL_MS, mode="per-vlan-active")
        cfg["sync"] = {**sync_section(lab, r), "on_vlan_silent": policy}
        speakers[r] = start_vipd(lab, r, cfg)
        if r == "r1":
            wait_for(lambda: holder(lab, "lanA") == ["r1"], 10, what="r1 master")
    r1, r2 = speakers["r1"], speakers["r2"]
    wait_for(lambda: set(states(lab, r2)) == {"BACKUP"} and sync_status(lab, r2)["ready"],
             10, what="r2 backup")
    time.sleep(0.5)
    before = [i for i in status(lab, r2)["instances"] if i["vlan"] == "lanA"][0]
    run(["ip", "netns", "exec", lab.switch, "nft", "-f", "-"],
        input=ONE_WAY.format(src=lab.port("r1", "lanA"), dst=lab.port("r2", "lanA")))
    time.sleep(4 * MDI_MS / 1000)
    a2 = [i for i in status(lab, r2)["instances"] if i["vlan"] == "lanA"][0]
    problems2 = status(lab, r2)["problems"]
    print(policy, a2["state"], a2["split_brain_seen"], a2["vlan_silent_held"], problems2)
    if policy == "takeover":
        assert a2["state"] == "MASTER"
        assert any("split brain: node" in p for p in problems2)  # seen over the sync link
        assert vipctl(lab, r2, "status").returncode == 2  # CRITICAL
        assert any("two masters" in p for p in status(lab, r1)["problems"])  # on the LAN
    else:
        assert a2["state"] == "BACKUP" and a2["vlan_silent_held"] >= 1
        assert any("silent on this VLAN but alive on the sync link" in p for p in problems2)
        assert holder(lab, "lanA") == ["r1"]
        assert a2["transitions"] == before["transitions"]  # no flapping
    run(["ip", "netns", "exec", lab.switch, "nft", "delete", "table", "bridge",
         "vipd_test_oneway"])
