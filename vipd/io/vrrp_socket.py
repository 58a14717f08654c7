"""Raw IP protocol 112 sockets, one per (interface, family).

Joins 224.0.0.18 / ff02::12 on its interface only (SO_BINDTODEVICE), sends with TTL / hop
limit 255 and the source address we choose (IP_PKTINFO / IPV6_PKTINFO, so the pseudo-header
checksum is computed over the address the peer will see), and never loops its own packets
back. `recv_all` drains the socket without blocking and returns (payload, IpMeta, age)
triples, where age is how long ago the kernel received the packet (SO_TIMESTAMPNS): timers
run from reception, not from when a busy daemon got round to it. Parsing the IPv4 header
here is the only packet parsing outside vipd.core.packet.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vipd.core.packet import IPPROTO_VRRP, VRRP_GROUP_V4, VRRP_GROUP_V6, IPAddress, IpMeta
from vipd.io import mmsg
from vipd.io.mmsg import cmsgs

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
MAX_TRUSTED_AGE_S = 1.0  # older (or negative: the wall clock jumped): not trusted, use 0

Received = tuple[bytes, IpMeta, float]
Ancillary = tuple[int, int, "bytes | memoryview"]  # (level, type, data) of a control message
# At most this many packets per read: a flood must not keep the loop from our own adverts
# and timers (the reader is level-triggered, so the rest is read on the next turn).
RECV_BATCH = 256
# The largest VRRP packet: IPv4 header with options, 8 bytes of header, 255 IPv6 addresses.
# A 64 KiB buffer per recvmsg cost more than the rest of the receive path.
MAX_PACKET = 60 + 8 + 255 * 16 + 8
TOS_NETWORK_CONTROL = 0xC0
CONTROL_SIZE = 256  # timestamp, hop limit, packet info: about 100 bytes
MMSG_BATCH = 64  # datagrams per recvmmsg call (its buffers: 64 x MAX_PACKET per socket)


class VrrpTransport(Protocol):
    ifname: str
    family: int

    def fileno(self) -> int: ...
    def recv_all(self, limit: int = RECV_BATCH) -> list[Received]: ...
    def send(self, payload: bytes, src: IPAddress, dst: IPAddress | None = None) -> None: ...
    def close(self) -> None: ...


class VrrpSocket:
    def __init__(self, ifname: str, ifindex: int, family: int, send_only: bool = False) -> None:
        """`send_only`: no group membership and a drop-everything socket filter (the
        advert socket of a virtual MAC; receiving stays with the parent's socket)."""
        self.ifname, self.ifindex, self.family = ifname, ifindex, family
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        s = socket.socket(af, socket.SOCK_RAW, IPPROTO_VRRP)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            if send_only:
                _drop_all(s)
            if family == 4:
                mreqn = struct.pack("=4s4si", VRRP_GROUP_V4.packed, b"\0" * 4, ifindex)
                if not send_only:
                    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
                s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
                s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
                s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 255)  # unicast peers
                s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
                s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, TOS_NETWORK_CONTROL)
            else:
                mreq = VRRP_GROUP_V6.packed + struct.pack("=I", ifindex)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, TOS_NETWORK_CONTROL)
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        self._sock = s
        # one system call per burst (vipd.io.mmsg); recvmsg per packet where unavailable
        self.unusual_control = 0  # packets whose control messages needed the slow parser
        self._mmsg = None if send_only or not mmsg.available() else mmsg.MmsgReader(
            s.fileno(), MMSG_BATCH, MAX_PACKET, CONTROL_SIZE)
        self._send_args: tuple[IPAddress, list[tuple[int, int, bytes]], tuple[Any, ...],
                               IPAddress | None] | None = None

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def recv_all(self, limit: int = RECV_BATCH) -> list[Received]:
        out: list[Received] = []
        wall_ns = time.time_ns()  # once per batch: the packets' ages are against it
        v4 = self.family == 4
        if self._mmsg is not None:
            while len(out) < limit:
                got = self._mmsg_batch(limit - len(out), wall_ns, v4, out)
                if got < MMSG_BATCH:
                    break
            return out
        while len(out) < limit:
            try:
                data, anc, _flags, addr = self._sock.recvmsg(MAX_PACKET, CONTROL_SIZE)
            except BlockingIOError:
                return out
            item = parse_ipv4(data) if v4 else parse_ipv6(
                data, anc, socket.inet_pton(socket.AF_INET6, str(addr[0]).split("%", 1)[0]))
            if item is not None:
                out.append((item[0], item[1], packet_age(anc, wall_ns)))
        return out

    def _mmsg_batch(self, limit: int, wall_ns: int, v4: bool, out: list[Received]) -> int:
        """One recvmmsg call: what it read goes to `out`; returns how many datagrams."""
        assert self._mmsg is not None
        batch = self._mmsg.read(min(limit, MMSG_BATCH))
        for data, control, name, _truncated in batch:
            fast = _usual_control(control, v4)
            if fast is not None:  # the kernel's usual control messages, in one unpack
                stamp_ns, dst, hop = fast
                item = parse_ipv4(data) if v4 else _ipv6_item(data, bytes(name[8:24]), dst, hop)
                age = _age_s(stamp_ns, wall_ns)
            else:
                self.unusual_control += 1
                anc: Sequence[Ancillary] = cmsgs(control)
                item = parse_ipv4(data) if v4 else parse_ipv6(data, anc, bytes(name[8:24]))
                age = packet_age(anc, wall_ns)
            if item is not None:
                out.append((item[0], item[1], age))
        return len(batch)

    def send(self, payload: bytes, src: IPAddress, dst: IPAddress | None = None) -> None:
        """To the VRRP group, or to a unicast peer `dst` (TTL 255 either way)."""
        # the control message and destination are the same every time for one source
        cached = self._send_args
        if cached is None or cached[0] != src or cached[3] != dst:
            if self.family == 4:
                info = struct.pack("=i4s4s", self.ifindex, src.packed, b"\0" * 4)
                cached = (src, [(socket.IPPROTO_IP, IP_PKTINFO, info)],
                          (str(dst or VRRP_GROUP_V4), 0), dst)
            else:
                info = src.packed + struct.pack("=I", self.ifindex)
                cached = (src, [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, info)],
                          (str(dst or VRRP_GROUP_V6), 0, 0, self.ifindex), dst)
            self._send_args = cached
        self._sock.sendmsg([payload], cached[1], 0, cached[2])


