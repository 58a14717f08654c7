"""All-active load sharing, the pure part: which member prefers which bucket, and which
bucket a packet's connection falls in. No I/O.

Buckets. Traffic for the cluster's VIPs is split into a fixed number of buckets; each
bucket is a virtual router of its own (VRID `vrid_base + b` on the election VLAN), elected
with the ordinary VRRP machinery, so exactly one member is master of it, a dead member's
buckets move within Master_Down_Interval and a returning member takes its own back by
preemption (OpenBSD's CARP balancing works the same way). The priorities come from the
member list alone (`ranking`): each member is first for B/N buckets, and a lost member's
buckets spread evenly over the survivors instead of all falling to one neighbour.
(Rendezvous hashing was tried first: with 16 buckets and 3 members it gave 2/9/5.)

Flow hash. Every member must put every packet of a connection, both directions, on every
VLAN it crosses, in the same bucket, on separate machines. The hash is therefore:
- symmetric: the two endpoints (address, port) are put in a canonical order first, so a
  reply reaching a member that holds no state for the connection hashes like the request;
- keyed by a configured seed, not by a per-boot secret (nftables' `symhash` is, so two
  machines would disagree; a lab on one kernel would not show it);
- over addresses and ports (xt_cluster hashes the source address only: one client's
  connections would all land in one bucket).
The kernel keeps the result in the connection's ct mark (MARK_CLASSIFIED | bucket), set
when the first packet is classified (vipd.io.cluster); every later packet is matched by
mark alone. Synced entries carry their mark, so state follows its bucket.
"""

from __future__ import annotations

import hashlib
import struct

MARK_CLASSIFIED = 0x100  # ct mark bit: the connection's bucket is in the low 8 bits
MARK_MASK = 0x1FF
MAX_BUCKETS = 256
MAX_MEMBERS = 12
TOP_PRIORITY = 250
PRIORITY_STEP = 20

IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58
IPPROTO_SCTP, IPPROTO_UDPLITE, IPPROTO_DCCP = 132, 136, 33
_PORTED = frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, IPPROTO_UDPLITE, IPPROTO_DCCP})
# ICMP echo: the identifier names the exchange in both directions
_ECHO4, _ECHO6 = frozenset({8, 0}), frozenset({128, 129})


def ranking(members: tuple[str, ...], bucket: int) -> list[str]:
    """The members in order of preference for the bucket. The members are put in name
    order (every node agrees whatever order its list has); bucket b is preferred by member
    b mod N, and its k-th bucket (k = b div N) falls next to the other members in turn,
    rotated by k: each member is first for B/N buckets (rounded), and when one is lost its
    buckets spread evenly over the survivors."""
    ordered = sorted(members)
    n = len(ordered)
    first = ordered[bucket % n]
    others = [m for m in ordered if m != first]
    k = (bucket // n) % len(others) if others else 0
    return [first, *others[k:], *others[:k]]


def bucket_priority(members: tuple[str, ...], me: str, bucket: int) -> int:
    """This member's VRRP priority for the bucket: 250 for the preferred member, then 230,
    210, ... (at most MAX_MEMBERS members, so the lowest is 30)."""
    return TOP_PRIORITY - PRIORITY_STEP * ranking(members, bucket).index(me)


def preferred_shares(members: tuple[str, ...], buckets: int) -> dict[str, int]:
    """How many buckets each member is first for."""
    out = dict.fromkeys(members, 0)
    for b in range(buckets):
        out[ranking(members, b)[0]] += 1
    return out


def flow_bucket(proto: int, a: bytes, a_port: int, b: bytes, b_port: int,
                buckets: int, seed: bytes) -> int:
    """The bucket of a connection between endpoints (a, a_port) and (b, b_port), the same
    whichever side is the source."""
    one, two = (a, a_port), (b, b_port)
    if two < one:
        one, two = two, one
    digest = hashlib.blake2b(struct.pack("!B", proto) + one[0] + struct.pack("!H", one[1])
                             + two[0] + struct.pack("!H", two[1]),
                             digest_size=8, key=seed).digest()
    return int.from_bytes(digest, "big") % buckets


def packet_bucket(packet: bytes, buckets: int, seed: bytes) -> int | None:
    """The bucket of an IP packet (as NFQUEUE hands it over: from the IP header on), or
    None if it is not IPv4/IPv6 or too short to say."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < 20:
            return None
        ihl = (packet[0] & 0x0F) * 4
        proto, src, dst = packet[9], packet[12:16], packet[16:20]
        frag = struct.unpack_from("!H", packet, 6)[0] & 0x1FFF
        l4 = packet[ihl:] if frag == 0 else b""  # a later fragment: addresses only
    elif version == 6:
        if len(packet) < 40:
            return None
        proto, src, dst = packet[6], packet[8:24], packet[24:40]
        l4 = packet[40:]  # (extension headers: hashed by addresses and protocol)
    else:
        return None
    sport = dport = 0
    if proto in _PORTED and len(l4) >= 4:
        sport, dport = struct.unpack_from("!HH", l4)
    elif len(l4) >= 6 and ((proto == IPPROTO_ICMP and l4[0] in _ECHO4)
                           or (proto == IPPROTO_ICMPV6 and l4[0] in _ECHO6)):
        sport = dport = struct.unpack_from("!H", l4, 4)[0]
    return flow_bucket(proto, src, sport, dst, dport, buckets, seed)


def mark_of(bucket: int) -> int:
    return MARK_CLASSIFIED | bucket
