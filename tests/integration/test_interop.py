"""vipd against real peers: keepalived 2.2 (Debian) in the same VRRP group, and a
scapy-crafted peer that lists only global IPv6 addresses."""

from __future__ import annotations

import signal
import sys
import time

import pytest
from lab import Lab, wait_for
from scenario import (
    Speaker,
    holder,
    keepalived_available,
    start_keepalived,
    start_vipd,
    status,
    vipd_config,
)

needs_keepalived = pytest.mark.skipif(not keepalived_available(),
                                      reason="keepalived is not installed")


@needs_keepalived
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


# variant: (VRRP version, family, advert interval in ms)
VARIANTS = {"v3-ipv4": (3, "ipv4", 100), "v3-ipv6": (3, "ipv6", 100), "v2": (2, "ipv4", 1000)}


@needs_keepalived
@pytest.mark.parametrize("vipd_higher", [True, False], ids=["vipd-200", "vipd-100"])
@pytest.mark.parametrize("vmac", [False, True], ids=["no-vmac", "vmac"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_interop_matrix_restore_and_preemption(lab: Lab, variant: str, vmac: bool,
                                               vipd_higher: bool) -> None:
    """Issue 6: v3/IPv4, v3/IPv6 and v2, with and without a virtual MAC, either priority
    order. The lower-priority node starts alone and becomes master; the higher one starts
    and preempts; its ports are cut and the lower one takes over; they are restored and
    the higher one preempts again. One holder at every step."""
    version, fam, interval_ms = VARIANTS[variant]
    mdi_s = (3 * interval_ms + (256 - 100) * interval_ms / 256) / 1000
    deadline = 2 * mdi_s + 3

    def start(router: str, priority: int) -> Speaker:
        if (router == "r1") == vipd_higher:
            # keepalived lists no link-local and drops adverts whose count differs
            return start_vipd(lab, router, vipd_config(
                lab, router, priority, interval_ms, (fam,), virtual_mac=vmac, version=version,
                advertise_link_local=False))
        return start_keepalived(lab, router, priority, interval_ms, family=fam,
                                version=version, use_vmac=vmac)

    def only(router: str, what: str) -> None:
        wait_for(lambda: holder(lab, "lanA", fam) == [router]
                 and holder(lab, "lanB", fam) == [router], deadline, what=what)

    low = start("r2", 100)
    only("r2", "the lower-priority node master alone")
    high = start("r1", 200)
    only("r1", "the higher-priority node preempts")
    lab.cut("r1")
    wait_for(lambda: holder(lab, "lanA", fam) == ["r2"], deadline, what="takeover after cut")
    lab.restore("r1")
    only("r1", "preemption after restore")
    vipd = high if high.kind == "vipd" else low
    for inst in status(lab, vipd)["instances"]:
        # keepalived is heard and never dropped: no mismatch, no decode drop
        assert inst["drops"] == {}, inst["drops"]
        assert inst["address_mismatch_peers"] == []
        assert any(p["priority"] in (100, 200) for p in inst["peers"])
    assert low.proc.poll() is None and high.proc.poll() is None


SCAPY_PEER = r'''
import sys, time
from scapy.all import Ether, IPv6, conf, sendp
from scapy.layers.vrrp import VRRPv3
conf.verb = 0
iface, src, prio, duration = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
# Only the global VIP, no link-local first: what keepalived sends for IPv6.
pkt = (Ether(dst="33:33:00:00:00:12") / IPv6(src=src, dst="ff02::12", hlim=255)
       / VRRPv3(vrid=51, priority=prio, ipcount=1, adv=10, addrlist=["2001:db8:a::1"]))
end = time.monotonic() + duration
print("sending", flush=True)
while time.monotonic() < end:
    sendp(pkt, iface=iface)
    time.sleep(0.1)
'''


def test_ipv6_peer_listing_only_global_addresses_wins_over_vipd(lab: Lab) -> None:
    """Issue 6, defect 1: such adverts used to be dropped (`ipv6_not_link_local`), so vipd
    became a second master for good and showed no peer."""
    script = lab.workdir / "scapy_peer.py"
    script.write_text(SCAPY_PEER)
    peer = lab.popen("client", [sys.executable, str(script), "eth0", "fe80::99", "200", "30"],
                     log="scapy_peer.log")
    wait_for(lambda: "sending" in (lab.workdir / "scapy_peer.log").read_text(), 20,
             what="the scapy peer sends")
    r1 = start_vipd(lab, "r1", vipd_config(lab, "r1", 100, 100, ("ipv6",)))

    def v6() -> dict:  # type: ignore[type-arg]
        return [i for i in status(lab, r1)["instances"] if i["vlan"] == "lanA"][0]

    wait_for(lambda: v6()["master"] == "fe80::99", 5, what="vipd hears the scapy peer")
    until = time.monotonic() + 1.5  # > 3 x Master_Down_Interval: never a takeover
    while time.monotonic() < until:
        assert "r1" not in holder(lab, "lanA", "ipv6")
        time.sleep(0.05)
    inst = v6()
    assert inst["state"] == "BACKUP" and inst["became_master"] == 0
    p = inst["peers"][0]
    assert (p["address"], p["priority"], p["first_address_not_link_local"]) == (
        "fe80::99", 200, True)
    assert inst["notes"]["ipv6_not_link_local"] > 0 and inst["drops"] == {}
    assert inst["address_mismatch_peers"] == []
    lab.stop_process(peer)  # the peer goes away: vipd takes over
    wait_for(lambda: holder(lab, "lanA", "ipv6") == ["r1"], 3, what="takeover")
