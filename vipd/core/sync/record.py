"""Conntrack entries as sync records: the kernel's own netlink attributes (ctnetlink), kept
as bytes. Pure.

A record is the attribute blob of one IPCTNL_MSG_CT_NEW message, filtered to what a peer
needs to re-create the entry: both tuples, status, timeout, mark, zone, TCP protocol state
(state, window scale, flags), labels and NAT sequence adjustments. Carrying the kernel's
encoding means no per-flow objects on the hot path and nothing lost in translation; a new
attribute is one more type in CARRIED. The key of an entry is its original tuple plus its
zone, byte for byte.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

# enum ctattr_type (linux/netfilter/nfnetlink_conntrack.h)
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_PROTOINFO = 4
CTA_TIMEOUT = 7
CTA_MARK = 8
CTA_ID = 12
CTA_SEQ_ADJ_ORIG = 15
CTA_SEQ_ADJ_REPLY = 16
CTA_ZONE = 18
CTA_LABELS = 22

CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1

CARRIED = frozenset({CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO, CTA_TIMEOUT,
                     CTA_MARK, CTA_SEQ_ADJ_ORIG, CTA_SEQ_ADJ_REPLY, CTA_ZONE, CTA_LABELS})

# status bits (enum ip_conntrack_status)
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_CONFIRMED = 1 << 3
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
IPS_SEQ_ADJUST = 1 << 6
# what a peer may set when it re-creates the entry (the kernel refuses or manages the rest)
STATUS_SETTABLE = IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED | IPS_SEQ_ADJUST

TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
              "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2")

_HDR = struct.Struct("=HH")


class RecordError(ValueError):
    pass


def attrs(blob: bytes | memoryview, offset: int = 0,
          end: int | None = None) -> list[tuple[int, int, int]]:
    """The attributes in blob[offset:end]: (type without flags, value start, value end)."""
    out = []
    end = len(blob) if end is None else end
    while offset + 4 <= end:
        length, typ = _HDR.unpack_from(blob, offset)
        if length < 4 or offset + length > end:
            raise RecordError(f"bad attribute length {length} at {offset}")
        out.append((typ & NLA_TYPE_MASK, offset + 4, offset + length))
        offset += (length + 3) & ~3
    return out


def encode_attr(typ: int, value: bytes) -> bytes:
    raw = _HDR.pack(4 + len(value), typ) + value
    return raw + b"\0" * (-len(raw) % 4)


def carried(blob: bytes | memoryview, offset: int = 0, end: int | None = None) -> bytes:
    """The record of a ctnetlink message's attributes: the carried ones, in order."""
    parts = []
    for typ, start, stop in attrs(blob, offset, end):
        if typ in CARRIED:
            parts.append(bytes(blob[start - 4:stop]))
            pad = -(stop - start + 4) % 4
            if pad:
                parts.append(b"\0" * pad)
    return b"".join(parts)


def key_of(record: bytes) -> bytes:
    """The identity of an entry: its original tuple and its zone, as encoded."""
    tup = zone = b""
    for typ, start, stop in attrs(record):
        if typ == CTA_TUPLE_ORIG:
            tup = record[start:stop]
        elif typ == CTA_ZONE:
            zone = record[start:stop]
    if not tup:
        raise RecordError("no original tuple")
    return tup + zone


def family(record: bytes) -> int:
    """4 or 6: the address family of the entry (from its original tuple's addresses)."""
    for typ, start, stop in attrs(record):
        if typ == CTA_TUPLE_ORIG:
            for t2, s2, e2 in attrs(record, start, stop):
                if t2 == CTA_TUPLE_IP:
                    for t3, _, _ in attrs(record, s2, e2):
                        return 4 if t3 in (CTA_IP_V4_SRC, CTA_IP_V4_DST) else 6
    raise RecordError("no original tuple addresses")


def without_timeout(record: bytes) -> bytes:
    """The record less its timeout (which counts down in the kernel): equal for two reads
    of an entry that did not change."""
    return b"".join(record[start - 4:stop] + b"\0" * (-(stop - start + 4) % 4)
                    for typ, start, stop in attrs(record) if typ != CTA_TIMEOUT)


def tuple_only(record: bytes) -> bytes:
    """The attributes that name an entry (original tuple, zone): a delete request."""
    parts = []
    for typ, start, stop in attrs(record):
        if typ in (CTA_TUPLE_ORIG, CTA_ZONE):
            parts.append(record[start - 4:stop] + b"\0" * (-(stop - start + 4) % 4))
    return b"".join(parts)