SO_ATTACH_FILTER = 26
BPF_RET_K = 0x06


def _drop_all(s: socket.socket) -> None:
    """Attach a one-instruction classic BPF program: `ret #0` (accept nothing)."""
    import ctypes

    prog = ctypes.create_string_buffer(struct.pack("=HBBI", BPF_RET_K, 0, 0, 0))
    fprog = struct.pack("=HxxxxxxQ", 1, ctypes.addressof(prog))
    s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)  # the kernel copies it


def packet_age(ancdata: Sequence[Ancillary], wall_ns: int | None = None) -> float:
    """Seconds since the kernel received the packet, from its SCM_TIMESTAMPNS, against
    the wall clock `wall_ns` (read now if not given)."""
    for level, ctype, cdata in ancdata:
        if level == socket.SOL_SOCKET and ctype == SO_TIMESTAMPNS and len(cdata) >= 16:
            sec, nsec = struct.unpack("=qq", cdata[:16])
            return _age_s(sec * 1_000_000_000 + nsec,
                          time.time_ns() if wall_ns is None else wall_ns)
    return 0.0


def _age_s(stamp_ns: int, wall_ns: int) -> float:
    age = (wall_ns - stamp_ns) / 1e9
    return age if 0 <= age <= MAX_TRUSTED_AGE_S else 0.0


# What the kernel attaches to every packet here, in its order: the timestamp (socket
# level, first), then for IPv6 the packet info and the hop limit. Header fields are checked;
# anything else goes through the general parser (cmsgs).
_CONTROL4 = struct.Struct("=Qiiqq")
_CONTROL6 = struct.Struct("=Qiiqq Qii16sI4x Qiii4x")
_HEAD4 = (32, socket.SOL_SOCKET, SO_TIMESTAMPNS)
_HEAD6 = (32, socket.SOL_SOCKET, SO_TIMESTAMPNS, 36, socket.IPPROTO_IPV6,
          socket.IPV6_PKTINFO, 20, socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT)


