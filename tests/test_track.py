"""Tracking, demotion, groups and unicast peers in the node core, in virtual time."""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from ipaddress import IPv4Address, ip_interface
from pathlib import Path

import pytest
from test_node import drain, spec, take_over

from sim import Segment, make_config
from vipd.config import ConfigError, loads, router_specs
from vipd.core.node import Node, Send
from vipd.core.packet import VRRP_GROUP_V4, DropReason, IpMeta, decode
from vipd.core.router import State
from vipd.core.track import (
    Contribution,
    RiseFall,
    TrackerSpec,
    TrackRef,
    TrackState,
    demoted,
    effective,
)

UPLINK = TrackerSpec("uplink", "interface", interface="up0")
UPLINK_W = TrackerSpec("uplink", "interface", interface="up0", weight=-60)
GW = TrackerSpec("gw", "script", argv=("/bin/true",), weight=-30)
LOAD = TrackerSpec("load", "file", path="/run/load", weight=-2)
SPECS = {t.name: t for t in (UPLINK, GW, LOAD)}
DOWN, UP = TrackState(ok=False), TrackState(ok=True)


# ---------------------------------------------------------------- the rules


def test_weights_follow_keepalived_rules_and_the_owner_never_moves() -> None:
    refs = (TrackRef("uplink"), TrackRef("gw"), TrackRef("load"))
    assert effective(100, refs, SPECS, {}, ()).priority == 100
    e = effective(100, refs, SPECS, {"gw": DOWN, "load": TrackState(True, 5)}, ())
    assert e.priority == 100 - 30 - 10 and e.faults == ()
    assert [c.source for c in e.contributions] == ["track gw (instance)",
                                                   "track load (instance)"]
    e = effective(100, refs, SPECS, {"uplink": DOWN}, (("node", 5),))
    assert e.faults == ("uplink",) and e.priority == 95
    assert Contribution("demote node", -5) in e.contributions
    # a positive weight is added while the tracker passes; an override per reference
    plus = (TrackRef("gw", weight=20),)
    assert effective(100, plus, SPECS, {}, ()).priority == 120
    assert effective(100, plus, SPECS, {"gw": DOWN}, ()).priority == 100
    # kept within 1..254; the owner's 255 never moves (its faults still count)
    assert effective(20, refs, SPECS, {"gw": DOWN}, (("node", 50),)).priority == 1
    assert effective(250, plus, SPECS, {}, ()).priority == 254
    owner = effective(255, refs, SPECS, {"gw": DOWN, "uplink": DOWN}, (("node", 9),))
    assert owner.priority == 255 and owner.faults == ("uplink",)


def test_a_file_with_weight_zero_faults_on_any_number_but_zero() -> None:
    f = {"flag": TrackerSpec("flag", "file", path="/run/f", weight=0)}
    assert effective(100, (TrackRef("flag"),), f, {"flag": TrackState(True, 0)}, ()).faults == ()
    assert effective(100, (TrackRef("flag"),), f,
                     {"flag": TrackState(True, 2)}, ()).faults == ("flag",)


def test_rise_and_fall_need_results_in_a_row() -> None:
    rf = RiseFall(rise=2, fall=3)
    assert [rf.feed(x) for x in (False, False, True, False, False, False)] == [
        False, False, False, False, False, True]
    assert not rf.ok
    assert [rf.feed(x) for x in (True, False, True, True)] == [False, False, False, True]
    assert rf.ok


def test_demotion_counter() -> None:
    assert demoted(0, "+20") == 20 and demoted(20, "-5") == 15 and demoted(15, "0") == 0
    assert demoted(10, "-50") == 0 and demoted(200, "+200") == 254
    for bad in ("20", "+x", "", "--1"):
        with pytest.raises(ValueError):
            demoted(0, bad)


# ---------------------------------------------------------------- the node


