"""Gratuitous ARP (IPv4) and unsolicited Neighbor Advertisement (IPv6) for VIPs.

GARP: an ARP request with sender = target = VIP, broadcast, from the interface's (or the
virtual) MAC, as RFC 9568 6.4.1 asks. NA: ICMPv6 type 136 to ff02::1 with the Router and
Override flags and a Target Link-Layer Address option (RFC 4861 7.2.6), hop limit 255; the
kernel fills the ICMPv6 checksum on raw ICMPv6 sockets.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from vipd.core.packet import IPAddress

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6
ALL_NODES = ipaddress.IPv6Address("ff02::1")
NA_FLAGS_ROUTER_OVERRIDE = 0xA0000000


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def garp_frame(mac: str, vip: ipaddress.IPv4Address) -> bytes:
    src = mac_bytes(mac)
    eth = BROADCAST + src + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + src + vip.packed + b"\0" * 6 + vip.packed
    return eth + arp


def unsolicited_na(mac: str, vip: ipaddress.IPv6Address) -> bytes:
    """ICMPv6 NA body (checksum 0; the kernel computes it)."""
    return (struct.pack("!BBHI", 136, 0, 0, NA_FLAGS_ROUTER_OVERRIDE) + vip.packed
            + struct.pack("!BB", 2, 1) + mac_bytes(mac))


class Announcer(Protocol):
    def prepare(self, ifname: str, ifindex: int) -> None:
        """Open the sockets for an interface ahead of the first takeover."""
        ...

    def announce(self, ifname: str, ifindex: int, mac: str, vips: Iterable[IPAddress]) -> int:
        """Send one round; returns how many packets left."""
        ...

    def forget(self, ifindex: int) -> None:
        """Close the sockets of a link that is gone."""
        ...


class LinuxAnnouncer:
    def __init__(self) -> None:
        self._arp: dict[int, socket.socket] = {}
        self._icmp6: dict[int, socket.socket] = {}

    def announce(self, ifname: str, ifindex: int, mac: str, vips: Iterable[IPAddress]) -> int:
        sent = 0
        for vip in vips:
            if isinstance(vip, ipaddress.IPv4Address):
                self._arp_sock(ifname, ifindex).send(garp_frame(mac, vip))
            else:
                self._icmp6_sock(ifname, ifindex).sendto(unsolicited_na(mac, vip),
                                                         (str(ALL_NODES), 0, 0, ifindex))
            sent += 1
        return sent

    def prepare(self, ifname: str, ifindex: int) -> None:
        # Measured: opening these lazily at the first takeover cost 10-20 ms of a blocked
        # loop (packet socket setup waits for an RCU grace period), right when it hurts.
        self._arp_sock(ifname, ifindex)
        self._icmp6_sock(ifname, ifindex)

    def _arp_sock(self, ifname: str, ifindex: int) -> socket.socket:
        s = self._arp.get(ifindex)
        if s is None:
            # Protocol 0: send only, no receive hook to register (and none to tear down).
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            s.bind((ifname, 0))
            self._arp[ifindex] = s
        return s

    def _icmp6_sock(self, ifname: str, ifindex: int) -> socket.socket:
        s = self._icmp6.get(ifindex)
        if s is None:
            s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
            # Not to ourselves: a looped-back NA for our own address is only more work for
            # our own neighbour discovery, 750 times in a mass takeover.
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            self._icmp6[ifindex] = s
        return s

    def forget(self, ifindex: int) -> None:
        for table in (self._arp, self._icmp6):
            s = table.pop(ifindex, None)
            if s is not None:
                s.close()

    def close(self) -> None:
        for table in (self._arp, self._icmp6):
            for s in table.values():
                s.close()
            table.clear()


@dataclass
class FakeAnnouncer:
    rounds: list[tuple[str, tuple[IPAddress, ...]]] = field(default_factory=list)
    prepared: list[str] = field(default_factory=list)
    open_links: set[int] = field(default_factory=set)

    def prepare(self, ifname: str, ifindex: int) -> None:
        self.prepared.append(ifname)
        self.open_links.add(ifindex)

    def forget(self, ifindex: int) -> None:
        self.open_links.discard(ifindex)

    def announce(self, ifname: str, ifindex: int, mac: str, vips: Iterable[IPAddress]) -> int:
        v = tuple(vips)
        self.rounds.append((ifname, v))
        return len(v)
