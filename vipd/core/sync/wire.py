"""The sync link's wire format: authenticated, replay-protected datagrams. Pure.

    0      2    3      4       6       8         12      20           28          36    44    52
    | "VS" | v1 | type | flags | count | node id | epoch | peer epoch | packet no | seq | ack |
    payload | HMAC-SHA256 (32 bytes) over everything before it

- node id: the sender's; epoch: when the sender started (ns; a larger one is a restart);
  peer epoch: the receiver's epoch as the sender knows it (0: not yet), so sequence and
  ack numbers meant for an earlier life of the receiver are never applied to this one;
  packet no: counts every datagram of the sender's epoch to this receiver (replay window);
  seq: the data sequence number of a DATA message (0 otherwise); ack: the highest data
  sequence number of the receiver's that the sender has received in order.
- DATA payload: records, each `op (1) | origin node (4) | length (2) | record`; op 1 is a
  flow's current state, 2 its end. A record is ctnetlink attributes (vipd.core.sync.record).
- Unknown types and flags are ignored by older readers; a newer version is refused.

Every datagram is authenticated (HMAC-SHA256 with the shared key) before anything in it is
believed; then the (node, epoch, packet no) triple must be new: an older epoch, or a packet
number at or behind the 64-wide window, is a replay.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterator
from dataclasses import dataclass

MAGIC = b"VS"
VERSION = 1
HEADER = struct.Struct("!2sBBHHIQQQQQ")
MAC_LEN = 32
MAX_DATAGRAM = 1400  # stays in one frame on the sync link

DATA = 1  # records, sequenced, acknowledged
ACK = 2  # ack (and, in the payload, the gaps: NACK ranges of !QQ)
ALIVE = 3  # heartbeat; seq = the sender's newest data seq for this receiver
RESYNC_REQUEST = 4  # please send me all your flows

F_RESYNC = 0x1  # DATA: part of a bulk resync
F_RESYNC_START = 0x2  # DATA: the first of a bulk resync (forget what you had from me)
F_RESYNC_END = 0x4  # DATA: the last of a bulk resync

OP_UPDATE = 1
OP_DESTROY = 2
OP_VIEW = 3  # not a flow: a node's view of one virtual router (vipd.core.sync.session)
RECORD_HDR = struct.Struct("!BIH")


class WireError(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Message:
    type: int
    flags: int
    count: int
    node: int
    epoch: int
    peer_epoch: int
    packet_no: int
    seq: int
    ack: int
    payload: bytes


def seal(key: bytes, msg: Message) -> bytes:
    head = HEADER.pack(MAGIC, VERSION, msg.type, msg.flags, msg.count, msg.node, msg.epoch,
                       msg.peer_epoch, msg.packet_no, msg.seq, msg.ack)
    body = head + msg.payload
    return body + hmac.new(key, body, hashlib.sha256).digest()


def open_sealed(key: bytes, data: bytes) -> Message:
    """Check and decode one datagram; raises WireError with the drop reason."""
    if len(data) < HEADER.size + MAC_LEN:
        raise WireError("short")
    body, mac = data[:-MAC_LEN], data[-MAC_LEN:]
    if not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest(), mac):
        raise WireError("auth")
    magic, version, typ, flags, count, node, epoch, peer_epoch, pno, seq, ack = \
        HEADER.unpack_from(body)
    if magic != MAGIC:
        raise WireError("malformed")
    if version != VERSION:
        raise WireError("version")
    return Message(typ, flags, count, node, epoch, peer_epoch, pno, seq, ack,
                   body[HEADER.size:])


def pack_record(op: int, origin: int, record: bytes) -> bytes:
    return RECORD_HDR.pack(op, origin, len(record)) + record


def records(payload: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(op, origin node, record) of a DATA payload; raises WireError if it is cut short."""
    off, end = 0, len(payload)
    while off < end:
        if off + RECORD_HDR.size > end:
            raise WireError("malformed")
        op, origin, n = RECORD_HDR.unpack_from(payload, off)
        off += RECORD_HDR.size
        if off + n > end:
            raise WireError("malformed")
        yield op, origin, payload[off:off + n]
        off += n


ROOM = MAX_DATAGRAM - HEADER.size - MAC_LEN  # payload bytes per datagram


class ReplayWindow:
    """Per sender: the newest epoch and a 64-wide window of packet numbers (as IPsec's)."""

    __slots__ = ("epoch", "top", "bits")

    def __init__(self) -> None:
        self.epoch = -1
        self.top = 0
        self.bits = 0

    def check(self, epoch: int, pno: int) -> str | None:
        """None if new (and remembered), else why it is a replay. A newer epoch (the
        sender restarted) starts a new window."""
        if epoch < self.epoch:
            return "old_epoch"
        if epoch > self.epoch:
            self.epoch, self.top, self.bits = epoch, pno, 1
            return None
        if pno > self.top:
            shift = pno - self.top
            self.bits = ((self.bits << shift) | 1) & ((1 << 64) - 1) if shift < 64 else 1
            self.top = pno
            return None
        behind = self.top - pno
        if behind >= 64:
            return "replay"
        if self.bits >> behind & 1:
            return "replay"
        self.bits |= 1 << behind
        return None
