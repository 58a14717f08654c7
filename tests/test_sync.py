"""The sync core (vipd.core.sync) in virtual time: a lossy, reordering, duplicating link
between sessions; forged and replayed datagrams; restarts; three nodes."""

from __future__ import annotations

import random
from fractions import Fraction as F
from ipaddress import IPv4Address

import pytest

from vipd.core.sync.record import (
    RecordError,
    decode,
    for_create,
    key_of,
    make_record,
)
from vipd.core.sync.session import SyncSession, SyncSettings
from vipd.core.sync.wire import (
    OP_DESTROY,
    OP_UPDATE,
    ReplayWindow,
    WireError,
    open_sealed,
)

KEY = b"k" * 32


def flow(i: int, state: int = 3) -> bytes:
    return make_record(IPv4Address("192.0.2.100"), IPv4Address("198.51.100.10"), 6,
                       10000 + i % 50000, 5001, tcp_state=state, timeout=432000)


class Net:
    """Sessions named by address; datagrams go through `deliver` with the link's faults."""

    def __init__(self, names: list[str], seed: int = 1, loss: float = 0.0,
                 dup: float = 0.0, reorder: float = 0.0) -> None:
        self.now = F(0)
        self.rng = random.Random(seed)
        self.loss, self.dup, self.reorder = loss, dup, reorder
        self.names = names
        self.s = {n: self.make(n, i) for i, n in enumerate(names)}
        self.down: set[str] = set()
        self.wire: list[tuple[str, str, bytes]] = []  # every datagram sent (for replays)

    def make(self, name: str, i: int, epoch: int | None = None) -> SyncSession:
        return SyncSession(i + 1, epoch or (10 + i), KEY, [n for n in self.names if n != name],
                           self.now, SyncSettings())

    def step(self, dt: F = F(1, 100)) -> None:
        self.now += dt
        for n, s in self.s.items():
            if n not in self.down:
                s.handle_timer(self.now)
                s.flush(self.now)
        self.pump()

    def pump(self) -> None:
        for _ in range(50):
            batch = []
            for n, s in self.s.items():
                for to, data in s.pop_datagrams():
                    self.wire.append((n, str(to), data))
                    if n in self.down or to in self.down or self.rng.random() < self.loss:
                        continue
                    batch.append((n, str(to), data))
                    if self.rng.random() < self.dup:
                        batch.append((n, str(to), data))
            if not batch:
                return
            if self.reorder:
                for i in range(len(batch) - 1):
                    if self.rng.random() < self.reorder:
                        batch[i], batch[i + 1] = batch[i + 1], batch[i]
            for frm, to, data in batch:
                self.s[to].datagram(self.now, frm, data)
            for n, s in self.s.items():
                if n not in self.down:
                    s.flush(self.now)

    def run(self, seconds: float) -> None:
        for _ in range(int(seconds * 100)):
            self.step()


def test_record_key_and_create_attributes() -> None:
    rec = flow(1)
    f = decode(rec)
    assert (f.proto, str(f.src), f.sport, f.dport, f.tcp_state) == (
        6, "192.0.2.100", 10001, 5001, "ESTABLISHED")
    assert key_of(rec) == key_of(flow(1)) != key_of(flow(2))
    created = decode(for_create(make_record(IPv4Address("192.0.2.1"),
                                            IPv4Address("192.0.2.2"), 17, 1, 2,
                                            status=0xFFFF)))
    assert created.status & 0x8 and not created.status & (0x10 | 0x20)  # confirmed, no NAT
    with pytest.raises(RecordError):
        key_of(b"\x08\x00\x03\x00\x00\x00\x00\x01")


def test_replay_window() -> None:
    w = ReplayWindow()
    assert w.check(5, 1) is None and w.check(5, 3) is None and w.check(5, 2) is None
    assert w.check(5, 2) == "replay" and w.check(5, 3) == "replay"
    assert w.check(5, 200) is None and w.check(5, 100) == "replay"  # behind the window
    assert w.check(4, 500) == "old_epoch"
    assert w.check(6, 1) is None  # a restart: new window


