"""VRRP wire codec: VRRPv3 (RFC 9568 / RFC 5798) for IPv4 and IPv6, VRRPv2 (RFC 3768).

Pure and struct-based. `encode_*` builds the VRRP payload (what follows the IP header);
`decode` checks one thing at a time and rejects with exactly one `DropReason`. Nothing but
`DecodeError` ever leaves `decode`, whatever the bytes. Checks that need the configuration
(unknown VRID, version, v2 interval) live in `check_against`, which is separate so the
receive path can count every reason the same way; it returns the address-list difference
instead of dropping, since a peer with another list is still a peer (the router decides).

Liberal in what we accept: an IPv6 advert whose first address is not link-local (RFC 9568
5.2.9 puts that rule on the sender; keepalived sends only the configured global VIPs) is
accepted and flagged (`Advert.first_not_link_local`), never dropped.

IPv4 VRRPv3 checksums come in two variants, both seen on real networks:
  * RFC 9568 5.2.8: over the VRRP message only (Cisco, Juniper, Arista);
  * RFC 5798 as read by keepalived and FRR: with the IPv4 pseudo-header.
The decoder accepts either and reports which one matched. IPv6 always uses the pseudo-header.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from vipd.core.timing import s_to_cs

IPPROTO_VRRP = 112
VRRP_TTL = 255
VRRP_GROUP_V4 = ipaddress.IPv4Address("224.0.0.18")
VRRP_GROUP_V6 = ipaddress.IPv6Address("ff02::12")

TYPE_ADVERTISEMENT = 1
V2_AUTH_DATA_LEN = 8
MAX_ADVER_INT_CS = 0x0FFF  # 12 bits, centiseconds (RFC 9568 5.2.7)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_HDR = struct.Struct("!BBBBHH")  # ver/type, vrid, prio, count, (rsvd/maxadv | auth/adv), cksum


class DropReason(enum.Enum):
    """Why a received packet was not handed to a state machine (one counter each)."""

    TTL = "ttl"  # TTL / hop limit != 255
    VERSION = "version"
    TYPE = "type"
    LENGTH = "length"
    COUNT = "count"  # count 0, or count not matching the packet length
    INTERVAL_ZERO = "interval_zero"  # Max Adver Int / Adver Int of 0
    CHECKSUM = "checksum"
    UNKNOWN_VRID = "unknown_vrid"
    ADDRESS_MISMATCH = "address_mismatch"  # only with `address_check: strict`
    V2_INTERVAL_MISMATCH = "v2_interval_mismatch"
    OWN_PACKET = "own_packet"  # looped back copy of our own advert
    SUPERSEDED = "superseded"  # a newer advert from the same sender was in the same batch
    UNKNOWN_PEER = "unknown_peer"  # unicast: the source is not a configured peer


class ChecksumVariant(enum.Enum):
    """How an IPv4 VRRPv3 checksum was (or is to be) computed."""

    RFC9568 = "rfc9568"  # VRRP message only
    PSEUDO_HEADER = "pseudo-header"  # with the IPv4 pseudo-header (keepalived, FRR)
    V2 = "v2"  # VRRPv2: VRRP message only
    IPV6 = "ipv6"  # IPv6: pseudo-header is mandatory


class AuthType(enum.IntEnum):
    """VRRPv2 Auth Type (RFC 3768 5.3.6). Reported, never trusted."""

    NONE = 0
    SIMPLE_TEXT = 1
    IP_AH = 2


class DecodeError(Exception):
    """A packet was rejected; `reason` says which single check failed."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class IpMeta:
    """What the IP layer told us about a received VRRP payload."""

    family: int  # 4 or 6
    src: IPAddress
    dst: IPAddress
    ttl: int  # TTL (IPv4) or hop limit (IPv6)
    # hashed once: the receive path looks adverts up by (payload, meta) at every packet
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.family, self.src, self.dst, self.ttl)))

    def __hash__(self) -> int:
        return self._hash


