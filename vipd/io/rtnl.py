"""rtnetlink through pyroute2 (0.9 async API): links, their state, and VIP add/remove.

Adding an address that is there and removing one that is not both succeed (idempotent).
IPv6 VIPs are added with IFA_F_NODAD: a VIP that waits for DAD is useless for a second.
`watch` feeds link and address events (vipd.io.netlink_monitor) to a callback; "up" means
administratively up with carrier (IFF_UP and IFF_LOWER_UP), which is what a VRRP speaker can
use. Virtual-MAC macvlans are made in bridge mode: in private mode the kernel hands a frame
whose source is our own virtual MAC (a peer master sending from it, as RFC 9568 requires)
only to the macvlan, so the parent, where vipd listens, never hears that peer.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vipd.core.node import IFA_F_SECONDARY
from vipd.io.addr_batch import AddrBatcher, Op
from vipd.io.netlink_monitor import AddrEvent, Event, LinkEvent, Resync
from vipd.io.offload import Offload

log = logging.getLogger("vipd.rtnl")

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
IFA_F_NODAD = 0x02

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class LinkInfo:
    index: int
    name: str
    up: bool
    mac: str


EventCallback = Callable[[Event], None]


class Rtnl(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def link(self, name: str) -> LinkInfo | None: ...
    async def addresses(self, index: int) -> list[tuple[IPInterface, int]]: ...
    async def add_address(self, index: int, addr: IPInterface) -> None: ...
    async def del_address(self, index: int, addr: IPInterface) -> None: ...
    async def apply_addresses(self, ops: list[Op]) -> list[OSError | None]: ...
    async def watch(self, callback: EventCallback) -> None: ...
    async def create_macvlan(self, parent: int, name: str, mac: str) -> LinkInfo: ...
    async def delete_link(self, name: str) -> None: ...


def _link_info(msg: Any) -> LinkInfo:
    flags = msg["flags"]
    return LinkInfo(msg["index"], msg.get("ifname"), bool(flags & IFF_UP and
                                                         flags & IFF_LOWER_UP),
                    msg.get("address") or "00:00:00:00:00:00")


THREAD_MIN_OPS = 64  # address changes from which a batch leaves the loop's thread


class PyrouteRtnl:
    """One pyroute2 socket; requests are serialized (a second dump while one is running
    fails with EBUSY)."""

    def __init__(self) -> None:
        self._ipr: Any = None
        self._lock = asyncio.Lock()
        self._batcher: AddrBatcher | None = None
        self._worker = Offload("vipd-addr", THREAD_MIN_OPS)  # one thread: batches in order

    async def open(self) -> None:
        from pyroute2 import AsyncIPRoute

        self._ipr = AsyncIPRoute()
        await self._ipr.setup_endpoint()
        self._batcher = AddrBatcher()

    async def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        self._worker.close()
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None

    async def apply_addresses(self, ops: list[Op]) -> list[OSError | None]:
        """Many address changes in one netlink round trip (vipd.io.addr_batch). A large
        batch runs in the one worker thread: rtnetlink does its work inside sendmsg, with
        the GIL released, so 1000 takeovers' addresses (about 70 ms of kernel time) go in
        while the loop handles the next routers coming due. Small ones stay inline (no
        handoff) unless the worker is busy: then they queue behind it, so batches reach
        the kernel in the order they were asked for."""
        assert self._batcher is not None
        return await self._worker.run(len(ops), self._batcher.apply, ops)

    async def link(self, name: str) -> LinkInfo | None:
        # Read the reply to its end: a dump left unfinished makes the next request EBUSY.
        found = None
        try:
            async with self._lock:
                async for msg in await self._ipr.get_links(ifname=name):
                    found = found or _link_info(msg)
        except Exception as exc:  # pyroute2 raises NetlinkError(19) for a missing link
            if getattr(exc, "code", None) in (errno.ENODEV, errno.EINVAL):
                return None
            raise
        return found

    async def addresses(self, index: int) -> list[tuple[IPInterface, int]]:
        out: list[tuple[IPInterface, int]] = []
        async with self._lock:
            async for msg in await self._ipr.addr("dump", index=index):
                addr = msg.get("address")
                if addr is None:
                    continue
                flags = msg.get("flags") or msg["flags"]
                out.append((ipaddress.ip_interface(f"{addr}/{msg['prefixlen']}"), flags))
        return out

    async def add_address(self, index: int, addr: IPInterface) -> None:
        kw: dict[str, Any] = {}
        if addr.version == 6:
            kw["flags"] = IFA_F_NODAD
        try:
            async with self._lock:
                await self._ipr.addr("add", index=index, address=str(addr.ip),
                                     prefixlen=addr.network.prefixlen, **kw)
        except Exception as exc:
            if getattr(exc, "code", None) != errno.EEXIST:
                raise

    async def del_address(self, index: int, addr: IPInterface) -> None:
        try:
            async with self._lock:
                await self._ipr.addr("del", index=index, address=str(addr.ip),
                                     prefixlen=addr.network.prefixlen)
        except Exception as exc:
            if getattr(exc, "code", None) not in (errno.EADDRNOTAVAIL, errno.ENODEV):
                raise

    async def create_macvlan(self, parent: int, name: str, mac: str) -> LinkInfo:
        """A bridge-mode macvlan (left down), replacing a stale one of the same name."""
        await self.delete_link(name)
        async with self._lock:
            await self._ipr.link("add", ifname=name, kind="macvlan", link=parent,
                                 macvlan_mode="bridge", address=mac)
        info = await self.link(name)
        if info is None:
            raise OSError(errno.ENODEV, f"{name} vanished after creation")
        return info

    async def delete_link(self, name: str) -> None:
        info = await self.link(name)
        if info is None:
            return
        async with self._lock:
            await self._ipr.link("del", index=info.index)

    async def watch(self, callback: EventCallback) -> None:
        from vipd.io.netlink_monitor import watch

        await watch(callback)


@dataclass
class FakeRtnl:
    """Links and addresses in memory, for driver tests."""

    links: dict[str, LinkInfo] = field(default_factory=dict)
    addrs: dict[int, list[tuple[IPInterface, int]]] = field(default_factory=dict)
    fail_adds: bool = False
    callback: EventCallback | None = None
    watch_failures: int = 0  # the next watches die at once (supervision tests)
    batches: list[int] = field(default_factory=list)  # size of each apply_addresses call

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def link(self, name: str) -> LinkInfo | None:
        return self.links.get(name)

    async def addresses(self, index: int) -> list[tuple[IPInterface, int]]:
        return list(self.addrs.get(index, []))

    async def add_address(self, index: int, addr: IPInterface) -> None:
        if self.fail_adds:
            raise OSError(errno.EPERM, "Operation not permitted")
        lst = self.addrs.setdefault(index, [])
        if all(a.ip != addr.ip for a, _ in lst):
            lst.append((addr, IFA_F_SECONDARY))
            self._event(AddrEvent(index, addr, True))

    async def del_address(self, index: int, addr: IPInterface) -> None:
        self.remove(index, addr)

    async def apply_addresses(self, ops: list[Op]) -> list[OSError | None]:
        self.batches.append(len(ops))
        out: list[OSError | None] = []
        for add, index, addr in ops:
            try:
                await (self.add_address(index, addr) if add else self.del_address(index, addr))
                out.append(None)
            except OSError as exc:
                out.append(exc)
        return out

    def remove(self, index: int, addr: IPInterface) -> None:
        """Remove an address (as `ip addr del` would), with its event."""
        before = self.addrs.get(index, [])
        self.addrs[index] = [(a, f) for a, f in before if a.ip != addr.ip]
        if len(self.addrs[index]) != len(before):
            self._event(AddrEvent(index, addr, False))

    def set_link(self, info: LinkInfo) -> None:
        """Change a link (as `ip link set` would), with its event."""
        self.links[info.name] = info
        self._event(LinkEvent(info.index, info.name, info.up, info.mac))

    def _event(self, ev: Event) -> None:
        if self.callback is not None:
            self.callback(ev)

    async def watch(self, callback: EventCallback) -> None:
        if self.watch_failures:
            self.watch_failures -= 1
            raise OSError(errno.EBADF, "monitor socket died")
        self.callback = callback
        callback(Resync("monitor started"))
        await asyncio.Event().wait()

    async def create_macvlan(self, parent: int, name: str, mac: str) -> LinkInfo:
        if parent not in {i.index for i in self.links.values()}:
            raise OSError(errno.ENODEV, "No such device")
        info = LinkInfo(100 + len(self.links), name, False, mac)
        self.links[name] = info
        return info

    async def delete_link(self, name: str) -> None:
        self.links.pop(name, None)
