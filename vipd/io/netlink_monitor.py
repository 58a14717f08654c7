"""Link and address events from rtnetlink, through a lean struct-based codec.

Subscribes to exactly what vipd needs (links, IPv4 and IPv6 addresses), never to routes or
neighbours: a full BGP table arriving (60,000 route additions) then costs us nothing. The
receive buffer is sized for bursts (SO_RCVBUFFORCE as root). When the kernel still drops
events (ENOBUFS) the monitor says so with a `Resync` event and keeps going: the caller
dumps links and addresses again, so no state change is lost, only coalesced. A `Resync` is
also the first event after every (re)start, which closes the gap between a dump and the
subscription.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

NETLINK_ROUTE = 0
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR

RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR = 16, 17, 20, 21
NLMSG_ERROR, NLMSG_OVERRUN = 2, 4
IFLA_ADDRESS, IFLA_IFNAME = 1, 3
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFF_UP, IFF_LOWER_UP = 0x1, 0x10000
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
DEFAULT_RCVBUF = 8 << 20

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")


@dataclass(frozen=True)
class LinkEvent:
    index: int
    name: str
    up: bool  # administratively up with carrier (IFF_UP and IFF_LOWER_UP)
    mac: str
    deleted: bool = False


@dataclass(frozen=True)
class AddrEvent:
    index: int
    address: IPInterface
    present: bool  # RTM_NEWADDR (True) or RTM_DELADDR (False)


@dataclass(frozen=True)
class Resync:
    """Events may have been lost (ENOBUFS) or the monitor (re)started: dump again."""

    reason: str


Event = LinkEvent | AddrEvent | Resync


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attrs(data: bytes, offset: int, end: int) -> Iterator[tuple[int, bytes]]:
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > end:
            return
        yield kind & 0x3FFF, data[offset + _RTATTR.size:offset + length]
        offset += _align(length)


def parse(data: bytes) -> list[Event]:
    """Decode one datagram of rtnetlink messages; anything malformed is skipped."""
    out: list[Event] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        body, end = offset + _NLMSGHDR.size, offset + length
        if kind in (RTM_NEWLINK, RTM_DELLINK) and body + _IFINFOMSG.size <= end:
            _fam, _type, index, flags, _change = _IFINFOMSG.unpack_from(data, body)
            name, mac = "", "00:00:00:00:00:00"
            for a, v in _attrs(data, body + _IFINFOMSG.size, end):
                if a == IFLA_IFNAME:
                    name = v.split(b"\0", 1)[0].decode(errors="replace")
                elif a == IFLA_ADDRESS and len(v) == 6:
                    mac = ":".join(f"{b:02x}" for b in v)
            deleted = kind == RTM_DELLINK
            up = not deleted and bool(flags & IFF_UP) and bool(flags & IFF_LOWER_UP)
            out.append(LinkEvent(index, name, up, mac, deleted))
        elif kind in (RTM_NEWADDR, RTM_DELADDR) and body + _IFADDRMSG.size <= end:
            fam, plen, _f, _scope, index = _IFADDRMSG.unpack_from(data, body)
            found: dict[int, bytes] = dict(_attrs(data, body + _IFADDRMSG.size, end))
            # IFA_LOCAL is the local address on point-to-point links; IFA_ADDRESS otherwise
            raw = found.get(IFA_LOCAL) or found.get(IFA_ADDRESS)
            if raw is not None and len(raw) in (4, 16):
                addr = ipaddress.ip_interface((ipaddress.ip_address(raw), plen))
                out.append(AddrEvent(index, addr, kind == RTM_NEWADDR))
        elif kind == NLMSG_OVERRUN:
            out.append(Resync("netlink overrun"))
        offset += _align(length)
    return out


def open_socket(rcvbuf: int = DEFAULT_RCVBUF, groups: int = GROUPS) -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.bind((0, groups))
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


async def watch(callback: Callable[[Event], None], rcvbuf: int = DEFAULT_RCVBUF) -> None:
    """Feed events to `callback` until cancelled; raises on errors it cannot recover from
    (the caller's supervisor restarts it). The first event is always a Resync."""
    loop = asyncio.get_running_loop()
    sock = open_socket(rcvbuf)
    ready = asyncio.Event()
    loop.add_reader(sock.fileno(), ready.set)
    try:
        callback(Resync("monitor started"))
        while True:
            await ready.wait()
            ready.clear()
            while True:
                try:
                    data = sock.recv(1 << 16)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    callback(Resync("netlink receive buffer overrun (ENOBUFS)"))
                    continue
                for ev in parse(data):
                    callback(ev)
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()