def test_two_nodes_replicate_updates_and_destroys() -> None:
    net = Net(["a", "b"])
    net.run(1)
    assert net.s["a"].ready(net.now) and net.s["b"].ready(net.now)
    net.s["a"].local(net.now, [(OP_UPDATE, flow(i)) for i in range(1000)])
    net.run(0.5)
    assert net.s["b"].external_count() == 1000
    net.s["a"].local(net.now, [(OP_DESTROY, flow(i)) for i in range(400)])
    net.run(0.5)
    assert net.s["b"].external_count() == 600
    b = net.s["b"].status(net.now)
    assert b["peers"][0]["reachable"] and b["peers"][0]["seq_received"] > 0  # type: ignore


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_loss_reordering_and_duplication_lose_nothing(seed: int) -> None:
    net = Net(["a", "b"], seed=seed, loss=0.2, dup=0.1, reorder=0.3)
    net.run(2)
    for chunk in range(20):
        net.s["a"].local(net.now, [(OP_UPDATE, flow(chunk * 100 + i)) for i in range(100)])
        net.step()
    net.s["a"].local(net.now, [(OP_DESTROY, flow(i)) for i in range(0, 2000, 2)])
    net.run(5)
    b = net.s["b"]
    assert b.external_count() == 1000
    assert set(b.external[1]) == {key_of(flow(i)) for i in range(1, 2000, 2)}
    stats = b.peers["a"].stats
    assert stats["duplicates"] > 0 and stats["out_of_order"] > 0
    assert net.s["a"].peers["b"].stats["retransmissions"] > 0


def test_a_restarted_peer_gets_everything_again_and_stale_flows_are_swept() -> None:
    net = Net(["a", "b"])
    net.run(1)
    net.s["a"].local(net.now, [(OP_UPDATE, flow(i)) for i in range(500)])
    net.run(0.5)
    # b restarts: a new epoch, empty caches
    net.s["b"] = SyncSession(2, 99, KEY, ["a"], net.now, SyncSettings())
    assert not net.s["b"].ready(net.now)  # just started: looking for a peer
    net.run(1)
    assert net.s["b"].external_count() == 500 and net.s["b"].ready(net.now)
    assert net.s["a"].peers["b"].stats["peer_restarts"] == 1
    # a restarts having lost 200 flows meanwhile: b keeps the old ones until a's resync
    # ends, then drops the 200 (mark and sweep)
    survivors = dict(list(net.s["a"].internal.items())[200:])
    net.s["a"] = SyncSession(1, 77, KEY, ["b"], net.now, SyncSettings())
    net.s["a"].internal.update(survivors)
    net.run(1)
    assert net.s["b"].external_count() == 300


def test_forged_and_replayed_datagrams_are_dropped_and_counted() -> None:
    net = Net(["a", "b"])
    net.run(1)
    net.s["a"].local(net.now, [(OP_UPDATE, flow(1))])
    net.run(0.2)
    sent = [d for frm, to, d in net.wire if frm == "a" and to == "b"]
    b = net.s["b"]
    before = dict(b.peers["a"].stats)
    for d in sent:  # replay everything a ever sent
        b.datagram(net.now, "a", d)
    forged = bytearray(sent[-1])
    forged[60] ^= 1
    b.datagram(net.now, "a", bytes(forged))
    b.datagram(net.now, "a", b"short")
    evil = SyncSession(1, 10, b"x" * 32, ["b"], net.now)  # the wrong key
    evil.local(net.now, [(OP_UPDATE, flow(666))])
    evil.handle_timer(net.now)
    for _, d in evil.pop_datagrams():
        b.datagram(net.now, "a", d)
    b.datagram(net.now, "zz", sent[-1])
    st = b.peers["a"].stats
    assert st["replay"] - before.get("replay", 0) == len(sent)
    assert st["auth"] >= 2 and st["short"] == 1 and b.drops["unknown_sender"] == 1
    assert b.external_count() == 1  # nothing forged or replayed was applied
    with pytest.raises(WireError):
        open_sealed(KEY, bytes(forged))


