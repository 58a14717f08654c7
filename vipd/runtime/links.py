"""Link watching: the interfaces the node runs on, their VRRP sockets, the virtual-MAC
macvlans, and the view of what addresses the kernel holds (the kernel is the truth).

Feeds the node core (vipd.core.node) with link state, addresses and VIPs that went
missing; follows the netlink monitor (vipd.io.netlink_monitor) and dumps again after an
overrun. Owns no router logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from vipd.config import virtual_mac
from vipd.core.node import Key, Node, Slot
from vipd.core.packet import IPAddress
from vipd.io.announce import Announcer
from vipd.io.netlink_monitor import AddrEvent, Event, LinkEvent, Resync
from vipd.io.rtnl import LinkInfo, Rtnl
from vipd.io.vmac import Sysctl, parent_sysctls, vmac_name, vmac_sysctls
from vipd.io.vrrp_socket import VrrpTransport

log = logging.getLogger("vipd")

SocketFactory = Callable[[str, int, int], VrrpTransport]
LINK_MONITOR = "link and address monitor"
RESYNC = "link and address resync"
MONITOR_STARTED = "monitor started"


@dataclass
class Interface:
    name: str
    index: int | None = None
    up: bool = False
    mac: str = "00:00:00:00:00:00"
    sockets: dict[int, VrrpTransport] = field(default_factory=dict)
    deferred: dict[int, asyncio.TimerHandle] = field(default_factory=dict)  # reads pending


@dataclass
class Vmac:
    """The macvlan that carries a virtual router's virtual MAC (vipd.io.vmac)."""

    name: str
    index: int
    mac: str
    sock: VrrpTransport | None  # IPv4 adverts go out here; IPv6 ones from the parent