@dataclass(frozen=True, slots=True)
class Advert:
    """A decoded VRRP advertisement (v2 or v3)."""

    version: int
    family: int
    vrid: int
    priority: int
    src: IPAddress
    addresses: tuple[IPAddress, ...]
    # v3: Max Adver Int in centiseconds. v2: Adver Int in seconds, kept in its own field so
    # nobody mixes units; `interval_cs` gives both in centiseconds.
    max_adver_int_cs: int = 0
    adver_int_s: int = 0
    checksum_variant: ChecksumVariant = ChecksumVariant.RFC9568
    auth_type: int = 0
    auth_data: bytes = b""

    @property
    def interval_cs(self) -> int:
        return self.max_adver_int_cs if self.version == 3 else s_to_cs(self.adver_int_s)

    @property
    def first_not_link_local(self) -> bool:
        """RFC 9568 5.2.9 wants the IPv6 link-local address first; some senders omit it."""
        return self.family == 6 and bool(self.addresses) and _not_ll(self.addresses[0])


@dataclass(frozen=True, slots=True)
class AddressDiff:
    """How a peer's address list differs from ours (link-locals compared only when the
    peer sends one: implementations differ in whether they list it)."""

    missing: tuple[IPAddress, ...]  # ours, not in the advert
    extra: tuple[IPAddress, ...]  # in the advert, not ours


# ---------------------------------------------------------------- checksum helpers


def internet_checksum(data: bytes) -> int:
    """RFC 1071 one's complement sum, complemented."""
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_header(src: IPAddress, dst: IPAddress, length: int) -> bytes:
    if src.version == 4:
        return src.packed + dst.packed + struct.pack("!BBH", 0, IPPROTO_VRRP, length)
    # RFC 8200 8.1: upper-layer packet length (32 bits), 3 zero bytes, next header
    return src.packed + dst.packed + struct.pack("!I3xB", length, IPPROTO_VRRP)


def vrrp_checksum(
    payload_zeroed: bytes, variant: ChecksumVariant, src: IPAddress, dst: IPAddress
) -> int:
    """Checksum of a VRRP payload whose checksum field is zero."""
    if variant in (ChecksumVariant.PSEUDO_HEADER, ChecksumVariant.IPV6):
        return internet_checksum(_pseudo_header(src, dst, len(payload_zeroed)) + payload_zeroed)
    return internet_checksum(payload_zeroed)


# ---------------------------------------------------------------- encode


def encode_v3(
    *,
    vrid: int,
    priority: int,
    max_adver_int_cs: int,
    addresses: Sequence[IPAddress],
    src: IPAddress,
    dst: IPAddress | None = None,
    variant: ChecksumVariant = ChecksumVariant.PSEUDO_HEADER,
) -> bytes:
    """Build a VRRPv3 advertisement payload. `variant` matters for IPv4 only."""
    family = src.version
    if dst is None:
        dst = VRRP_GROUP_V4 if family == 4 else VRRP_GROUP_V6
    if family == 6:
        variant = ChecksumVariant.IPV6
    elif variant not in (ChecksumVariant.RFC9568, ChecksumVariant.PSEUDO_HEADER):
        raise ValueError(f"checksum variant {variant} is not an IPv4 VRRPv3 variant")
    if not 1 <= vrid <= 255 or not 0 <= priority <= 255:
        raise ValueError("vrid must be 1..255 and priority 0..255")
    if not 1 <= max_adver_int_cs <= MAX_ADVER_INT_CS:
        raise ValueError(f"max_adver_int_cs {max_adver_int_cs} outside 1..{MAX_ADVER_INT_CS}")
    if not 1 <= len(addresses) <= 255 or any(a.version != family for a in addresses):
        raise ValueError("1..255 addresses of the source's family are needed")
    body = b"".join(a.packed for a in addresses)
    head = _HDR.pack(0x30 | TYPE_ADVERTISEMENT, vrid, priority, len(addresses),
                     max_adver_int_cs & 0x0FFF, 0)
    zeroed = head + body
    cks = vrrp_checksum(zeroed, variant, src, dst)
    return zeroed[:6] + struct.pack("!H", cks) + body