def for_create(record: bytes) -> bytes:
    """The attributes to create the entry on a peer: status limited to what may be set,
    with IPS_CONFIRMED (the kernel refuses an unconfirmed entry with EBUSY)."""
    parts = []
    for typ, start, stop in attrs(record):
        if typ == CTA_STATUS:
            status = struct.unpack_from("!I", record, start)[0]
            parts.append(encode_attr(CTA_STATUS, struct.pack(
                "!I", (status & STATUS_SETTABLE) | IPS_CONFIRMED)))
        else:
            parts.append(record[start - 4:stop] + b"\0" * (-(stop - start + 4) % 4))
    return b"".join(parts)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Flow:
    """A decoded view of a record, for filters, status and tests (not the hot path)."""

    proto: int
    src: IPAddress
    dst: IPAddress
    sport: int
    dport: int
    reply_src: IPAddress
    reply_dst: IPAddress
    status: int
    timeout: int | None
    mark: int
    zone: int
    tcp_state: str | None


def _tuple(blob: bytes, start: int, stop: int) -> tuple[IPAddress, IPAddress, int, int, int]:
    src: IPAddress | None = None
    dst: IPAddress | None = None
    proto = sport = dport = 0
    for typ, s, e in attrs(blob, start, stop):
        if typ == CTA_TUPLE_IP:
            for t2, s2, e2 in attrs(blob, s, e):
                if t2 in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    src = ipaddress.ip_address(blob[s2:e2])
                elif t2 in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    dst = ipaddress.ip_address(blob[s2:e2])
        elif typ == CTA_TUPLE_PROTO:
            for t2, s2, _ in attrs(blob, s, e):
                if t2 == CTA_PROTO_NUM:
                    proto = blob[s2]
                elif t2 == CTA_PROTO_SRC_PORT:
                    sport = struct.unpack_from("!H", blob, s2)[0]
                elif t2 == CTA_PROTO_DST_PORT:
                    dport = struct.unpack_from("!H", blob, s2)[0]
    if src is None or dst is None:
        raise RecordError("tuple without addresses")
    return src, dst, proto, sport, dport


def decode(record: bytes) -> Flow:
    orig = reply = None
    status, timeout, mark, zone, tcp_state = 0, None, 0, 0, None
    for typ, start, stop in attrs(record):
        if typ == CTA_TUPLE_ORIG:
            orig = _tuple(record, start, stop)
        elif typ == CTA_TUPLE_REPLY:
            reply = _tuple(record, start, stop)
        elif typ == CTA_STATUS:
            status = struct.unpack_from("!I", record, start)[0]
        elif typ == CTA_TIMEOUT:
            timeout = struct.unpack_from("!I", record, start)[0]
        elif typ == CTA_MARK:
            mark = struct.unpack_from("!I", record, start)[0]
        elif typ == CTA_ZONE:
            zone = struct.unpack_from("!H", record, start)[0]
        elif typ == CTA_PROTOINFO:
            for t2, s2, e2 in attrs(record, start, stop):
                if t2 == CTA_PROTOINFO_TCP:
                    for t3, s3, _ in attrs(record, s2, e2):
                        if t3 == CTA_PROTOINFO_TCP_STATE:
                            st = record[s3]
                            tcp_state = TCP_STATES[st] if st < len(TCP_STATES) else str(st)
    if orig is None or reply is None:
        raise RecordError("record without both tuples")
    src, dst, proto, sport, dport = orig
    return Flow(proto, src, dst, sport, dport, reply[0], reply[1], status, timeout, mark, zone,
                tcp_state)


def encode_tuple(src: IPAddress, dst: IPAddress, proto: int, sport: int, dport: int) -> bytes:
    """A tuple's nested attributes (tests, and building records by hand)."""
    v4 = src.version == 4
    ip = (encode_attr(CTA_IP_V4_SRC if v4 else CTA_IP_V6_SRC, src.packed)
          + encode_attr(CTA_IP_V4_DST if v4 else CTA_IP_V6_DST, dst.packed))
    pr = encode_attr(CTA_PROTO_NUM, bytes([proto]))
    if proto in (6, 17, 132, 136):
        pr += (encode_attr(CTA_PROTO_SRC_PORT, struct.pack("!H", sport))
               + encode_attr(CTA_PROTO_DST_PORT, struct.pack("!H", dport)))
    return (encode_attr(CTA_TUPLE_IP | NLA_F_NESTED, ip)
            + encode_attr(CTA_TUPLE_PROTO | NLA_F_NESTED, pr))