class Links:
    def __init__(self, node: Node, *, rtnl: Rtnl, open_socket: SocketFactory,
                 open_send_socket: SocketFactory, announcer: Announcer, sysctl: Sysctl,
                 now: Callable[[], Fraction], pump: Callable[[], None],
                 on_readable: Callable[[Interface, int], None],
                 tasks_down: dict[str, str]) -> None:
        self.node = node
        self.rtnl = rtnl
        self.open_socket = open_socket
        self.open_send_socket = open_send_socket
        self.announcer = announcer
        self.sysctl = sysctl
        self.now = now
        self.pump = pump
        self.on_readable = on_readable
        self.tasks_down = tasks_down
        self.ifaces: dict[str, Interface] = {}
        self.vmacs: dict[Key, Vmac] = {}
        self.kernel_addrs: dict[int, set[IPAddress]] = {}  # per link index we care about
        self.running = False  # start finished: links appearing later get their macvlans
        self.stopping = False
        self._loop = asyncio.get_running_loop()

    # ------------------------------------------------------------ queries

    def vip_index(self, key: Key) -> int | None:
        """The link a router's VIPs live on: its virtual-MAC macvlan, or its interface."""
        vm = self.vmacs.get(key)
        if vm is not None:
            return vm.index
        iface = self.ifaces.get(key[0])
        return iface.index if iface else None

    # ------------------------------------------------------------ interfaces

    async def ensure_interface(self, name: str) -> Interface:
        iface = self.ifaces.get(name)
        if iface is None:
            iface = self.ifaces[name] = Interface(name)
            info = await self.rtnl.link(name)
            if info is None:
                log.warning("%s: no such interface (its routers stay in FAULT)", name)
            else:
                await self.attach(iface, info)
        return iface

    async def attach(self, iface: Interface, info: LinkInfo) -> None:
        if iface.index != info.index:  # new or re-created link: new sockets
            self.close_sockets(iface)
            if iface.index is not None:  # re-created: the old link and its macvlans are gone
                self.announcer.forget(iface.index)
                self.kernel_addrs.pop(iface.index, None)
                for key in self._keys_on(iface.name):
                    self.forget_vmac(key)
            try:
                self.announcer.prepare(iface.name, info.index)
            except OSError as exc:
                log.error("%s: cannot open announcement sockets: %s", iface.name, exc)
        iface.index, iface.up, iface.mac = info.index, info.up, info.mac
        for fam in sorted({k[2] for k in self._keys_on(iface.name)}):
            if fam not in iface.sockets:
                try:
                    sock = self.open_socket(iface.name, info.index, fam)
                except OSError as exc:
                    log.error("%s: cannot open IPv%d VRRP socket: %s", iface.name, fam, exc)
                    continue
                iface.sockets[fam] = sock
                if sock.fileno() >= 0:
                    self._loop.add_reader(sock.fileno(), self.on_readable, iface, fam)
        await self.refresh_addresses(iface)
        if self.running:  # an interface appearing later (at start: Daemon.start)
            for key in self._keys_on(iface.name):
                slot = self.node.slots[key]
                if slot.spec.virtual_mac and key not in self.vmacs:
                    try:
                        await self.setup_vmac(slot)
                    except OSError as exc:  # the router stays in FAULT
                        log.error("%s: %s", slot.router.config.name, exc)

    def _keys_on(self, ifname: str) -> list[Key]:
        link = self.node.links.get(ifname)
        return list(link.slots) if link else []

    def close_sockets(self, iface: Interface) -> None:
        for handle in iface.deferred.values():
            handle.cancel()
        iface.deferred.clear()
        for sock in iface.sockets.values():
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        iface.sockets.clear()

    def drop_unused(self) -> None:
        """Close the interfaces no router runs on any more (after a reload)."""
        for name in [n for n in self.ifaces if n not in self.node.links]:
            self.close_sockets(self.ifaces.pop(name))

    async def refresh_addresses(self, iface: Interface) -> None:
        if iface.index is None:
            return
        addrs = await self.rtnl.addresses(iface.index)
        self.kernel_addrs[iface.index] = {a.ip for a, _ in addrs}
        self.node.set_addresses(iface.name, addrs)

    async def remove_leftovers(self, slots: Iterable[Slot]) -> None:
        """VIPs of ours left on an interface by a crash: nobody elected us, remove them.
        One dump and one batch per interface, whatever the number of routers."""
        by_iface: dict[str, list[Slot]] = {}
        for slot in slots:
            if not slot.owner:
                by_iface.setdefault(slot.spec.interface, []).append(slot)
        for name, group in by_iface.items():
            iface = self.ifaces[name]
            if iface.index is None:
                continue
            present = {a.ip for a, _ in await self.rtnl.addresses(iface.index)}
            stale = [(slot, vip) for slot in group for vip in slot.vips if vip.ip in present]
            if not stale:
                continue
            for slot, vip in stale:
                log.info("%s: removing leftover VIP %s", slot.router.config.name, vip)
            for (slot, vip), err in zip(stale, await self.rtnl.apply_addresses(
                    [(False, iface.index, vip) for _, vip in stale]), strict=True):
                if err is not None:
                    log.warning("%s: cannot remove leftover VIP %s: %s",
                                slot.router.config.name, vip, err)
            await self.refresh_addresses(iface)

    # ------------------------------------------------------------ virtual MAC

    async def setup_vmac(self, slot: Slot) -> None:
        """Create the router's macvlan. An interface that does not exist yet is not an
        error: the router stays in FAULT and the macvlan is made when it appears."""
        iface = self.ifaces[slot.spec.interface]
        c = slot.router.config
        if iface.index is None:
            log.info("%s: virtual MAC waits for %s to appear", c.name, iface.name)
            return
        name = vmac_name(iface.index, c.vrid, c.family)
        mac = virtual_mac(c.vrid, c.family)
        for path, value in parent_sysctls(iface.name).items():
            self.sysctl.set_checked(path, value)
        try:
            info = await self.rtnl.create_macvlan(iface.index, name, mac)
        except Exception as exc:
            raise OSError(f"{c.name}: cannot create macvlan {name} for the virtual MAC "
                          f"(is macvlan in this kernel?): {exc}") from exc
        for path, value in vmac_sysctls(name, c.family).items():
            self.sysctl.set_checked(path, value)
        sock = self.open_send_socket(name, info.index, c.family) if c.family == 4 else None
        self.announcer.prepare(name, info.index)
        self.vmacs[slot.key] = Vmac(name, info.index, mac, sock)
        self.kernel_addrs[info.index] = {a.ip for a, _ in await self.rtnl.addresses(info.index)}
        if self.node.slots.get(slot.key) is slot:  # else: a reload's router, not adopted yet
            self.node.set_vmac(self.now(), slot.key, True)
            self.pump()
        log.info("%s: virtual MAC %s on %s", c.name, mac, name)

    async def drop_vmac(self, key: Key) -> None:
        vm = self.vmacs.get(key)
        if vm is None:
            return
        self.forget_vmac(key)
        with contextlib.suppress(Exception):
            await self.rtnl.delete_link(vm.name)

    def forget_vmac(self, key: Key) -> None:
        """Close what belongs to a router's macvlan (deleted by us, or by the kernel with
        its parent)."""
        vm = self.vmacs.pop(key, None)
        if vm is None:
            return
        if vm.sock is not None:
            vm.sock.close()
        self.announcer.forget(vm.index)
        self.kernel_addrs.pop(vm.index, None)
        if key in self.node.slots:
            self.node.set_vmac(self.now(), key, False)

    # ------------------------------------------------------------ kernel events

    def on_event(self, ev: Event) -> None:
        if isinstance(ev, LinkEvent):
            self.on_link(LinkInfo(ev.index, ev.name, ev.up, ev.mac))
        elif isinstance(ev, AddrEvent):
            self._on_addr(ev)
        else:
            self.on_resync(ev)

    def on_resync(self, ev: Resync) -> None:
        if ev.reason == MONITOR_STARTED:
            if self.tasks_down.pop(LINK_MONITOR, None) is not None:
                log.warning("%s is back", LINK_MONITOR)
        else:
            log.warning("%s: %s; dumping links and addresses again", LINK_MONITOR, ev.reason)
        self.spawn(self._resync(), RESYNC)

    def spawn(self, coro: Any, what: str) -> None:
        """A short task whose failure is logged, not lost; a failed resync is retried and
        keeps status degraded until one succeeds."""
        def done(task: asyncio.Future[Any]) -> None:
            if task.cancelled() or task.exception() is None:
                return
            log.error("%s failed: %s", what, task.exception())
            if what == RESYNC and not self.stopping:
                self.tasks_down[RESYNC] = f"failed: {task.exception()}"
                self._loop.call_later(1.0, self.on_resync, Resync("retrying a failed resync"))

        asyncio.ensure_future(coro).add_done_callback(done)

    async def _resync(self) -> None:
        """Bring the view of links and addresses back in line with the kernel."""
        for iface in list(self.ifaces.values()):
            info = await self.rtnl.link(iface.name)
            if info is not None:
                self.on_link(info)
            elif iface.index is not None:
                self.on_link(LinkInfo(iface.index, iface.name, False, iface.mac))
        for index in list(self.kernel_addrs):
            try:
                self.kernel_addrs[index] = {a.ip for a, _ in await self.rtnl.addresses(index)}
            except Exception:  # the link went away meanwhile
                self.kernel_addrs.pop(index, None)
        self.node.resynced()
        self.pump()
        self.tasks_down.pop(RESYNC, None)

    def _on_addr(self, ev: AddrEvent) -> None:
        held = self.kernel_addrs.get(ev.index)
        if held is None:
            return  # not a link of ours
        ip = ev.address.ip
        if ev.present:
            held.add(ip)
        else:
            held.discard(ip)
        slot = self.node.slot_of_vip(ip)
        if slot is None:
            iface = next((i for i in self.ifaces.values() if i.index == ev.index), None)
            if iface is not None:  # one of the interface's own addresses changed
                self.spawn(self.refresh_addresses(iface), f"{iface.name}: address refresh")
            return
        if not ev.present and self.vip_index(slot.key) == ev.index:
            self.node.vip_missing(slot.key)
            self.pump()

    def on_link(self, info: LinkInfo) -> None:
        iface = self.ifaces.get(info.name)
        if iface is None:
            return
        was_up = iface.up and iface.index == info.index
        asyncio.ensure_future(self._link_changed(iface, info, was_up))

    async def _link_changed(self, iface: Interface, info: LinkInfo, was_up: bool) -> None:
        if info.up:
            try:
                await self.attach(iface, info)
            except Exception as exc:  # keep following the link even if a refresh failed
                log.warning("%s: refreshing after link up failed: %s", iface.name, exc)
        iface.up = info.up
        if info.up != was_up:
            log.info("%s: link %s", iface.name, "up" if info.up else "down")
        self.node.set_link(self.now(), iface.name, info.up)
        self.pump()

    async def close(self) -> None:
        for key in list(self.vmacs):
            await self.drop_vmac(key)
        for iface in self.ifaces.values():
            self.close_sockets(iface)