def encode_v2(
    *,
    vrid: int,
    priority: int,
    adver_int_s: int,
    addresses: Sequence[ipaddress.IPv4Address],
    auth_type: int = AuthType.NONE,
    auth_data: bytes = b"",
) -> bytes:
    """Build a VRRPv2 advertisement payload (RFC 3768 5.1)."""
    if not 1 <= vrid <= 255 or not 0 <= priority <= 255 or not 1 <= adver_int_s <= 255:
        raise ValueError("vrid 1..255, priority 0..255 and adver_int_s 1..255 are needed")
    if not 1 <= len(addresses) <= 255 or any(a.version != 4 for a in addresses):
        raise ValueError("1..255 IPv4 addresses are needed")
    auth = auth_data[:V2_AUTH_DATA_LEN].ljust(V2_AUTH_DATA_LEN, b"\x00")
    body = b"".join(a.packed for a in addresses) + auth
    head = _HDR.pack(0x20 | TYPE_ADVERTISEMENT, vrid, priority, len(addresses),
                     (auth_type << 8) | adver_int_s, 0)
    cks = internet_checksum(head + body)
    return head[:6] + struct.pack("!H", cks) + body


# ---------------------------------------------------------------- decode


def decode(payload: bytes, meta: IpMeta) -> Advert:
    """Decode and check one VRRP payload. Raises only DecodeError."""
    try:
        return _decode(payload, meta)
    except DecodeError:
        raise
    except Exception as exc:  # defensive: a codec bug must not kill the receive path
        raise DecodeError(DropReason.LENGTH, f"undecodable: {exc!r}") from exc


def _decode(payload: bytes, meta: IpMeta) -> Advert:
    if meta.ttl != VRRP_TTL:
        raise DecodeError(DropReason.TTL, f"ttl {meta.ttl}")
    if len(payload) < _HDR.size:
        raise DecodeError(DropReason.LENGTH, f"{len(payload)} bytes")
    vt, vrid, priority, count, word, cks = _HDR.unpack_from(payload)
    version, ptype = vt >> 4, vt & 0x0F
    if version not in (2, 3) or (version == 2 and meta.family != 4):
        raise DecodeError(DropReason.VERSION, f"version {version} over IPv{meta.family}")
    if ptype != TYPE_ADVERTISEMENT:
        raise DecodeError(DropReason.TYPE, f"type {ptype}")
    alen = 4 if meta.family == 4 else 16
    tail = V2_AUTH_DATA_LEN if version == 2 else 0
    body_len = len(payload) - _HDR.size - tail
    if body_len < 0 or body_len % alen:
        raise DecodeError(DropReason.LENGTH, f"{len(payload)} bytes")
    if count == 0 or count * alen != body_len:
        raise DecodeError(DropReason.COUNT, f"count {count} for {body_len // alen} addresses")
    interval = word & 0x0FFF if version == 3 else word & 0xFF
    if interval == 0:
        raise DecodeError(DropReason.INTERVAL_ZERO)
    zeroed = payload[:6] + b"\x00\x00" + payload[8:]
    variant = _check_checksum(version, meta, zeroed, cks)
    addrs = _addresses(payload[_HDR.size:_HDR.size + count * alen], alen)
    if version == 3:
        return Advert(3, meta.family, vrid, priority, meta.src, addrs,
                      max_adver_int_cs=interval, checksum_variant=variant)
    auth = payload[len(payload) - V2_AUTH_DATA_LEN:]
    return Advert(2, 4, vrid, priority, meta.src, addrs, adver_int_s=interval,
                  checksum_variant=variant, auth_type=word >> 8, auth_data=auth)


@functools.lru_cache(maxsize=256)
def _not_ll(address: IPAddress) -> bool:
    # A network lookup: slow, so remembered. Keyed by the one address, not the list:
    # hashing a list of 255 IPv6 addresses cost more than the lookup it saved.
    return not address.is_link_local


@functools.lru_cache(maxsize=256)
def _addresses(raw: bytes, alen: int) -> tuple[IPAddress, ...]:
    """The address list of an advert. A peer sends the same list every interval: decoding
    255 IPv6 addresses each time was most of a large advert's cost, so it is memoized."""
    make = ipaddress.IPv4Address if alen == 4 else ipaddress.IPv6Address
    return tuple(make(raw[i:i + alen]) for i in range(0, len(raw), alen))


