"""Issue 6 in the pure cores: no silent dual master, no black hole (virtual time only).

Each test names the defect it covers; each failed on 7ed180e."""

from __future__ import annotations

import logging
from dataclasses import replace
from fractions import Fraction as F
from ipaddress import IPv4Address, IPv6Address

import pytest

from sim import VIP, Segment, make_config
from vipd.core.actions import AddVips
from vipd.core.advert import receiver_view
from vipd.core.packet import (
    VRRP_GROUP_V6,
    Advert,
    ChecksumVariant,
    DropReason,
    IpMeta,
    check_against,
    decode,
    encode_v3,
)
from vipd.core.router import RouterConfig, State, VirtualRouter

ME = IPv4Address("192.0.2.10")
PEER = IPv4Address("192.0.2.20")
VIP2 = IPv4Address("192.0.2.2")


def advert(priority: int, addrs: tuple[IPv4Address, ...] = (VIP,),
           src: IPv4Address = PEER) -> Advert:
    return Advert(3, 4, 51, priority, src, addrs, max_adver_int_cs=100,
                  checksum_variant=ChecksumVariant.PSEUDO_HEADER)


# ---------------------------------------------------------------- defect 1: IPv6 adverts


def v6_config(priority: int) -> RouterConfig:
    return RouterConfig(name=f"lan/vrid 51/IPv6/p{priority}", vrid=51, family=6, version=3,
                        priority=priority, advert_interval_cs=100,
                        addresses=(IPv6Address("fe80::200:5eff:fe00:233"),
                                   IPv6Address("2001:db8:a::1")))


def test_defect1_ipv6_advert_with_only_global_addresses_wins_the_election() -> None:
    """A peer at a higher priority that lists only its global VIP (as keepalived does) is
    heard: our router stays BACKUP, shows the peer and counts the note; no drop."""
    cfg = v6_config(100)
    r = VirtualRouter(cfg, IPv6Address("fe80::11"))
    r.start(F(0))
    src = IPv6Address("fe80::12")
    raw = encode_v3(vrid=51, priority=200, max_adver_int_cs=100,
                    addresses=[IPv6Address("2001:db8:a::1")], src=src)
    t = F(0)
    for _ in range(20):  # 20 s of adverts: never a takeover
        t += 1
        adv = decode(raw, IpMeta(6, src, VRRP_GROUP_V6, 255))
        diff = check_against(adv, receiver_view(cfg))
        assert diff is None  # the link-local is not compared when the peer lists none
        acts, dropped = r.handle_advert(t, adv, diff)
        assert dropped is None and not any(isinstance(a, AddVips) for a in acts)
        assert r.handle_timer(t) == []
    assert r.state is State.BACKUP and r.master_address == src
    assert r.counters.ipv6_not_link_local == 20
    assert r.peers[src].first_not_link_local and r.peers[src].priority == 200


# ---------------------------------------------------------------- defect 2: VIP lists


def _mismatch_segment(strict: bool) -> tuple[Segment, object, object]:
    """r1 (200) has one more VIP than r2 (100): step one of a rolling change."""
    seg = Segment()
    r1 = seg.add(make_config(200, addresses=(VIP, VIP2), strict_addresses=strict))
    r2 = seg.add(make_config(100, strict_addresses=strict))
    return seg, r1, r2


def test_defect2_relaxed_mismatch_elects_one_master_and_is_loud(
        caplog: pytest.LogCaptureFixture) -> None:
    seg, r1, r2 = _mismatch_segment(strict=False)
    caplog.set_level(logging.WARNING, "vipd.vrrp")
    seg.start(r2)
    seg.start(r1)
    seg.run_for(30)
    assert [n.router.config.priority for n in seg.masters()] == [200]
    r = r2.router
    assert r.state is State.BACKUP
    diff = r.peers[r1.address].address_diff
    assert diff is not None and diff.extra == (VIP2,) and diff.missing == ()
    assert r.mismatched_peers(seg.now) == [r1.address]
    assert r1.router.mismatched_peers(seg.now) == []  # r2 is a silent backup
    # rate-limited: one WARNING per minute and peer, naming both lists
    warnings = [rec.getMessage() for rec in caplog.records if "advertises" in rec.message]
    assert len(warnings) == 1
    assert "[192.0.2.1, 192.0.2.2], ours [192.0.2.1]" in warnings[0]
    seg.run_for(61)
    assert len([x for x in caplog.records if "advertises" in x.message]) == 2


def test_defect2_strict_mismatch_is_dropped_but_the_peer_stays_visible() -> None:
    """RFC 3768 7.1 drop: both become master, and both say so (dual master)."""
    seg, r1, r2 = _mismatch_segment(strict=True)
    seg.start(r2)
    seg.start(r1)
    seg.run_for(30)
    assert len(seg.masters()) == 2
    assert r2.drops.get(DropReason.ADDRESS_MISMATCH, 0) > 0
    for node, other in ((r1, r2), (r2, r1)):
        r = node.router
        assert r.mismatched_peers(seg.now) == [other.address]
        assert r.dual_master_recent(seg.now), node.router.config.name
        assert r.counters.dual_master_episodes >= 1


def test_defect2_strict_lets_the_owner_through() -> None:
    r = VirtualRouter(make_config(100, strict_addresses=True), ME)
    r.start(F(0))
    acts, dropped = r.handle_advert(F(1), advert(255, (VIP, VIP2)),
                                    check_against(advert(255, (VIP, VIP2)),
                                                  receiver_view(r.config)))
    assert dropped is None and r.master_priority == 255


# ---------------------------------------------------------------- defect 8: maintenance


@pytest.mark.parametrize("reason", ["maintenance", "group fault"])
def test_defect8_drained_router_never_takes_over_after_link_flaps(reason: str) -> None:
    r = VirtualRouter(make_config(200, interval_cs=10), ME)
    r.start(F(0))
    t = r.get_timer()
    assert t is not None
    r.handle_timer(t)
    assert r.state is State.MASTER
    r.set_drain(t, reason, True)
    now = t
    for _ in range(10):  # link flaps, each followed by a long quiet time with no master
        now += F(1, 10)
        r.set_link(now, False)
        now += F(1, 10)
        acts = r.set_link(now, True)
        assert r.state is State.BACKUP and r.master_down_timer is None
        end = now + 5
        while (deadline := r.get_timer()) is not None and deadline <= end:
            acts += r.handle_timer(deadline)
        now = end
        assert not any(isinstance(a, AddVips) for a in acts)
        assert r.state is State.BACKUP
    assert r.counters.became_master == 1
    # once the drain ends it takes part again
    r.set_drain(now, reason, False)
    assert r.master_down_timer is not None


def test_defect8_drained_router_in_a_segment_stays_out() -> None:
    seg = Segment()
    a = seg.add(make_config(200, interval_cs=10))
    b = seg.add(replace(make_config(100, interval_cs=10)))
    seg.start(a)
    seg.start(b)
    seg.run_for(1)
    seg.maintenance(a, True)
    seg.run_for(1)
    assert seg.masters() == [b]
    for _ in range(5):
        seg.crash(b)  # nobody left to advertise: a drained router still holds back
        seg.set_link(a, False)
        seg.set_link(a, True)
        seg.run_for(2)
        assert seg.masters() == [] and not a.holds_vips
        seg.start(b)
        seg.run_for(1)
