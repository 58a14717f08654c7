"""Virtual MAC per VRID (RFC 9568 7.3) through a macvlan on the VLAN interface.

The macvlan `vmac{parent ifindex}.{vrid}` (`.6` appended for IPv6) carries
00:00:5e:00:01:{vrid} (IPv4) or 00:00:5e:00:02:{vrid} (IPv6). It is up only while
this node is master, so a backup never sends a frame from the virtual MAC (a switch would
learn it on the wrong port); hosts then keep the same ARP entry across a failover and only
the switch has to learn, from the new master's gratuitous ARP. The sysctls that make the
macvlan, not its parent, answer ARP for the VIPs are set and read back.
IPv6: adverts keep going out from the parent, whose link-local address is the router's
identity on the wire (RFC 9568 5.1.2.1; keepalived calls this vmac_xmit_base); the VIPs,
the virtual link-local among them, and the unsolicited NAs live on the macvlan, which gets
no address of its own (addr_gen_mode none) and does no DAD.
"""

from __future__ import annotations

import fcntl
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def vmac_name(parent_index: int, vrid: int, family: int = 4) -> str:
    return f"vmac{parent_index}.{vrid}{'' if family == 4 else '.6'}"[:15]


def parent_sysctls(parent: str) -> dict[str, str]:
    return {
        # only answer ARP for addresses on the receiving interface: the VIP lives on the
        # macvlan, so the parent must not answer for it with its own MAC
        f"net/ipv4/conf/{parent}/arp_ignore": "1",
        # ARP requests the parent sends take a source address of the parent's own, never
        # the VIP: with the VIP as source and the parent's MAC, hosts' entries for the VIP
        # would flip to the parent's MAC (seen with accept_mode true)
        f"net/ipv4/conf/{parent}/arp_announce": "2",
    }


def vmac_sysctls(name: str, family: int = 4) -> dict[str, str]:
    common = {
        f"net/ipv4/conf/{name}/arp_ignore": "1",
        f"net/ipv4/conf/{name}/arp_announce": "2",
    }
    if family == 4:
        # no IPv6 on an IPv4 virtual MAC: no MLD or RS frames from the shared MAC
        return {**common, f"net/ipv6/conf/{name}/disable_ipv6": "1"}
    return {
        **common,
        # set while the macvlan is down: no address of its own, no DAD, no autoconf
        f"net/ipv6/conf/{name}/addr_gen_mode": "1",
        f"net/ipv6/conf/{name}/accept_dad": "0",
        f"net/ipv6/conf/{name}/accept_ra": "0",
        f"net/ipv6/conf/{name}/autoconf": "0",
        f"net/ipv6/conf/{name}/disable_ipv6": "0",
    }


class SysctlError(OSError):
    pass


class Sysctl(Protocol):
    def set_checked(self, path: str, value: str) -> None: ...


class ProcSysctl:
    """Writes /proc/sys (of this network namespace) and reads the value back."""

    def __init__(self, root: str = "/proc/sys") -> None:
        self.root = Path(root)

    def set_checked(self, path: str, value: str) -> None:
        p = self.root / path
        try:
            p.write_text(value + "\n")
            got = p.read_text().strip()
        except OSError as exc:
            raise SysctlError(exc.errno, f"{path}: {exc.strerror}") from exc
        if got != value:
            raise SysctlError(0, f"{path} is {got!r} after writing {value!r}")


@dataclass
class FakeSysctl:
    values: dict[str, str] = field(default_factory=dict)

    def set_checked(self, path: str, value: str) -> None:
        self.values[path] = value


def set_link_up(name: str, up: bool) -> None:
    """Synchronous IFF_UP toggle (SIOCSIFFLAGS): the macvlan must be up before the advert
    and the gratuitous ARP that follow in the same instant."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", name.encode(), 0)
        flags = struct.unpack_from("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        new = flags | IFF_UP if up else flags & ~IFF_UP
        if new != flags:
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", name.encode(), new))
