"""The node core (vipd.core.node) in virtual time: events in, actions out, work counted."""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction
from ipaddress import IPv4Address, ip_interface

from vipd.core.node import (
    AnnounceVips,
    Node,
    NodeAction,
    RepairVips,
    RouterSpec,
    Send,
    SetVips,
    Transition,
)
from vipd.core.packet import VRRP_GROUP_V4, DropReason, IpMeta, encode_v3
from vipd.core.router import RouterConfig

PEER = IPv4Address("192.0.2.12")


def spec(iface: str, vrid: int, priority: int = 100, **kw: object) -> RouterSpec:
    vip = ip_interface(f"198.51.100.{vrid % 250 + 1}/24")
    cfg = RouterConfig(name=f"{iface}/vrid {vrid}/IPv4", vrid=vrid, family=4, version=3,
                       priority=priority, advert_interval_cs=100, addresses=(vip.ip,))
    return RouterSpec(iface, iface, replace(cfg, **kw), (vip,))  # type: ignore[arg-type]


def node(specs: list[RouterSpec], mode: str = "per-vlan-active") -> Node:
    n = Node(specs, mode)
    for name in n.interfaces():
        n.set_addresses(name, [(ip_interface("192.0.2.11/24"), 0)])
        n.set_link(Fraction(0), name, True)
    n.start(Fraction(0))
    return n


def drain(n: Node) -> list[NodeAction]:
    return list(n.pop_actions())


def take_over(n: Node) -> Fraction:
    """Run the node's timers up to the next takeover: a Master_Down_Timer is woken for on
    a coarse grid first (COARSE_S), which files it exactly; then it runs."""
    for _ in range(5):
        t = n.get_timer()
        assert t is not None
        takeover = n.timer_is_takeover()
        n.handle_timer(t)
        if takeover:
            return t
    raise AssertionError("no takeover came due")


def advert(vrid: int, priority: int = 200) -> bytes:
    return encode_v3(vrid=vrid, priority=priority, max_adver_int_cs=100,
                     addresses=[IPv4Address(f"198.51.100.{vrid % 250 + 1}")], src=PEER)


META = IpMeta(4, PEER, VRRP_GROUP_V4, 255)


def test_vips_are_installed_then_announced_never_before() -> None:
    n = node([spec("lan0", 1)])
    drain(n)
    take_over(n)
    acts = drain(n)
    key = ("lan0", 1, 4)
    assert SetVips(key, True) in acts and not any(isinstance(a, AnnounceVips) for a in acts)
    assert any(isinstance(a, Send) for a in acts)
    assert any(isinstance(a, Transition) and a.new == "MASTER" for a in acts)
    n.vips_applied(n.get_timer() or Fraction(0), key, True, True)
    assert drain(n) == [AnnounceVips(key)]


def test_failed_installs_are_retried_then_give_up_mastership() -> None:
    n = node([spec("lan0", 1)])
    key = ("lan0", 1, 4)
    now = take_over(n)
    drain(n)
    for _ in range(3):
        n.vips_applied(now, key, True, False)
        state = n.slots[key].router.state.value
        if state == "FAULT":
            break
        t = n.get_timer()  # the retry (one interval later) or the next advert
        assert t is not None and t <= now + 1
        while not any(isinstance(a, SetVips) for a in drain(n)):
            now = n.get_timer() or now
            n.handle_timer(now)
    assert n.slots[key].router.state.value == "FAULT"
    assert n.slots[key].router.last_transition is not None
    assert n.slots[key].router.last_transition.cause == "3 VIP install failures"


def test_the_owner_never_removes_its_own_address() -> None:
    n = node([spec("lan0", 1, priority=255)])
    assert n.slots["lan0", 1, 4].router.state.value == "MASTER"
    n.shutdown(Fraction(1))
    n.handle_timer(Fraction(10))
    assert not [a for a in drain(n) if isinstance(a, SetVips) and not a.present]


def test_a_missing_vip_is_repaired_by_a_master_only() -> None:
    n = node([spec("lan0", 1), spec("lan0", 2)])
    take_over(n)
    drain(n)
    n.vip_missing(("lan0", 1, 4))
    assert drain(n) == [RepairVips(("lan0", 1, 4))]
    n.set_maintenance(Fraction(5), True)
    drain(n)
    n.vip_missing(("lan0", 1, 4))
    assert drain(n) == []