def _usual_control(control: bytes | memoryview, v4: bool) -> tuple[int, bytes | None, int] | None:
    """(kernel timestamp in ns, destination address, hop limit) when the control buffer
    has exactly the usual layout, else None."""
    if v4:
        if len(control) != _CONTROL4.size:
            return None
        ln, lvl, typ, sec, nsec = _CONTROL4.unpack(control)
        if (ln, lvl, typ) != _HEAD4:
            return None
        return sec * 1_000_000_000 + nsec, None, -1
    if len(control) != _CONTROL6.size:
        return None
    f = _CONTROL6.unpack(control)
    if (f[0], f[1], f[2], f[5], f[6], f[7], f[10], f[11], f[12]) != _HEAD6:
        return None
    return f[3] * 1_000_000_000 + f[4], f[8], f[13]


def parse_ipv4(data: bytes) -> tuple[bytes, IpMeta] | None:
    """Split a raw IPv4 datagram into VRRP payload and metadata; None if not IPv4/112."""
    if len(data) < 20 or data[0] >> 4 != 4:
        return None
    ihl = (data[0] & 0x0F) * 4
    total = struct.unpack_from("!H", data, 2)[0]
    if ihl < 20 or data[9] != IPPROTO_VRRP or len(data) < ihl:
        return None
    end = min(total, len(data)) if total >= ihl else len(data)
    return data[ihl:end], _meta4(data[12:16], data[16:20], data[8])


# The same few peers send every packet: one IpMeta (and address objects) per distinct
# header, reused, so building and hashing them costs nothing per packet.
@functools.lru_cache(maxsize=1024)
def _meta4(src: bytes, dst: bytes, ttl: int) -> IpMeta:
    return IpMeta(4, ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst), ttl)


@functools.lru_cache(maxsize=1024)
def _meta6(src: bytes, dst: bytes | None, hop: int) -> IpMeta:
    return IpMeta(6, ipaddress.IPv6Address(src),
                  VRRP_GROUP_V6 if dst is None else ipaddress.IPv6Address(dst), hop)


def parse_ipv6(data: bytes, ancdata: Sequence[Ancillary],
               src: bytes) -> tuple[bytes, IpMeta] | None:
    """The payload and metadata of an IPv6 datagram from its source address (16 bytes)
    and control messages (hop limit, destination)."""
    hop, dst = -1, None
    for level, ctype, cdata in ancdata:
        if level != socket.IPPROTO_IPV6:
            continue
        if ctype == socket.IPV6_HOPLIMIT and len(cdata) >= 4:
            hop = struct.unpack("=i", cdata[:4])[0]
        elif ctype == socket.IPV6_PKTINFO and len(cdata) >= 16:
            dst = bytes(cdata[:16])
    return _ipv6_item(data, src, dst, hop)


def _ipv6_item(data: bytes, src: bytes, dst: bytes | None,
               hop: int) -> tuple[bytes, IpMeta] | None:
    if len(src) != 16:
        return None
    return data, _meta6(src, dst, hop)


@dataclass
class FakeVrrpTransport:
    """In-memory stand-in: records what was sent, returns what a test queued."""

    ifname: str
    family: int
    sent: list[tuple[bytes, IPAddress]] = field(default_factory=list)
    sent_to: list[IPAddress] = field(default_factory=list)  # unicast destinations, in order
    inbox: list[Received] = field(default_factory=list)
    fail_sends: bool = False

    def fileno(self) -> int:
        return -1

    def recv_all(self, limit: int = RECV_BATCH) -> list[Received]:
        out, self.inbox = self.inbox[:limit], self.inbox[limit:]
        return out

    def send(self, payload: bytes, src: IPAddress, dst: IPAddress | None = None) -> None:
        if self.fail_sends:
            raise OSError(101, "Network is unreachable")
        self.sent.append((payload, src))
        if dst is not None:
            self.sent_to.append(dst)

    def close(self) -> None:
        pass
