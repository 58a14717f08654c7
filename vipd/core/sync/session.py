"""Connection-state replication over the sync link, as a pure core: batches of flow
changes and datagrams in, datagrams out, `get_timer()`; no socket, no clock.

Each peer is a channel both ways. Out: our flows' changes go to every peer in sequenced
DATA datagrams, kept until acknowledged, sent again after `rto` or at once when the peer
reports a gap; a peer too far behind (more than `max_unacked_bytes` waiting) gets a bulk
resync instead. In: a peer's DATA is applied in sequence order (a reorder buffer holds
what came early, a gap is reported with the next ACK); duplicates are counted and
acknowledged again. Both sides send ALIVE every `alive_interval`, which also carries the
newest sequence number, so a lost tail is noticed.

A peer seen with a new epoch has restarted: our channel to it starts over and it gets a
bulk resync of our flows (RESYNC_START ... RESYNC_END); what it had sent us before is
replaced by what its resync brings (mark and sweep at RESYNC_END, so a takeover meanwhile
still has the old state). A node is `ready` once every reachable peer has completed its
resync to us: until then it should not win an election (it would lose flows).

Caches: `internal` (key -> record) holds this node's flows, for resyncs; `external`
(origin node -> key -> record) holds the peers', committed to the kernel at takeover.
Records are ctnetlink attribute bytes (vipd.core.sync.record); no per-flow objects.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from ipaddress import IPv4Address, IPv6Address

from vipd.core.sync.record import RecordError, key_of
from vipd.core.sync.wire import (
    ACK,
    ALIVE,
    DATA,
    F_RESYNC,
    F_RESYNC_END,
    F_RESYNC_START,
    OP_DESTROY,
    OP_UPDATE,
    OP_VIEW,
    RESYNC_REQUEST,
    ROOM,
    Message,
    ReplayWindow,
    WireError,
    open_sealed,
    pack_record,
    records,
    seal,
)

Addr = Hashable
IPAddress = IPv4Address | IPv6Address


def alive_payload(addresses: Iterable[IPAddress], released: Iterable[bytes] = ()) -> bytes:
    """What an ALIVE carries, as sections `tag (1) | length (2) | data`: 1, this node's
    VLAN addresses (`family (1) | packed` each); 2, its virtual routers in FAULT (wire ids,
    `length (1) | id` each). Unknown tags are skipped by readers."""
    addrs = b"".join(bytes([a.version]) + a.packed for a in addresses)
    rel = b"".join(bytes([len(r)]) + r for r in released)
    return (b"\x01" + len(addrs).to_bytes(2, "big") + addrs
            + b"\x02" + len(rel).to_bytes(2, "big") + rel)


def parse_alive(payload: bytes) -> tuple[frozenset[IPAddress], frozenset[bytes]]:
    addrs: set[IPAddress] = set()
    released: set[bytes] = set()
    off = 0
    while off + 3 <= len(payload):
        tag, n = payload[off], int.from_bytes(payload[off + 1:off + 3], "big")
        data = payload[off + 3:off + 3 + n]
        off += 3 + n
        i = 0
        while i < len(data):
            if tag == 1:
                size = 4 if data[i] == 4 else 16
                raw = data[i + 1:i + 1 + size]
                if len(raw) == size:
                    addrs.add(IPv4Address(raw) if size == 4 else IPv6Address(raw))
                i += 1 + size
            elif tag == 2:
                size = data[i]
                released.add(data[i + 1:i + 1 + size])
                i += 1 + size
            else:
                break
    return frozenset(addrs), frozenset(released)


REORDER_MAX = 4096  # datagrams held while a gap is open
RESYNC_BURST = 128  # datagrams of a bulk resync per timer tick


@dataclass
class SyncSettings:
    alive_interval: Fraction = Fraction(1, 2)
    rto: Fraction = Fraction(1, 5)
    max_unacked_bytes: int = 16 << 20
    resync_tick: Fraction = Fraction(1, 100)
    startup_wait: Fraction = Fraction(3, 2)  # how long to look for a peer at start
    max_resync_wait: Fraction = Fraction(60)  # ready anyway after this (logged by caller)


@dataclass
class Peer:
    addr: Addr
    node: int | None = None
    # outbound: our DATA to this peer
    out_pno: int = 0
    out_seq: int = 0
    acked: int = 0
    unacked: OrderedDict[int, tuple[int, int, bytes, Fraction]] = field(
        default_factory=OrderedDict)  # seq -> (flags, count, payload, sent at)
    unacked_bytes: int = 0
    # a bulk resync under way: what is still to send, (0, flow key) or (1, view id)
    resync_keys: list[tuple[int, bytes]] | None = None
    resync_started: bool = False
    resync_next: Fraction = Fraction(0)  # paced: the next burst
    # inbound: its DATA to us
    window: ReplayWindow = field(default_factory=ReplayWindow)
    epoch: int | None = None
    expected: int = 1
    reorder: dict[int, Message] = field(default_factory=dict)
    last_heard: Fraction | None = None
    synced: bool = False  # its bulk resync to us completed (this epoch)
    sweep: set[bytes] | None = None  # keys its resync refreshed so far
    ack_due: bool = False
    nacks: list[tuple[int, int]] = field(default_factory=list)
    last_rtt: Fraction | None = None
    alive_payload: bytes = b""
    addresses: frozenset[IPAddress] = frozenset()  # its VLAN addresses, from its ALIVE
    released: frozenset[bytes] = frozenset()  # its virtual routers in FAULT, from its ALIVE
    stats: Counter[str] = field(default_factory=Counter)


class SyncSession:
    def __init__(self, node_id: int, epoch: int, key: bytes, peers: Iterable[Addr],
                 now: Fraction, settings: SyncSettings | None = None) -> None:
        self.node_id = node_id
        self.epoch = epoch
        self.key = key
        self.s = settings or SyncSettings()
        self.peers = {a: Peer(a) for a in peers}
        self.started = now
        self.internal: dict[bytes, bytes] = {}
        self.external: dict[int, dict[bytes, bytes]] = {}
        self.drops: Counter[str] = Counter()  # by reason, for datagrams of unknown senders
        # the peers' changes as applied, for a caller that installs them as they come
        # (per-vlan-active); drained by that caller
        self.keep_applied = False
        self.applied: list[tuple[int, bytes]] = []
        # what our ALIVE messages carry: this node's addresses on its VLANs (packed), so a
        # peer can tell which VRRP masters are this node
        self.alive_payload = b""
        # each node's view of its virtual routers (state, priority, link), by wire id:
        # ours, sent reliably on change and in resyncs; the peers', by origin node
        self.own_view: dict[bytes, bytes] = {}
        self.views: dict[int, dict[bytes, bytes]] = {}
        self.view_changes: list[tuple[int, bytes, bytes]] = []  # (origin, id, view)
        self._out: list[tuple[Addr, bytes]] = []
        self._pending: list[bytes] = []  # packed records waiting for the next flush
        self._pending_len = 0
        self._next_alive = now
        self.stats: Counter[str] = Counter()

    # ------------------------------------------------------------ queries

    def pop_datagrams(self) -> list[tuple[Addr, bytes]]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> Fraction | None:
        t = self._next_alive
        for p in self.peers.values():
            if p.unacked:
                first = next(iter(p.unacked.values()))[3] + self.s.rto
                t = min(t, first)
            if p.resync_keys is not None:
                t = min(t, p.resync_next)
        return t

    def reachable(self, p: Peer, now: Fraction) -> bool:
        return p.last_heard is not None and now - p.last_heard <= 3 * self.s.alive_interval

    def ready(self, now: Fraction) -> bool:
        """Our view of the peers' flows is complete enough to take over: every reachable
        peer finished its resync to us. At start, wait `startup_wait` for a peer first."""
        if now - self.started >= self.s.max_resync_wait:
            return True
        reachable = [p for p in self.peers.values() if self.reachable(p, now)]
        if not reachable:
            return now - self.started >= self.s.startup_wait
        return all(p.synced for p in reachable)

    def external_records(self) -> Iterator[bytes]:
        for flows in self.external.values():
            yield from flows.values()

    def external_count(self) -> int:
        return sum(len(f) for f in self.external.values())

    # ------------------------------------------------------------ our flows

    def local(self, now: Fraction, changes: Iterable[tuple[int, bytes]]) -> None:
        """Our own flows changed: (OP_UPDATE, record) or (OP_DESTROY, record). Queued for
        every peer; full datagrams go at once, the rest at the next `flush`."""
        keyed = []
        for op, rec in changes:
            try:
                keyed.append((op, key_of(rec), rec))
            except RecordError:
                self.stats["bad_local_records"] += 1
        self.local_keyed(now, keyed)

    def local_keyed(self, now: Fraction, changes: Iterable[tuple[int, bytes, bytes]]) -> None:
        """`local`, with each record's key already known (the capture path finds it while
        it parses the event)."""
        internal = self.internal
        node = self.node_id
        pending = self._pending
        for op, k, rec in changes:
            if op == OP_UPDATE:
                internal[k] = rec
            else:
                internal.pop(k, None)
            packed = pack_record(op, node, rec)
            if self._pending_len + len(packed) > ROOM:
                self._send_pending(now)
                pending = self._pending
            pending.append(packed)
            self._pending_len += len(packed)
            self.stats["records_out"] += 1

    def set_view(self, now: Fraction, wid: bytes, view: bytes) -> None:
        """Our view of one virtual router changed: the peers get it in sequence."""
        if self.own_view.get(wid) == view:
            return
        self.own_view[wid] = view
        packed = pack_record(OP_VIEW, self.node_id, bytes([len(wid)]) + wid + view)
        if self._pending_len + len(packed) > ROOM:
            self._send_pending(now)
        self._pending.append(packed)
        self._pending_len += len(packed)

    def flush(self, now: Fraction) -> None:
        """Send what is queued, and the acknowledgements that are due."""
        self._send_pending(now)
        for p in self.peers.values():
            if p.ack_due:
                self._send_ack(p)

    def _send_pending(self, now: Fraction) -> None:
        if not self._pending:
            return
        payload = b"".join(self._pending)
        count = len(self._pending)
        self._pending, self._pending_len = [], 0
        for p in self.peers.values():
            if p.resync_keys is not None and not p.resync_started:
                continue  # it gets everything with the resync about to start
            self._send_data(p, 0, count, payload, now)

    def _send_data(self, p: Peer, flags: int, count: int, payload: bytes,
                   now: Fraction) -> None:
        if p.epoch is None:
            return  # not heard yet: it gets everything in the resync when it is
        if p.resync_keys is None and p.unacked_bytes + len(payload) > self.s.max_unacked_bytes:
            self._start_resync(p)  # too far behind: send it everything again instead
            return
        p.out_seq += 1
        p.unacked[p.out_seq] = (flags, count, payload, now)
        p.unacked_bytes += len(payload)
        self._emit(p, DATA, flags, count, p.out_seq, payload)
        p.stats["data_sent"] += 1

    def _emit(self, p: Peer, typ: int, flags: int, count: int, seq: int,
              payload: bytes) -> None:
        p.out_pno += 1
        msg = Message(typ, flags, count, self.node_id, self.epoch, p.epoch or 0, p.out_pno,
                      seq, p.expected - 1, payload)
        self._out.append((p.addr, seal(self.key, msg)))
        p.ack_due = False  # every message carries our ack

    def _send_ack(self, p: Peer) -> None:
        gaps = b"".join(a.to_bytes(8, "big") + b.to_bytes(8, "big") for a, b in p.nacks[:64])
        p.nacks.clear()
        self._emit(p, ACK, 0, 0, 0, gaps)

    # ------------------------------------------------------------ resync

    def _start_resync(self, p: Peer) -> None:
        p.unacked.clear()
        p.unacked_bytes = 0
        p.resync_keys = []  # taken from `internal` when the first burst goes out
        p.resync_started = False
        p.stats["resyncs_sent"] += 1

    def _resync_step(self, p: Peer, now: Fraction) -> None:
        keys = p.resync_keys
        assert keys is not None
        if not p.resync_started:  # what changed since it was decided is in it too
            keys.extend((0, k) for k in self.internal)
            keys.extend((1, w) for w in self.own_view)
        for _ in range(RESYNC_BURST):
            flags = F_RESYNC | (0 if p.resync_started else F_RESYNC_START)
            chunk: list[bytes] = []
            size = 0
            while keys:
                kind, k = keys[-1]
                got = (self.internal if kind == 0 else self.own_view).get(k)
                if got is None:
                    keys.pop()
                    continue
                packed = (pack_record(OP_UPDATE, self.node_id, got) if kind == 0 else
                          pack_record(OP_VIEW, self.node_id, bytes([len(k)]) + k + got))
                if size + len(packed) > ROOM:
                    break
                keys.pop()
                chunk.append(packed)
                size += len(packed)
            if not keys:
                flags |= F_RESYNC_END
            p.resync_started = True
            p.out_seq += 1
            payload = b"".join(chunk)
            p.unacked[p.out_seq] = (flags, len(chunk), payload, now)
            p.unacked_bytes += len(payload)
            self._emit(p, DATA, flags, len(chunk), p.out_seq, payload)
            if not keys:
                p.resync_keys = None
                return

    # ------------------------------------------------------------ timers

    def handle_timer(self, now: Fraction) -> None:
        for p in self.peers.values():
            if p.resync_keys is not None and now >= p.resync_next:
                p.resync_next = now + self.s.resync_tick
                self._resync_step(p, now)
            for seq, (flags, count, payload, sent) in list(p.unacked.items()):
                if now - sent < self.s.rto:
                    break
                p.unacked[seq] = (flags, count, payload, now)
                p.unacked.move_to_end(seq)
                self._resend(p, seq, flags, count, payload)
        if now >= self._next_alive:
            self._next_alive = now + self.s.alive_interval
            for p in self.peers.values():
                self._emit(p, ALIVE, 0, 0, p.out_seq, self.alive_payload)

    def alive_now(self) -> None:
        """Send an ALIVE to every peer at once (something in it changed that they must
        know now: a master of ours went to FAULT)."""
        for p in self.peers.values():
            self._emit(p, ALIVE, 0, 0, p.out_seq, self.alive_payload)

    def _resend(self, p: Peer, seq: int, flags: int, count: int, payload: bytes) -> None:
        self._emit(p, DATA, flags, count, seq, payload)
        p.stats["retransmissions"] += 1

    # ------------------------------------------------------------ datagrams

    def datagram(self, now: Fraction, addr: Addr, data: bytes) -> None:
        """One datagram from the sync link. Anything that fails authentication, replays
        or is malformed is dropped and counted, never applied."""
        p = self.peers.get(addr)
        counters = p.stats if p is not None else self.drops
        if p is None:
            counters["unknown_sender"] += 1
            return
        try:
            msg = open_sealed(self.key, data)
        except WireError as exc:
            counters[exc.reason] += 1
            return
        if p.node is not None and msg.node != p.node and msg.epoch == p.epoch:
            counters["node_id_changed"] += 1
            return
        replay = p.window.check(msg.epoch, msg.packet_no)
        if replay is not None:
            counters[replay] += 1
            return
        p.last_heard = now
        if msg.epoch != p.epoch:
            self._peer_restarted(p, msg)
        if msg.peer_epoch != self.epoch:
            # meant for an earlier life of ours, or sent before it heard us: its sequence
            # and ack numbers are not ours (it learns our epoch from what we send)
            if msg.type in (DATA, ACK):
                p.stats["stale_channel"] += 1
            return
        self._acked(p, msg.ack, now)
        if msg.type == DATA:
            self._data(p, msg)
        elif msg.type == ACK:
            self._nacked(p, msg.payload, now)
        elif msg.type == ALIVE:
            if msg.payload != p.alive_payload:
                p.alive_payload = msg.payload
                p.addresses, p.released = parse_alive(msg.payload)
            if msg.seq >= p.expected:  # we missed its newest: ask again
                p.nacks.append((p.expected, msg.seq))
                p.ack_due = True
        elif msg.type == RESYNC_REQUEST:
            self._start_resync(p)
        else:
            counters["unknown_type"] += 1

    def _peer_restarted(self, p: Peer, msg: Message) -> None:
        """A new epoch: the peer (re)started. Its inbound sequence starts over, our channel
        to it too (it remembers nothing of us), and it gets all our flows."""
        if p.epoch is not None:
            p.stats["peer_restarts"] += 1
        p.epoch, p.node = msg.epoch, msg.node
        p.expected, p.reorder, p.synced, p.sweep = 1, {}, False, None
        p.out_seq, p.acked = 0, 0
        self._start_resync(p)

    def _acked(self, p: Peer, ack: int, now: Fraction) -> None:
        if ack <= p.acked:
            return
        p.acked = min(ack, p.out_seq)
        while p.unacked:
            seq, (_f, _c, payload, sent) = next(iter(p.unacked.items()))
            if seq > p.acked:
                break
            del p.unacked[seq]
            p.unacked_bytes -= len(payload)
            p.last_rtt = now - sent

    def _nacked(self, p: Peer, gaps: bytes, now: Fraction) -> None:
        for off in range(0, len(gaps) - 15, 16):
            a = int.from_bytes(gaps[off:off + 8], "big")
            b = int.from_bytes(gaps[off + 8:off + 16], "big")
            for seq in range(max(a, p.acked + 1), min(b, p.out_seq) + 1):
                held = p.unacked.get(seq)
                if held is None:  # gone from our buffer: only a resync can help
                    self._start_resync(p)
                    return
                flags, count, payload, _ = held
                p.unacked[seq] = (flags, count, payload, now)
                self._resend(p, seq, flags, count, payload)

    def _data(self, p: Peer, msg: Message) -> None:
        p.ack_due = True
        if msg.seq < p.expected:
            p.stats["duplicates"] += 1
            return
        if msg.seq > p.expected and msg.flags & F_RESYNC_START:
            # The sender gave up on what we missed and sends everything instead: what came
            # before this no longer matters (the resync's sweep covers lost destroys).
            p.stats["skipped_to_resync"] += 1
            p.reorder = {k: v for k, v in p.reorder.items() if k > msg.seq}
            p.nacks.clear()
            p.expected = msg.seq
        if msg.seq > p.expected:
            if len(p.reorder) < REORDER_MAX:
                p.reorder[msg.seq] = msg
            if not p.nacks or p.nacks[-1][1] < msg.seq - 1:
                p.nacks.append((p.expected, msg.seq - 1))
            p.stats["out_of_order"] += 1
            return
        self._apply(p, msg)
        while p.expected in p.reorder:
            self._apply(p, p.reorder.pop(p.expected))

    def _apply(self, p: Peer, msg: Message) -> None:
        p.expected = msg.seq + 1
        if msg.flags & F_RESYNC_START:
            p.sweep = set()
            p.synced = False
        try:
            items = list(records(msg.payload))
        except WireError:
            p.stats["malformed"] += 1
            return
        for op, origin, rec in items:
            if op == OP_VIEW:
                n = rec[0] if rec else 0
                wid, view = rec[1:1 + n], rec[1 + n:]
                self.views.setdefault(origin, {})[wid] = view
                self.view_changes.append((origin, wid, view))
                if p.sweep is not None and msg.flags & F_RESYNC:
                    p.sweep.add(b"\xffview" + wid)
                continue
            try:
                k = key_of(rec)
            except RecordError:
                p.stats["malformed"] += 1
                continue
            flows = self.external.setdefault(origin, {})
            if op == OP_UPDATE:
                flows[k] = rec
                if p.sweep is not None and msg.flags & F_RESYNC:
                    p.sweep.add(k)
            elif op == OP_DESTROY:
                flows.pop(k, None)
            if self.keep_applied:
                self.applied.append((op, rec))
            p.stats["records_in"] += 1
        if msg.flags & F_RESYNC_END:
            origin_flows = self.external.get(p.node or 0, {})
            if p.sweep is not None:
                for k in [k for k in origin_flows if k not in p.sweep]:
                    rec = origin_flows.pop(k)  # it no longer has them
                    if self.keep_applied:
                        self.applied.append((OP_DESTROY, rec))
                views = self.views.get(p.node or 0, {})
                for wid in [w for w in views if b"\xffview" + w not in p.sweep]:
                    del views[wid]
            p.sweep = None
            p.synced = True
            p.stats["resyncs_received"] += 1

    # ------------------------------------------------------------ status

    def status(self, now: Fraction) -> dict[str, object]:
        peers = []
        for p in self.peers.values():
            peers.append({
                "address": str(p.addr[0]) if isinstance(p.addr, tuple) else str(p.addr),
                "node_id": p.node,
                "reachable": self.reachable(p, now),
                "last_heard_ago_s": None if p.last_heard is None
                else round(float(now - p.last_heard), 3),
                "synced": p.synced,
                "seq_sent": p.out_seq,
                "acked": p.acked,
                "unacked": len(p.unacked),
                "seq_received": p.expected - 1,
                "resync_under_way": p.resync_keys is not None,
                "lag_ms": None if p.last_rtt is None else round(float(p.last_rtt) * 1000, 1),
                "counters": dict(p.stats),
            })
        return {
            "node_id": self.node_id,
            "ready": self.ready(now),
            "internal_flows": len(self.internal),
            "external_flows": self.external_count(),
            "external_by_origin": {str(k): len(v) for k, v in self.external.items()},
            "peers": peers,
            "drops": dict(self.drops),
            "records_out": self.stats["records_out"],
        }