def test_one_takeover_costs_the_same_among_1000_routers() -> None:
    """One router's Master_Down_Timer runs out while 999 others keep hearing their master:
    the node calls into that one router only, and files it in one timer bucket."""
    def cost(per_vlan: int) -> tuple[int, int, int]:
        specs = [spec(f"lan{v}", i + 1) for v in range(4) for i in range(per_vlan)]
        n = node(specs)
        drain(n)
        at = Fraction(1, 2)  # everyone but lan0/vrid 1 hears its master
        for v in range(4):
            n.receive(f"lan{v}", 4, [(advert(i + 1), META, at) for i in range(per_vlan)
                                     if (v, i) != (0, 0)])
        drain(n)
        calls, buckets = n.stats.router_calls, n.stats.timer_buckets
        take_over(n)
        acts = drain(n)
        assert n.slots["lan0", 1, 4].router.state.value == "MASTER"
        return (n.stats.router_calls - calls, n.stats.timer_buckets - buckets, len(acts))

    small, large = cost(2), cost(250)
    assert small == large
    # one router call; buckets: its exact Master_Down_Timer (filed by the coarse wake-up),
    # then its next advert and its announcement rounds; 3 actions: send, install,
    # transition
    assert large == (1, 3, 3)


def test_a_thousand_masters_advertise_from_one_timer_bucket() -> None:
    n = node([spec(f"lan{v}", i + 1) for v in range(4) for i in range(250)])
    t0 = take_over(n)  # all take over at once
    drain(n)
    before = n.stats.timer_buckets
    sends = 0
    while (t := n.get_timer()) is not None and t <= t0 + 5:
        assert not n.timer_is_takeover()
        n.handle_timer(t)
        sends += sum(isinstance(a, Send) for a in drain(n))
    assert sends == 5 * 1000
    # one bucket per instant (5 adverts, 2 more announcement rounds), not per router
    assert n.stats.timer_buckets - before == 7


def test_single_active_link_loss_drains_every_other_router_once() -> None:
    n = node([spec(f"lan{v}", i + 1) for v in range(2) for i in range(3)], "single-active")
    take_over(n)
    drain(n)
    calls = n.stats.router_calls
    n.set_link(Fraction(4), "lan0", False)
    states = {k: s.router.state.value for k, s in n.slots.items()}
    assert [states["lan0", i, 4] for i in (1, 2, 3)] == ["FAULT"] * 3
    assert [states["lan1", i, 4] for i in (1, 2, 3)] == ["BACKUP"] * 3
    assert all(n.slots["lan1", i, 4].router.drains == {"group fault"} for i in (1, 2, 3))
    assert n.stats.router_calls - calls == 5  # the group drain: the 5 others, once each
    removes = [a.key for a in drain(n) if isinstance(a, SetVips) and not a.present]
    assert removes == [("lan0", i, 4) for i in (1, 2, 3)]
    # the drained masters hold their VIPs for the peer taking over (RFC 9568 6.4.3)
    assert all(n.slots["lan1", i, 4].router.holding_vips for i in (1, 2, 3))


def test_reload_keeps_unchanged_routers_and_retires_the_others() -> None:
    a, b = spec("lan0", 1), spec("lan0", 2)
    n = node([a, b])
    take_over(n)
    drain(n)
    kept_router = n.slots[a.key].router
    plan = n.plan_reload([a, replace(b, config=replace(b.config, priority=150)),
                          spec("lan1", 3)], "per-vlan-active")
    assert plan.kept == {a.key}
    retired = n.retire(Fraction(3), plan)
    assert [s.key for s in retired] == [b.key]
    acts = drain(n)
    assert SetVips(b.key, False) in acts  # released at once: the replacement starts afresh
    assert any(isinstance(x, Send) and x.key == b.key for x in acts)  # priority 0
    n.adopt(Fraction(3), plan)
    assert n.slots[a.key].router is kept_router
    assert n.interfaces() == ["lan0", "lan1"]
    n.set_addresses("lan1", [(ip_interface("192.0.2.11/24"), 0)])
    n.set_link(Fraction(3), "lan1", True)
    n.start(Fraction(3), [s.key for s in plan.added()], "reload")
    assert {k: s.router.state.value for k, s in n.slots.items()} == {
        a.key: "MASTER", b.key: "BACKUP", ("lan1", 3, 4): "BACKUP"}


def test_receive_counts_drops_where_they_belong() -> None:
    n = node([spec("lan0", 1)])
    n.receive("lan0", 4, [(advert(99), META, Fraction(0)),  # unknown VRID
                          (b"\x31", META, Fraction(0)),  # too short
                          (advert(1), META, Fraction(0)),
                          (advert(1), META, Fraction(0))])  # superseded by the next
    link = n.links["lan0"].drops[4]
    assert (link[DropReason.UNKNOWN_VRID], link[DropReason.SUPERSEDED]) == (1, 1)
    assert sum(link.values()) == 3
    assert n.slots["lan0", 1, 4].router.counters.adverts_received == 1
