"""All-active, the pure parts: bucket ranking, the symmetric flow hash, and the node core's
bucket routers (watched links, waiting for a live owner's release, views sent only once
the rules are out). Virtual time, no root."""

from __future__ import annotations

import struct
from collections import Counter
from fractions import Fraction
from ipaddress import IPv4Address, ip_interface

from vipd.config import loads, router_specs
from vipd.core.cluster import (
    MARK_CLASSIFIED,
    bucket_priority,
    flow_bucket,
    mark_of,
    packet_bucket,
    preferred_shares,
    ranking,
)
from vipd.core.node import Node, SetVips, ViewChanged
from vipd.core.packet import VRRP_GROUP_V4, IpMeta, encode_v3

MEMBERS = ("r1", "r2", "r3")
SEED = b"lab"


def ipv4_tcp(src: str, sport: int, dst: str, dport: int) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0,
                     IPv4Address(src).packed, IPv4Address(dst).packed)
    return ip + struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 0x50, 2, 0, 0, 0)


def test_every_member_is_first_for_its_share_and_a_lost_members_buckets_spread() -> None:
    assert preferred_shares(MEMBERS, 16) == {"r1": 6, "r2": 5, "r3": 5}
    assert preferred_shares(("r3", "r1", "r2"), 16) == {"r1": 6, "r2": 5, "r3": 5}
    # r1's buckets fall to r2 and r3 in turn, not all to one of them
    assert Counter(ranking(MEMBERS, b)[1] for b in range(16)
                   if ranking(MEMBERS, b)[0] == "r1") == {"r2": 3, "r3": 3}
    assert {bucket_priority(MEMBERS, m, 0) for m in MEMBERS} == {250, 230, 210}


def test_both_directions_of_a_connection_hash_alike_and_one_client_spreads() -> None:
    req = ipv4_tcp("192.0.2.100", 40000, "198.51.100.100", 5001)
    rep = ipv4_tcp("198.51.100.100", 5001, "192.0.2.100", 40000)
    assert packet_bucket(req, 16, SEED) == packet_bucket(rep, 16, SEED) is not None
    # keyed: another seed, another spread (a per-boot secret would differ per machine)
    buckets = {packet_bucket(ipv4_tcp("192.0.2.100", p, "198.51.100.100", 5001), 16, SEED)
               for p in range(40000, 40200)}
    assert buckets == set(range(16))  # one client's connections use every bucket
    a, b = IPv4Address("192.0.2.100").packed, IPv4Address("198.51.100.100").packed
    assert flow_bucket(17, a, 1, b, 2, 16, SEED) == flow_bucket(17, b, 2, a, 1, 16, SEED)
    assert mark_of(5) == MARK_CLASSIFIED | 5
    assert packet_bucket(b"\x45", 16, SEED) is None and packet_bucket(b"", 16, SEED) is None


CONFIG = """
node: {name: r1}
mode: all-active
cluster: {members: [r1, r2, r3], buckets: 4, advert_interval: 100ms}
vlans:
  - {name: lanA, interface: lanA, vips: [192.0.2.1/24]}
  - {name: lanB, interface: lanB, vips: [198.51.100.1/24]}
sync: {interface: sync0, local: 203.0.113.11, peers: [203.0.113.12], key_file: /k}
"""
PEER = IPv4Address("192.0.2.12")
META = IpMeta(4, PEER, VRRP_GROUP_V4, 255)


def node() -> Node:
    cfg = loads(CONFIG)
    n = Node(router_specs(cfg), "all-active", commit_before_vips=True, watch=["lanB"])
    for name in ("lanA", "lanB"):
        n.set_addresses(name, [(ip_interface("192.0.2.11/24"), 0)])
        n.set_link(Fraction(0), name, True)
    n.start(Fraction(0))
    n.set_sync_ready(Fraction(0), True)
    return n


def run_until(n: Node, t: Fraction) -> list[object]:
    acts: list[object] = []
    while (d := n.get_timer()) is not None and d <= t:
        n.handle_timer(d)
        acts += list(n.pop_actions())
    return acts


def advert(vrid: int, priority: int) -> bytes:
    return encode_v3(vrid=vrid, priority=priority, max_adver_int_cs=10,
                     addresses=[IPv4Address("192.0.2.1")], src=PEER)


def owner_keeps_advertising(n: Node, until: Fraction, stop: object = None) -> tuple[
        Fraction, list[object]]:
    """r2 owns bucket 0 by its word over the sync link and advertises it (priority 230)
    every 100 ms until `until` (or until `stop()` is true); our timers run meanwhile.
    Returns the time reached and the node's actions."""
    slot = n.slots["lanA", 252, 4]
    n.peer_view(Fraction(0), 2, slot.wire_id, bytes([2, 230, 1]))
    t = Fraction(0)
    acts: list[object] = []
    while t < until and not (callable(stop) and stop()):
        t += Fraction(1, 10)
        n.receive("lanA", 4, [(advert(252, 230), META, t)])
        acts += run_until(n, t)
    return t, acts