def tracked_node(mode: str = "per-vlan-active", trackers: tuple[TrackerSpec, ...] = (UPLINK,),
                 groups: dict[str, str] | None = None) -> Node:
    """Three VLANs of two routers; lan0's follow `uplink`, the others nothing."""
    from dataclasses import replace

    specs = []
    for v in range(3):
        for i in (1, 2):
            s = spec(f"lan{v}", 10 * v + i)
            g = (groups or {}).get(f"lan{v}")
            specs.append(replace(s, track=(TrackRef("uplink", via=f"vlan lan{v}"),)
                                 if v == 0 else (), group=g))
    n = Node(specs, mode, trackers=trackers)
    for name in n.interfaces():
        n.set_addresses(name, [(ip_interface("192.0.2.11/24"), 0)])
        n.set_link(Fraction(0), name, True)
    n.start(Fraction(0))
    take_over(n)
    drain(n)
    return n


def states(n: Node) -> dict[str, str]:
    return {f"{k[0]}/{k[1]}": s.router.state.value for k, s in n.slots.items()}


def test_a_tracked_uplink_faults_exactly_its_routers_with_a_goodbye() -> None:
    n = tracked_node()
    n.set_link(Fraction(4), "up0", False)
    st = states(n)
    assert [st["lan0/1"], st["lan0/2"]] == ["FAULT", "FAULT"]
    assert all(st[k] == "MASTER" for k in st if not k.startswith("lan0"))
    acts = drain(n)
    # the masters say priority 0 on their (working) link, so the backup needs no MDI
    goodbyes = [decode(a.payload, IpMeta(4, a.src, VRRP_GROUP_V4, 255)).priority
                for a in acts if isinstance(a, Send)]
    assert goodbyes == [0, 0]
    assert n.slots["lan0", 1, 4].router.last_transition.cause == "track uplink"  # type: ignore[union-attr]
    n.set_link(Fraction(5), "up0", True)
    st = states(n)
    assert [st["lan0/1"], st["lan0/2"]] == ["BACKUP", "BACKUP"]
    assert n.slots["lan0", 1, 4].router.last_transition.cause == "track uplink: cleared"  # type: ignore[union-attr]


def test_a_weight_moves_only_the_followers_and_counts_their_work() -> None:
    n = tracked_node(trackers=(UPLINK_W,))
    calls = n.stats.router_calls
    n.set_link(Fraction(4), "up0", False)
    assert n.stats.router_calls - calls == 2  # the two followers, nobody else
    assert [n.slots["lan0", i, 4].router.priority for i in (1, 2)] == [40, 40]
    assert n.slots["lan1", 11, 4].router.priority == 100
    assert all(s.router.state is State.MASTER for s in n.slots.values())  # no peer here


def test_a_failing_weight_lets_the_peer_preempt_and_recovery_takes_it_back() -> None:
    seg = Segment()
    a = seg.add(make_config(200), trackers=(GW,), track=(TrackRef("gw"),))
    b = seg.add(make_config(180))
    seg.start(a)
    seg.start(b)
    seg.run_for(5)
    assert seg.masters() == [a]
    seg.track(a, "gw", DOWN)  # 200 - 30 = 170 < 180: b preempts after its MDI
    assert a.router.priority == 170
    seg.run_for(4)
    assert seg.masters() == [b] and not a.holds_vips and b.holds_vips
    seg.track(a, "gw", UP)
    seg.run_for(4)
    assert seg.masters() == [a]


def test_single_active_a_tracker_fault_drains_the_whole_node() -> None:
    n = tracked_node("single-active")
    n.set_link(Fraction(4), "up0", False)
    st = states(n)
    assert [st["lan0/1"], st["lan0/2"]] == ["FAULT", "FAULT"]
    assert all(st[k] == "BACKUP" for k in st if not k.startswith("lan0"))
    assert all(n.slots[k].router.drains == {"group fault"} for k in n.slots if k[0] != "lan0")


def test_a_named_group_moves_together_and_others_stay() -> None:
    n = tracked_node(groups={"lan0": "dmz", "lan1": "dmz"})
    n.set_link(Fraction(4), "up0", False)
    st = states(n)
    assert [st["lan0/1"], st["lan0/2"]] == ["FAULT", "FAULT"]
    assert [st["lan1/11"], st["lan1/12"]] == ["BACKUP", "BACKUP"]  # drained with lan0
    assert [st["lan2/21"], st["lan2/22"]] == ["MASTER", "MASTER"]  # not in the group
    n.set_link(Fraction(5), "up0", True)
    assert not any(s.router.drains for s in n.slots.values())