def _check_checksum(version: int, meta: IpMeta, zeroed: bytes, cks: int) -> ChecksumVariant:
    candidates: tuple[ChecksumVariant, ...]
    if version == 2:
        candidates = (ChecksumVariant.V2,)
    elif meta.family == 6:
        candidates = (ChecksumVariant.IPV6,)
    else:
        candidates = (ChecksumVariant.RFC9568, ChecksumVariant.PSEUDO_HEADER)
    for variant in candidates:
        if vrrp_checksum(zeroed, variant, meta.src, meta.dst) == cks:
            return variant
    raise DecodeError(DropReason.CHECKSUM, f"0x{cks:04x}")


# ---------------------------------------------------------------- checks against config


@dataclass(frozen=True, slots=True)
class ReceiverView:
    """What the receive path knows about one local virtual router, for `check_against`."""

    vrid: int
    version: int
    addresses: frozenset[IPAddress]
    adver_int_cs: int
    accept_v2: bool = False  # a v3 router in RFC 5798 8.4 VRRPv2 compatibility
    peers: frozenset[IPAddress] | None = None  # unicast: only these may speak


def check_against(advert: Advert, view: ReceiverView | None) -> AddressDiff | None:
    """Checks that need the local configuration. Raises DecodeError with one reason;
    returns how the advert's address list differs from ours (None when it matches)."""
    if view is None:
        raise DecodeError(DropReason.UNKNOWN_VRID, f"vrid {advert.vrid}")
    if advert.version != view.version and not (advert.version == 2 and view.accept_v2):
        raise DecodeError(DropReason.VERSION, f"v{advert.version} for a v{view.version} router")
    if view.peers is not None and advert.src not in view.peers:
        raise DecodeError(DropReason.UNKNOWN_PEER, str(advert.src))
    if advert.version == 2 and advert.interval_cs != view.adver_int_cs:
        # RFC 3768 7.1: the Adver Interval must match the locally configured one
        raise DecodeError(DropReason.V2_INTERVAL_MISMATCH,
                          f"{advert.adver_int_s}s, ours {view.adver_int_cs / 100:g}s")
    # A peer sends the same list every interval, and `_addresses` hands out the same tuple
    # for the same bytes: remember the answer by identity (hashing 255 addresses per advert
    # would cost more than comparing them).
    key = (id(advert.addresses), id(view.addresses))
    hit = _diff_memo.get(key)
    if hit is not None and hit[0] is advert.addresses and hit[1] is view.addresses:
        return hit[2]
    diff = address_diff(advert.addresses, view.addresses)
    if len(_diff_memo) >= 512:
        _diff_memo.clear()
    _diff_memo[key] = (advert.addresses, view.addresses, diff)  # holds them: ids stay theirs
    return diff


_diff_memo: dict[tuple[int, int], tuple[tuple[IPAddress, ...], frozenset[IPAddress],
                                        AddressDiff | None]] = {}


def address_diff(theirs: tuple[IPAddress, ...],
                 ours: frozenset[IPAddress]) -> AddressDiff | None:
    got = frozenset(theirs)
    if got == ours:
        return None
    if not any(_is_ll6(a) for a in got) or not any(_is_ll6(a) for a in ours):
        # one side does not list its link-local (keepalived never does): compare the rest
        got = frozenset(a for a in got if not _is_ll6(a))
        ours = frozenset(a for a in ours if not _is_ll6(a))
    missing, extra = ours - got, got - ours
    if not missing and not extra:
        return None
    return AddressDiff(tuple(sorted_addresses(missing)), tuple(sorted_addresses(extra)))


def _is_ll6(a: IPAddress) -> bool:
    return a.version == 6 and a.is_link_local


def sorted_addresses(addresses: Iterable[IPAddress]) -> list[IPAddress]:
    return sorted(addresses, key=lambda a: (a.version, a.packed))