def test_losing_a_watched_vlan_gives_up_every_bucket_and_getting_it_back_rejoins() -> None:
    n = node()
    run_until(n, Fraction(1))
    assert {s.router.state.value for s in n.slots.values()} == {"MASTER"}  # alone
    n.set_link(Fraction(1), "lanB", False)
    # (a drained master announces priority 0 and lets go when a successor speaks, or
    # when the slowest one must have: alone here, that is the release time)
    acts = list(n.pop_actions()) + run_until(n, Fraction(2))
    assert {a.key[1] for a in acts if isinstance(a, SetVips) and not a.present} == \
        {252, 253, 254, 255}
    assert all(s.router.state.value == "BACKUP" and s.router.drains
               for s in n.slots.values())
    n.set_link(Fraction(2), "lanB", True)
    run_until(n, Fraction(3))
    assert {s.router.state.value for s in n.slots.values()} == {"MASTER"}


def test_a_bucket_taken_from_a_live_owner_waits_for_its_release() -> None:
    n = node()
    key = ("lanA", 252, 4)  # bucket 0: r1 is first (priority 250)
    slot = n.slots[key]
    wid = slot.wire_id
    # r2 owns it and says so over the sync link; its adverts (priority 230) keep coming
    t, acts = owner_keeps_advertising(n, Fraction(1, 2))
    assert slot.router.state.value == "MASTER"  # preempted (r2's adverts are discarded)
    assert SetVips(key, True) not in acts and slot.awaiting_release
    # r2 let go: its view says BACKUP (sent once its rules were out): now we own it
    n.peer_view(t, 2, wid, bytes([1, 230, 1]))
    assert SetVips(key, True) in list(n.pop_actions())
    assert n.release_waits >= 1 and n.release_timeouts == 0


def test_without_a_release_the_bucket_is_taken_after_three_intervals() -> None:
    n = node()
    key = ("lanA", 252, 4)
    _t, acts = owner_keeps_advertising(n, Fraction(1))
    assert SetVips(key, True) in acts and n.release_timeouts == 1


def test_a_bucket_given_up_is_reported_to_the_peers_only_once_its_rules_are_out() -> None:
    n = node()
    run_until(n, Fraction(1))
    key = ("lanA", 252, 4)
    for k in n.slots:
        n.vips_applied(Fraction(1), k, True, True)
    list(n.pop_actions())
    n.set_maintenance(Fraction(1), True)
    acts = list(n.pop_actions()) + run_until(n, Fraction(2))
    assert SetVips(key, False) in acts
    wid = n.slots[key].wire_id
    assert not any(isinstance(a, ViewChanged) and a.wire_id == wid for a in acts)
    n.vips_applied(Fraction(1), key, False, True)
    assert any(isinstance(a, ViewChanged) and a.wire_id == wid and a.view[0] != 2
               for a in n.pop_actions())


def test_a_silent_peers_views_are_forgotten_and_its_buckets_not_waited_for() -> None:
    n = node()
    key = ("lanA", 252, 4)
    slot = n.slots[key]
    owner_keeps_advertising(n, Fraction(1), stop=lambda: slot.awaiting_release)
    assert slot.awaiting_release
    n.forget_peer_views(2)
    assert SetVips(key, True) in list(n.pop_actions())


def _icmp6_sum(src: bytes, dst: bytes, msg: bytes) -> int:
    data = src + dst + struct.pack("!I3xB", len(msg), 58) + msg
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_the_nd_rewrite_keeps_the_icmpv6_checksum_through_the_reserved_bits() -> None:
    from vipd.io.cluster import ClusterVlan, nd_compensation, ruleset_lines

    own, new = "aa:d7:65:65:3c:79", "03:00:5e:00:01:01"
    src = IPv4Address("192.0.2.1").packed * 4  # any 16 bytes: the sum is what matters
    dst = bytes(15) + b"\x01"
    target = bytes(range(16))

    def na(mac: str, reserved: int) -> bytes:
        return (struct.pack("!BBHHH", 136, 0, 0, 0x6000, reserved) + target
                + b"\x02\x01" + bytes.fromhex(mac.replace(":", "")))

    before = _icmp6_sum(src, dst, na(own, 0))
    after = _icmp6_sum(src, dst, na(new, nd_compensation(own, new)))
    assert before % 0xFFFF == after % 0xFFFF  # (0 and 0xffff are one in ones' complement)
    lines = ruleset_lines([ClusterVlan("lanA", new, ("192.0.2.1", "2001:db8:a::1"), own)], 4)
    nd = [x for x in lines if "nd-neighbor-advert @th" in x]
    assert len(nd) == 1 and "set 0x03005e000101" in nd[0]
    assert any("arp saddr ip { 192.0.2.1 }" in x for x in lines)
