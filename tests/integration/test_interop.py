"""vipd against a real peer: keepalived 2.2 (Debian) in the same VRRP group."""

from __future__ import annotations

import signal

import pytest
from lab import Lab, wait_for
from scenario import holder, keepalived_available, start_keepalived, start_vipd, status, vipd_config


@pytest.mark.skipif(not keepalived_available(), reason="keepalived is not installed")
def test_vipd_and_keepalived_elect_and_hand_over(lab: Lab) -> None:
    r2 = start_keepalived(lab, "r2", 100, 100)
    wait_for(lambda: holder(lab, "lanA") == ["r2"], 10, what="keepalived master alone")
    r1 = start_vipd(lab, "r1", vipd_config(lab, "r1", 200, 100))
    # vipd hears keepalived (pseudo-header checksum), outranks it and preempts; keepalived
    # accepts vipd's adverts and steps down
    wait_for(lambda: holder(lab, "lanA") == ["r1"] and holder(lab, "lanB") == ["r1"], 5,
             what="vipd preempts keepalived")
    inst = status(lab, r1)["instances"][0]
    peer = inst["peers"][0]
    assert (peer["address"], peer["priority"], peer["checksum"]) == (
        "192.0.2.12", 100, "pseudo-header")
    assert inst["drops"] == {}
    # a graceful vipd stop hands the VIPs back to keepalived
    r1.proc.send_signal(signal.SIGTERM)
    assert r1.proc.wait(5) == 0
    wait_for(lambda: holder(lab, "lanA") == ["r2"], 3, what="keepalived takes over")
    assert r2.proc.poll() is None