def test_demotion_of_a_group_touches_its_members_and_survives_a_reload() -> None:
    n = tracked_node(groups={"lan0": "dmz", "lan1": "dmz"})
    calls = n.stats.router_calls
    n.set_demotion(Fraction(4), "dmz", 30)
    assert n.stats.router_calls - calls == 4
    assert {k[0]: s.router.priority for k, s in n.slots.items()} == {
        "lan0": 70, "lan1": 70, "lan2": 100}
    n.set_demotion(Fraction(4), "node", 10)
    assert n.slots["lan2", 21, 4].router.priority == 90
    assert n.slots["lan0", 1, 4].router.priority == 60
    contributions = n.slots["lan0", 1, 4].effective.contributions  # type: ignore[union-attr]
    assert [c.source for c in contributions] == ["demote node", "demote group dmz"]
    plan = n.plan_reload([s.spec for s in n.slots.values()], "per-vlan-active")
    n.retire(Fraction(5), plan)
    n.adopt(Fraction(5), plan)
    assert len(plan.kept) == 6
    assert n.slots["lan0", 1, 4].router.priority == 60
    assert n.slots["lan0", 1, 4].router.state is State.MASTER  # kept, not restarted


# ---------------------------------------------------------------- unicast


def test_unicast_pair_elects_and_fails_over_and_strangers_are_dropped() -> None:
    seg = Segment()
    a_ip, b_ip = IPv4Address("192.0.2.10"), IPv4Address("192.0.2.11")
    a = seg.add(make_config(200), "192.0.2.10", peers=(b_ip,))
    b = seg.add(make_config(100), "192.0.2.11", peers=(a_ip,))
    stranger = seg.add(make_config(250), "192.0.2.12", peers=(a_ip, b_ip))
    seg.start(a)
    seg.start(b)
    seg.run_for(5)
    assert seg.masters() == [a]
    seg.start(stranger)  # a higher priority, not a configured peer of a or b
    seg.run_for(5)
    assert a.state is State.MASTER
    assert a.drops.get(DropReason.UNKNOWN_PEER, 0) > 0
    assert b.drops.get(DropReason.UNKNOWN_PEER, 0) > 0
    seg.crash(stranger)
    seg.crash(a)
    seg.run_for(5)
    assert b.state is State.MASTER


def test_unicast_adverts_go_to_each_peer_with_their_own_checksum() -> None:
    from dataclasses import replace

    peers = (IPv4Address("192.0.2.21"), IPv4Address("192.0.2.22"))
    n = Node([replace(spec("lan0", 1), peers=peers)], "per-vlan-active")
    n.set_addresses("lan0", [(ip_interface("192.0.2.11/24"), 0)])
    n.set_link(Fraction(0), "lan0", True)
    n.start(Fraction(0))
    take_over(n)
    sends = [a for a in drain(n) if isinstance(a, Send)]
    assert [s.dst for s in sends] == list(peers)
    for s in sends:
        assert s.dst is not None
        decode(s.payload, IpMeta(4, s.src, s.dst, 255))  # checksum over its destination
    assert sends[0].payload != sends[1].payload


# ---------------------------------------------------------------- configuration


BASE = """
node: {name: r1}
mode: %s
"""


def test_config_builds_followers_groups_and_peers() -> None:
    cfg = loads(BASE % "per-vlan-active" + """
trackers:
  uplink: {interface: up0}
  gw: {script: [/usr/bin/true], interval: 2s, timeout: 1s, rise: 2, fall: 3, weight: -30}
  load: {file: /run/vipd/load, weight: -1}
track: [load]
groups:
  dmz: {vlans: [a, b], track: [gw]}
vlans:
  - name: a
    interface: lan0
    track: [uplink]
    instances: [{vrid: 1, vips: [192.0.2.1/24], unicast_peers: [192.0.2.12]}]
  - name: b
    interface: lan1
    instances: [{vrid: 2, vips: [198.51.100.1/24]}]
  - name: c
    interface: lan2
    instances: [{vrid: 3, vips: [203.0.113.1/24], track: [{name: gw, weight: -10}]}]
""")
    specs = {s.vlan: s for s in router_specs(cfg)}
    assert specs["a"].group == "dmz" and specs["c"].group is None
    assert [r.tracker for r in specs["a"].track] == ["load", "gw", "uplink"]
    assert [r.via for r in specs["a"].track] == ["node", "group dmz", "vlan a"]
    assert specs["c"].track[-1] == TrackRef("gw", -10, "instance")
    assert specs["a"].peers == (IPv4Address("192.0.2.12"),) and specs["b"].peers == ()
    gw = next(t for t in cfg.trackers if t.name == "gw")
    assert (gw.interval_ms, gw.timeout_ms, gw.rise, gw.fall, gw.weight) == (2000, 1000, 2, 3, -30)