def test_three_nodes_each_record_names_its_origin() -> None:
    net = Net(["a", "b", "c"], loss=0.1, seed=5)
    net.run(1)
    net.s["a"].local(net.now, [(OP_UPDATE, flow(i)) for i in range(100)])
    net.s["c"].local(net.now, [(OP_UPDATE, flow(1000 + i)) for i in range(50)])
    net.run(3)
    b = net.s["b"]
    assert {o: len(f) for o, f in b.external.items()} == {1: 100, 3: 50}
    assert {o: len(f) for o, f in net.s["a"].external.items()} == {3: 50}


def test_a_peer_unreachable_makes_it_not_count_and_ready_waits_for_resync() -> None:
    net = Net(["a", "b"])
    assert not net.s["a"].ready(net.now)  # looking for a peer first
    net.down.add("b")
    net.run(2)
    assert net.s["a"].ready(net.now)  # nobody reachable: ready (and says so)
    st = net.s["a"].status(net.now)
    assert st["peers"][0]["reachable"] is False  # type: ignore[index]


def test_a_peer_far_behind_gets_a_resync_instead_of_an_endless_buffer() -> None:
    net = Net(["a", "b"])
    net.run(1)
    a = net.s["a"]
    a.s.max_unacked_bytes = 20_000
    net.down.add("b")
    a.local(net.now, [(OP_UPDATE, flow(i)) for i in range(2000)])
    a.flush(net.now)
    assert a.peers["b"].unacked_bytes <= 20_000 + 1400
    assert a.peers["b"].stats["resyncs_sent"] >= 2  # first contact, then falling behind
    net.down.clear()
    net.run(2)
    assert net.s["b"].external_count() == 2000


def test_record_filter_by_protocol_and_ignored_networks() -> None:
    from ipaddress import IPv6Address, ip_network

    from vipd.core.sync.record import RecordFilter

    f = RecordFilter(frozenset({6, 17}), (ip_network("203.0.113.0/24"),
                                          ip_network("2001:db8:ff::/48")))
    assert f.keep(flow(1))
    assert not f.keep(make_record(IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2"), 1, 0, 0))
    assert not f.keep(make_record(IPv4Address("203.0.113.1"), IPv4Address("203.0.113.2"), 17,
                                  3780, 3780))
    assert f.keep(make_record(IPv6Address("2001:db8::1"), IPv6Address("2001:db8::2"), 6, 1, 2))
    assert not f.keep(make_record(IPv6Address("2001:db8::1"), IPv6Address("2001:db8:ff::2"),
                                  6, 1, 2))
    assert f.dropped == 3


def test_record_filter_by_zone_and_scan_agrees_with_the_slow_path() -> None:
    import struct

    from vipd.core.sync.record import (
        CTA_ZONE,
        RecordFilter,
        carried,
        encode_attr,
        orig_raw,
        scan,
    )

    zoned = flow(3) + encode_attr(CTA_ZONE, struct.pack("!H", 7))
    f = RecordFilter(frozenset({6}), (), zones=frozenset({7}))
    assert f.keep(zoned) and not f.keep(flow(3))
    rec, key, proto, src, dst, zone = scan(zoned, 0, len(zoned))
    assert (rec, key, (proto, src, dst), zone) == (
        for_create(carried(zoned)), key_of(zoned), orig_raw(zoned), 7)
    assert key_of(zoned) != key_of(flow(3))  # the zone is part of the identity


def test_without_timeout_compares_two_reads_of_an_unchanged_entry() -> None:
    from vipd.core.sync.record import without_timeout

    a = make_record(IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2"), 6, 1, 2, timeout=300,
                    tcp_state=3)
    b = make_record(IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2"), 6, 1, 2, timeout=250,
                    tcp_state=3)
    c = make_record(IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2"), 6, 1, 2, timeout=250,
                    tcp_state=7)
    assert a != b and without_timeout(a) == without_timeout(b) != without_timeout(c)