def make_record(src: IPAddress, dst: IPAddress, proto: int, sport: int, dport: int, *,
                status: int = IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED,
                timeout: int = 120, mark: int = 0, tcp_state: int | None = None) -> bytes:
    """A record built by hand (tests, benchmarks): reply tuple mirrored, no NAT."""
    rec = (encode_attr(CTA_TUPLE_ORIG | NLA_F_NESTED, encode_tuple(src, dst, proto, sport,
                                                                   dport))
           + encode_attr(CTA_TUPLE_REPLY | NLA_F_NESTED, encode_tuple(dst, src, proto, dport,
                                                                      sport))
           + encode_attr(CTA_STATUS, struct.pack("!I", status))
           + encode_attr(CTA_TIMEOUT, struct.pack("!I", timeout))
           + encode_attr(CTA_MARK, struct.pack("!I", mark)))
    if tcp_state is not None:
        tcp = encode_attr(CTA_PROTOINFO_TCP_STATE, bytes([tcp_state]))
        rec += encode_attr(CTA_PROTOINFO | NLA_F_NESTED,
                           encode_attr(CTA_PROTOINFO_TCP | NLA_F_NESTED, tcp))
    return rec


def orig_raw(record: bytes) -> tuple[int, bytes, bytes]:
    """(protocol, source, destination) of the original tuple, addresses as packed bytes."""
    for typ, start, stop in attrs(record):
        if typ == CTA_TUPLE_ORIG:
            return _orig_fields(record, start, stop)
    return 0, b"", b""


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RecordFilter:
    """What is synced: flows of the given protocols (and zones, when given) whose original
    source and destination are both outside the ignored networks (the sync link's own
    traffic, for one)."""

    def __init__(self, protocols: frozenset[int], ignore: tuple[IPNetwork, ...],
                 zones: frozenset[int] | None = None) -> None:
        self.protocols = protocols
        self.zones = zones  # None: every zone
        self._nets = [(n.prefixlen, int(n.network_address), n.max_prefixlen) for n in ignore]
        self.dropped = 0

    def keep(self, record: bytes) -> bool:
        try:
            _, _, proto, src, dst, zone = scan(record, 0, len(record))
        except RecordError:
            self.dropped += 1
            return False
        return self.keep_fields(proto, src, dst, zone)

    def keep_fields(self, proto: int, src: bytes, dst: bytes, zone: int = 0) -> bool:
        if proto not in self.protocols or self._ignored(src) or self._ignored(dst) or (
                self.zones is not None and zone not in self.zones):
            self.dropped += 1
            return False
        return True

    def _ignored(self, packed: bytes) -> bool:
        if not self._nets:
            return False
        value = int.from_bytes(packed, "big")
        bits = len(packed) * 8
        for plen, net, maxlen in self._nets:
            if maxlen == bits and value >> (bits - plen) == net >> (bits - plen):
                return True
        return False


_STATUS_HDR = _HDR.pack(8, CTA_STATUS)
_U32 = struct.Struct("!I")


def scan(blob: bytes, offset: int, end: int) -> tuple[bytes, bytes, int, bytes, bytes, int]:
    """One pass over a ctnetlink message's attributes, for the capture path: the record
    (carried attributes, status in create form), its key, and the original tuple's
    protocol, source and destination (packed) and the zone for the filter. Equal to
    `for_create(carried(...))`, `key_of` and `orig_raw` together, in a third of the
    time."""
    parts = []
    tup = zone = src = dst = b""
    proto = 0
    off = offset
    hdr = _HDR.unpack_from
    while off + 4 <= end:
        length, typ = hdr(blob, off)
        if length < 4 or off + length > end:
            raise RecordError(f"bad attribute length {length} at {off}")
        t = typ & NLA_TYPE_MASK
        nxt = off + ((length + 3) & ~3)
        if t in CARRIED:
            if t == CTA_STATUS:
                status = _U32.unpack_from(blob, off + 4)[0]
                parts.append(_STATUS_HDR + _U32.pack((status & STATUS_SETTABLE) | IPS_CONFIRMED))
            else:
                raw = blob[off:min(nxt, end)]
                parts.append(raw + b"\0" * (-len(raw) % 4))
                if t == CTA_TUPLE_ORIG:
                    tup = blob[off + 4:off + length]
                    proto, src, dst = _orig_fields(blob, off + 4, off + length)
                elif t == CTA_ZONE:
                    zone = blob[off + 4:off + length]
        off = nxt
    if not tup:
        raise RecordError("no original tuple")
    zone_id = int.from_bytes(zone[:2], "big") if len(zone) >= 2 else 0
    return b"".join(parts), tup + zone, proto, src, dst, zone_id


def _orig_fields(blob: bytes, start: int, stop: int) -> tuple[int, bytes, bytes]:
    proto, src, dst = 0, b"", b""
    for t2, s2, e2 in attrs(blob, start, stop):
        if t2 == CTA_TUPLE_IP:
            for t3, s3, e3 in attrs(blob, s2, e2):
                if t3 in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    src = blob[s3:e3]
                elif t3 in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    dst = blob[s3:e3]
        elif t2 == CTA_TUPLE_PROTO:
            for t3, s3, _ in attrs(blob, s2, e2):
                if t3 == CTA_PROTO_NUM:
                    proto = blob[s3]
    return proto, src, dst