@pytest.mark.parametrize("mode,body,expect", [
    ("single-active", "vlans: [{name: a, interface: lan0, track: [gw], instances: "
     "[{vrid: 1, vips: [192.0.2.1/24]}]}]", "single-active moves every VLAN together"),
    ("per-vlan-active", "vlans: [{name: a, interface: lan0, track: [nope], instances: "
     "[{vrid: 1, vips: [192.0.2.1/24]}]}]", "is not a tracker"),
    ("single-active", "groups: {g: {vlans: [a, b]}}\nvlans: [{name: a, interface: lan0, "
     "instances: [{vrid: 1, vips: [192.0.2.1/24]}]}]", "are for per-vlan-active"),
    ("per-vlan-active", "vlans: [{name: a, interface: lan0, instances: [{vrid: 1, vips: "
     "[192.0.2.1/24, 2001:db8::1/64], unicast_peers: [192.0.2.2]}]}]", "has no IPv6 peer"),
    ("per-vlan-active", "groups: {g: {vlans: [a, b]}}\nvlans: [{name: a, interface: lan0, "
     "track: [gw], instances: [{vrid: 1, vips: [192.0.2.1/24]}]}, {name: b, interface: lan1, "
     "instances: [{vrid: 2, vips: [192.0.2.2/24]}]}]", "the VLAN is in a group"),
])
def test_config_refuses_what_would_split_a_group(mode: str, body: str, expect: str) -> None:
    text = BASE % mode + "trackers: {gw: {script: [/bin/true], weight: -10}}\n" + body
    with pytest.raises(ConfigError) as exc:
        loads(text)
    assert expect in str(exc.value), str(exc.value)


# ---------------------------------------------------------------- the runner


def test_the_runner_feeds_file_numbers_and_script_results_to_the_followers(
        tmp_path: Path) -> None:
    import asyncio
    from dataclasses import replace

    from vipd.runtime.track import TrackRunner, read_number

    level, flag = tmp_path / "level", tmp_path / "flag"
    level.write_text("3\n")
    trackers = (TrackerSpec("load", "file", path=str(level), weight=-10),
                TrackerSpec("chk", "script", argv=("/bin/sh", "-c", f"test ! -e {flag}"),
                            timeout_ms=5000, rise=1, fall=2, weight=-40))
    s = replace(spec("lan0", 1), track=(TrackRef("load"), TrackRef("chk")))
    n = Node([s], "per-vlan-active", trackers=trackers)
    n.set_link(Fraction(0), "lan0", True)
    n.start(Fraction(0))
    router = n.slots["lan0", 1, 4].router
    pumped: list[int] = []

    async def no_wait(_s: float) -> None:  # the runner's interval, without real time
        await asyncio.sleep(0)

    async def until(cond: Callable[[], bool]) -> None:
        for _ in range(2000):
            if cond():
                return
            await asyncio.sleep(0.001)
        raise AssertionError("the runner never got there")

    async def body() -> None:
        r = TrackRunner(n, lambda: Fraction(1), lambda: pumped.append(1), sleep=no_wait)
        r.apply(trackers)
        await until(lambda: router.priority == 70)  # 100 - 3 x 10
        level.write_text("not a number")
        await until(lambda: router.priority == 100)  # failing, the number 0
        assert r.results["load"].last == "not a number: 'not a number'"
        flag.touch()  # the script fails: twice in a row (fall 2) before it counts
        await until(lambda: router.priority == 60)
        assert r.results["chk"].failures >= 2 and r.results["chk"].last == "exit 1"
        flag.unlink()
        await until(lambda: router.priority == 100)
        assert pumped
        await r.drain()

    asyncio.run(body())
    assert read_number(str(tmp_path / "missing"))[0] is False
