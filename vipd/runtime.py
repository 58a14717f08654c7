"""The daemon's driver: one asyncio loop feeding the pure cores and carrying out their actions.

Inputs: VRRP packets (one raw socket per interface and family), link events (rtnetlink),
each router's single armed timer, the control socket, signals. After every input the
router's timer is re-armed from `get_timer()`. VIP changes go through rtnetlink in order per
router; a failure is reported back to the core, which gives up mastership after repeats.
Time is the loop's monotonic clock, converted to an exact Fraction once, in `now()`.

The kernel is the truth: address events (vipd.io.netlink_monitor) keep a per-link view of
what it holds; status reports that view, and a master puts back a VIP someone removed.
Long-lived tasks are supervised: one that dies is restarted and keeps status degraded until
it is back. Nothing is touched before the instance lock is held (vipd.io.lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from typing import Any

from vipd.config import (
    Config,
    ConfigError,
    InstanceConfig,
    IPInterface,
    VlanConfig,
    link_local_vips,
    load,
    router_configs,
    virtual_mac,
)
from vipd.core.actions import Action, AddVips, Announce, RemoveVips, SendAdvert, Transitioned
from vipd.core.advert import encode_advert, receiver_view
from vipd.core.batch import newest_per_key
from vipd.core.packet import (
    AddressDiff,
    Advert,
    DropReason,
    IPAddress,
    IpMeta,
    ReceiverView,
)
from vipd.core.policy import GROUP_FAULT, GroupPolicy
from vipd.core.receive import Dropped, Receiver
from vipd.core.router import OWNER_PRIORITY, RouterConfig, State, VirtualRouter
from vipd.io.announce import Announcer
from vipd.io.control import ControlServer
from vipd.io.lock import InstanceLock
from vipd.io.netlink_monitor import AddrEvent, Event, LinkEvent, Resync
from vipd.io.nft import AcceptGuard, NftAcceptGuard
from vipd.io.rtnl import LinkInfo, Rtnl, primary_address
from vipd.io.vmac import (
    ProcSysctl,
    Sysctl,
    parent_sysctls,
    vmac_name,
    vmac_sysctls,
)
from vipd.io.vmac import set_link_up as vmac_link_up
from vipd.io.vrrp_socket import VrrpTransport
from vipd.status import RouterView, snapshot, static_status

log = logging.getLogger("vipd")

SocketFactory = Callable[[str, int, int], VrrpTransport]
PRECISE_LEAD_S = 0.0015
RX_COALESCE_S = 0.002
LINK_MONITOR = "link and address monitor"
RESYNC = "link and address resync"
STATUS_REUSE_S = 0.02
MONITOR_STARTED = "monitor started"
Key = tuple[str, int, int]  # interface, vrid, family


@dataclass
class Interface:
    name: str
    index: int | None = None
    up: bool = False
    mac: str = "00:00:00:00:00:00"
    sockets: dict[int, VrrpTransport] = field(default_factory=dict)
    primary: dict[int, IPAddress | None] = field(default_factory=dict)
    own: set[IPAddress] = field(default_factory=set)
    drops: dict[int, Counter[DropReason]] = field(
        default_factory=lambda: {4: Counter(), 6: Counter()})
    deferred: dict[int, asyncio.TimerHandle] = field(default_factory=dict)  # _on_wakeup
    receivers: dict[int, Receiver[Slot]] = field(
        default_factory=lambda: {4: Receiver(), 6: Receiver()})


@dataclass
class Vmac:
    """The macvlan that carries a virtual router's virtual MAC (vipd.io.vmac)."""

    name: str
    index: int
    mac: str
    sock: VrrpTransport | None  # IPv4 adverts go out here; IPv6 ones from the parent


@dataclass
class Slot:
    """One virtual router in the daemon: the core plus what the driver needs around it."""

    vlan: VlanConfig
    inst: InstanceConfig
    router: VirtualRouter
    vips: tuple[IPInterface, ...]
    drops: Counter[DropReason] = field(default_factory=Counter)
    wake_at: float | None = None  # loop time of this router's armed wake-up
    armed: Fraction | None = None  # the deadline that wake-up is for
    addr_task: asyncio.Future[None] | None = None
    vmac: Vmac | None = None
    vips_repaired: int = 0
    installing: bool = False  # an add of this slot's VIPs is queued or under way
    announce_after_install: bool = False

    @cached_property
    def key(self) -> Key:
        c = self.router.config
        return (self.vlan.interface, c.vrid, c.family)

    @cached_property
    def static_status(self) -> dict[str, Any]:
        """The configuration's part of this router's status, built once."""
        return static_status(RouterView(self.vlan.name, self.vlan.interface, self.router,
                                        tuple(str(v) for v in self.vips), self.drops))

    @cached_property
    def view(self) -> ReceiverView:
        """Built once: the config is frozen and every received advert is checked against it."""
        return receiver_view(self.router.config)


def build_slots(cfg: Config) -> dict[Key, Slot]:
    slots: dict[Key, Slot] = {}
    for vlan in cfg.vlans:
        for inst in vlan.instances:
            all_vips = link_local_vips(inst)
            for rc in router_configs(vlan, inst):
                vips = tuple(v for v in all_vips if v.version == rc.family)
                slot = Slot(vlan, inst, VirtualRouter(rc), vips)
                slots[slot.key] = slot
    return slots


class Daemon:
    def __init__(self, cfg: Config, *, rtnl: Rtnl, open_socket: SocketFactory,
                 announcer: Announcer, control_socket: str | None = None,
                 config_path: str | None = None,
                 clock: Callable[[], float] | None = None,
                 sysctl: Sysctl | None = None,
                 open_send_socket: SocketFactory | None = None,
                 set_link_up: Callable[[str, bool], None] = vmac_link_up,
                 accept_guard: AcceptGuard | None = None,
                 lock: InstanceLock | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.rtnl = rtnl
        self.open_socket = open_socket
        self.announcer = announcer
        self.sysctl = sysctl or ProcSysctl()
        self.open_send_socket = open_send_socket or self._default_send_socket
        self.set_link_up = set_link_up
        self.accept_guard = accept_guard or NftAcceptGuard()
        self.accept_mode_enforced = True
        self.control_path = control_socket or cfg.node.control_socket
        self.lock = lock or InstanceLock(self.control_path)
        self._locked = False  # nothing is touched, nor cleaned up, without the lock
        self._running = False  # start() has finished
        self.kernel_addrs: dict[int, set[IPAddress]] = {}  # per link index we care about
        self.tasks_down: dict[str, str] = {}  # supervised task -> why it is down
        self.task_restarts: Counter[str] = Counter()
        self._by_vip: dict[IPAddress, Slot] = {}
        self._status_cache: tuple[float, dict[str, Any]] | None = None
        self._wakeups: dict[float, dict[int, Slot]] = {}  # loop time -> routers due then
        self._wake_handles: dict[float, asyncio.TimerHandle] = {}
        self._addr_queue: list[tuple[Slot, str]] = []
        self._addr_flush: asyncio.Future[None] | None = None
        self._addr_lock = asyncio.Lock()
        self.ifaces: dict[str, Interface] = {}
        self.slots: dict[Key, Slot] = {}
        self.stopping = False
        self.policy = GroupPolicy(cfg.mode.value)
        self.reloads = 0
        self._done = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._control: ControlServer | None = None
        self._loop = asyncio.get_running_loop()
        # The loop's monotonic clock, unless a test drives time itself.
        self._clock = clock or self._loop.time
        self._started = self.now()

    def now(self) -> Fraction:
        return Fraction(self._clock())

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        # A second vipd started by mistake stops here, before it touches anything.
        self.lock.acquire()
        try:
            self.lock.claim_interfaces(v.interface for v in self.cfg.vlans)
        except BaseException:
            self.lock.release()
            raise
        self._locked = True
        await self.rtnl.open()
        self.slots = build_slots(self.cfg)
        self._index_vips()
        for slot in self.slots.values():
            await self._ensure_interface(slot.vlan.interface)
        for slot in self.slots.values():
            if slot.inst.virtual_mac and slot.vmac is None:
                await self._setup_vmac(slot)  # at start, a macvlan that cannot be made is fatal
        await self._remove_leftovers(self.slots.values())
        await self._apply_accept_mode()
        self._control = ControlServer(self.control_path, self._handle_request,
                                      self.cfg.node.control_socket_mode)
        await self._control.start()
        self._tasks.append(self._supervise(LINK_MONITOR,
                                           lambda: self.rtnl.watch(self._on_event)))
        for slot in self.slots.values():
            self._start_slot(slot, "startup")
        self._running = True
        log.info("vipd %s: %d virtual routers on %d interfaces, mode %s", self.cfg.node.name,
                 len(self.slots), len(self.ifaces), self.cfg.mode.value)

    async def run_until_stopped(self) -> None:
        await self._done.wait()

    def request_stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping: releasing mastership")
        now = self.now()
        for slot in self.slots.values():
            self._apply(slot, slot.router.shutdown(now))
        asyncio.ensure_future(self._finish_stop())

    async def _finish_stop(self) -> None:
        # Keep the loop (and receive path) alive until every released master has handed
        # its VIPs to a successor or given up waiting: the core bounds that time.
        while any(s.router.holding_vips for s in self.slots.values()):
            await asyncio.sleep(0.005)
        for slot in self.slots.values():
            if slot.addr_task is not None:
                with contextlib.suppress(Exception):
                    await slot.addr_task
            self._unschedule(slot)
        await self.close()
        self._done.set()

    async def _apply_accept_mode(self) -> None:
        """RFC 9568 Accept_Mode False: a non-owner master drops traffic to its VIPs."""
        denied = {v.ip for s in self.slots.values()
                  if not s.router.config.accept_mode
                  and s.router.config.priority != OWNER_PRIORITY for v in s.vips}
        self.accept_mode_enforced = await self.accept_guard.apply(denied)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if not self._locked:  # refused to start: what is out there belongs to another vipd
            await self.rtnl.close()
            return
        with contextlib.suppress(Exception):
            await self.accept_guard.remove()
        for slot in self.slots.values():
            await self._drop_vmac(slot)
        for iface in self.ifaces.values():
            self._close_sockets(iface)
        if self._control:
            await self._control.stop()
        await self.rtnl.close()
        self.lock.release()
        self._locked = False

    def _supervise(self, name: str, run: Callable[[], Any]) -> asyncio.Task[None]:
        """Run a long-lived task for good: restart it when it dies (backing off), and keep
        it in `tasks_down` (status degraded) until it reports itself back."""
        async def loop() -> None:
            delay = 0.1
            while True:
                began = self._loop.time()
                try:
                    await run()
                    raise RuntimeError("returned")
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.tasks_down[name] = f"{type(exc).__name__}: {exc}"
                    self.task_restarts[name] += 1
                    if self._loop.time() - began > 10:
                        delay = 0.1
                    log.error("%s died (%s); restarting in %.1f s", name, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

        return asyncio.ensure_future(loop())

    def _index_vips(self) -> None:
        self._by_vip = {v.ip: s for s in self.slots.values() for v in s.vips
                        if s.router.config.priority != OWNER_PRIORITY}

    def _vip_index(self, slot: Slot) -> int | None:
        """The link a slot's VIPs live on: its virtual-MAC macvlan, or its interface."""
        if slot.vmac:
            return slot.vmac.index
        iface = self.ifaces.get(slot.vlan.interface)
        return iface.index if iface else None

    # ------------------------------------------------------------ kernel events

    def _on_event(self, ev: Event) -> None:
        if isinstance(ev, LinkEvent):
            self._on_link(LinkInfo(ev.index, ev.name, ev.up, ev.mac))
        elif isinstance(ev, AddrEvent):
            self._on_addr(ev)
        else:
            self._on_resync(ev)

    def _on_resync(self, ev: Resync) -> None:
        if ev.reason == MONITOR_STARTED:
            if self.tasks_down.pop(LINK_MONITOR, None) is not None:
                log.warning("%s is back", LINK_MONITOR)
        else:
            log.warning("%s: %s; dumping links and addresses again", LINK_MONITOR, ev.reason)
        self._spawn(self._resync(), RESYNC)

    def _spawn(self, coro: Any, what: str) -> None:
        """A short task whose failure is logged, not lost; a failed resync is retried and
        keeps status degraded until one succeeds."""
        def done(task: asyncio.Future[Any]) -> None:
            if task.cancelled() or task.exception() is None:
                return
            log.error("%s failed: %s", what, task.exception())
            if what == RESYNC and not self.stopping:
                self.tasks_down[RESYNC] = f"failed: {task.exception()}"
                self._loop.call_later(1.0, self._on_resync, Resync("retrying a failed resync"))

        asyncio.ensure_future(coro).add_done_callback(done)

    async def _resync(self) -> None:
        """Bring the view of links and addresses back in line with the kernel."""
        for iface in list(self.ifaces.values()):
            info = await self.rtnl.link(iface.name)
            if info is not None:
                self._on_link(info)
            elif iface.index is not None:
                self._on_link(LinkInfo(iface.index, iface.name, False, iface.mac))
        for index in list(self.kernel_addrs):
            try:
                self.kernel_addrs[index] = {a.ip for a, _ in await self.rtnl.addresses(index)}
            except Exception:  # the link went away meanwhile
                self.kernel_addrs.pop(index, None)
        for slot in self.slots.values():
            if slot.router.state is State.MASTER:
                self._queue_addr(slot, "repair")
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
        slot = self._by_vip.get(ip)
        if slot is None:
            iface = next((i for i in self.ifaces.values() if i.index == ev.index), None)
            if iface is not None:  # one of the interface's own addresses changed
                self._spawn(self._refresh_addresses(iface), f"{iface.name}: address refresh")
            return
        if (not ev.present and not self.stopping and slot.router.state is State.MASTER
                and self._vip_index(slot) == ev.index and self.slots.get(slot.key) is slot):
            self._queue_addr(slot, "repair")

    # ------------------------------------------------------------ virtual MAC

    @staticmethod
    def _default_send_socket(name: str, index: int, family: int) -> VrrpTransport:
        from vipd.io.vrrp_socket import VrrpSocket

        return VrrpSocket(name, index, family, send_only=True)

    async def _setup_vmac(self, slot: Slot) -> None:
        """Create the slot's macvlan. An interface that does not exist yet is not an error:
        the router stays in FAULT and the macvlan is made when the interface appears."""
        iface = self.ifaces[slot.vlan.interface]
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
        slot.vmac = Vmac(name, info.index, mac, sock)
        self.kernel_addrs[info.index] = {a.ip for a, _ in await self.rtnl.addresses(info.index)}
        log.info("%s: virtual MAC %s on %s", c.name, mac, name)

    async def _drop_vmac(self, slot: Slot) -> None:
        if slot.vmac is None:
            return
        if slot.addr_task is not None:  # let a queued VIP removal finish on the macvlan
            with contextlib.suppress(Exception):
                await slot.addr_task
        vm = slot.vmac
        self._forget_vmac(slot)
        with contextlib.suppress(Exception):
            await self.rtnl.delete_link(vm.name)

    def _forget_vmac(self, slot: Slot) -> None:
        """Close what belongs to a slot's macvlan (deleted by us, or by the kernel with its
        parent)."""
        vm, slot.vmac = slot.vmac, None
        if vm is None:
            return
        if vm.sock is not None:
            vm.sock.close()
        self.announcer.forget(vm.index)
        self.kernel_addrs.pop(vm.index, None)

    # ------------------------------------------------------------ interfaces

    async def _ensure_interface(self, name: str) -> Interface:
        iface = self.ifaces.get(name)
        if iface is None:
            iface = self.ifaces[name] = Interface(name)
            info = await self.rtnl.link(name)
            if info is None:
                log.warning("%s: no such interface (its routers stay in FAULT)", name)
            else:
                await self._attach(iface, info)
        return iface

    async def _attach(self, iface: Interface, info: LinkInfo) -> None:
        if iface.index != info.index:  # new or re-created link: new sockets
            self._close_sockets(iface)
            if iface.index is not None:  # re-created: the old link and its macvlans are gone
                self.announcer.forget(iface.index)
                self.kernel_addrs.pop(iface.index, None)
                for slot in self._slots_on(iface.name):
                    self._forget_vmac(slot)
            try:
                self.announcer.prepare(iface.name, info.index)
            except OSError as exc:
                log.error("%s: cannot open announcement sockets: %s", iface.name, exc)
        iface.index, iface.up, iface.mac = info.index, info.up, info.mac
        families = {k[2] for k in self.slots if k[0] == iface.name}
        for fam in sorted(families):
            if fam not in iface.sockets:
                try:
                    sock = self.open_socket(iface.name, info.index, fam)
                except OSError as exc:
                    log.error("%s: cannot open IPv%d VRRP socket: %s", iface.name, fam, exc)
                    continue
                iface.sockets[fam] = sock
                if sock.fileno() >= 0:
                    self._loop.add_reader(sock.fileno(), self._on_wakeup, iface, fam)
        await self._refresh_addresses(iface)
        if self._running:  # an interface appearing later (at start: see start())
            for slot in self._slots_on(iface.name):
                if slot.inst.virtual_mac and slot.vmac is None:
                    try:
                        await self._setup_vmac(slot)
                    except OSError as exc:  # the router stays in FAULT (see _link_changed)
                        log.error("%s: %s", slot.router.config.name, exc)

    def _slots_on(self, ifname: str) -> list[Slot]:
        return [s for s in self.slots.values() if s.vlan.interface == ifname]

    def _usable(self, slot: Slot, iface: Interface) -> bool:
        """The link a router can run on: up, and its virtual MAC in place if it has one."""
        return iface.up and (not slot.inst.virtual_mac or slot.vmac is not None)

    def _close_sockets(self, iface: Interface) -> None:
        for handle in iface.deferred.values():
            handle.cancel()
        iface.deferred.clear()
        for sock in iface.sockets.values():
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        iface.sockets.clear()

    async def _refresh_addresses(self, iface: Interface) -> None:
        if iface.index is None:
            return
        addrs = await self.rtnl.addresses(iface.index)
        self.kernel_addrs[iface.index] = {a.ip for a, _ in addrs}
        vips = {v.ip for s in self.slots.values() if s.vlan.interface == iface.name
                and s.router.config.priority != OWNER_PRIORITY for v in s.vips}
        iface.own = {a.ip for a, _ in addrs if a.ip not in vips}
        for fam in (4, 6):
            iface.primary[fam] = primary_address(addrs, fam, vips)
        for slot in self.slots.values():
            if slot.vlan.interface == iface.name:
                slot.router.primary_address = iface.primary.get(slot.router.config.family)

    async def _remove_leftovers(self, slots: Iterable[Slot]) -> None:
        """VIPs of ours left on an interface by a crash: nobody elected us, remove them.
        One dump and one batch per interface, whatever the number of routers."""
        by_iface: dict[str, list[Slot]] = {}
        for slot in slots:
            if slot.router.config.priority != OWNER_PRIORITY:
                by_iface.setdefault(slot.vlan.interface, []).append(slot)
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
            await self._refresh_addresses(iface)

    def _on_link(self, info: LinkInfo) -> None:
        iface = self.ifaces.get(info.name)
        if iface is None:
            return
        was_up = iface.up and iface.index == info.index
        asyncio.ensure_future(self._link_changed(iface, info, was_up))

    async def _link_changed(self, iface: Interface, info: LinkInfo, was_up: bool) -> None:
        if info.up:
            try:
                await self._attach(iface, info)
            except Exception as exc:  # keep following the link even if a refresh failed
                log.warning("%s: refreshing after link up failed: %s", iface.name, exc)
        iface.up = info.up
        if info.up == was_up and all(s.router.link_up == self._usable(s, iface)
                                     for s in self._slots_on(iface.name)):
            return
        log.info("%s: link %s", iface.name, "up" if info.up else "down")
        now = self.now()
        for slot in self._slots_on(iface.name):
            self._apply(slot, slot.router.set_link(now, self._usable(slot, iface)))

    # ------------------------------------------------------------ routers

    def _start_slot(self, slot: Slot, cause: str) -> None:
        iface = self.ifaces[slot.vlan.interface]
        slot.router.primary_address = iface.primary.get(slot.router.config.family)
        now = self.now()
        if not self._usable(slot, iface):
            slot.router.link_up = False
        self._apply(slot, slot.router.start(now, cause))

    def _on_wakeup(self, iface: Interface, family: int) -> None:
        """A socket became readable: read it RX_COALESCE_S later, so a burst (a peer's
        1000 routers advertise in one instant) costs one wake-up, not hundreds. Adverts
        are dated by the kernel (SO_TIMESTAMPNS), so the delay moves no timer, and a
        takeover falling due meanwhile reads the socket first (_on_timer)."""
        sock = iface.sockets.get(family)
        if sock is None or family in iface.deferred:
            return
        self._loop.remove_reader(sock.fileno())
        iface.deferred[family] = self._loop.call_later(RX_COALESCE_S, self._read_deferred,
                                                       iface, family)

    def _read_deferred(self, iface: Interface, family: int) -> None:
        if iface.deferred.pop(family, None) is None:
            return
        sock = iface.sockets.get(family)
        if sock is None:
            return
        try:
            self._on_readable(iface, family)
        finally:
            if iface.sockets.get(family) is sock and sock.fileno() >= 0:
                self._loop.add_reader(sock.fileno(), self._on_wakeup, iface, family)

    def _on_readable(self, iface: Interface, family: int) -> None:
        sock = iface.sockets.get(family)
        if sock is None:
            return
        now = self.now()
        valid: list[tuple[Slot, Advert, AddressDiff | None, Fraction]] = []
        for payload, meta, age_s in sock.recv_all():
            checked = self._validate(iface, family, payload, meta)
            if checked is not None:
                valid.append((*checked, now - Fraction(age_s)))
        # validate first, then keep each sender's newest (vipd.core.batch)
        kept, superseded = newest_per_key(valid, key=lambda v: (v[0].key, v[1].src))
        if superseded:
            iface.drops[family][DropReason.SUPERSEDED] += superseded
        for slot, adv, diff, at in kept:
            self._deliver(slot, adv, diff, at)

    def receive(self, iface: Interface, family: int, payload: bytes, meta: IpMeta,
                age_s: float = 0.0) -> None:
        """One received packet; `age_s` back-dates it to its kernel reception time."""
        checked = self._validate(iface, family, payload, meta)
        if checked is not None:
            self._deliver(*checked, self.now() - Fraction(age_s))

    def _validate(self, iface: Interface, family: int, payload: bytes,
                  meta: IpMeta) -> tuple[Slot, Advert, AddressDiff | None] | None:
        """Check one packet (vipd.core.receive); count its drop reason if it fails."""
        got = iface.receivers[family].check(
            payload, meta, iface.own,
            lambda vrid: (s, s.view) if (s := self.slots.get((iface.name, vrid, family)))
            else None,
            lambda s: self.slots.get(s.key) is s)
        if not isinstance(got, Dropped):
            return got
        slot = got.target
        (slot.drops if slot is not None else iface.drops[family])[got.reason] += 1
        return None

    def _deliver(self, slot: Slot, adv: Advert, diff: AddressDiff | None,
                 at: Fraction) -> None:
        acts, dropped = slot.router.handle_advert(at, adv, diff)
        if dropped is not None:
            slot.drops[dropped] += 1
        self._apply(slot, acts)

    def _on_timer(self, slot: Slot) -> None:
        slot.armed = None
        if self.slots.get(slot.key) is not slot and not slot.router.holding_vips:
            return
        if slot.router.master_down_timer is not None:
            # an advert may be waiting in a deferred read: hear it before taking over
            iface = self.ifaces.get(slot.vlan.interface)
            if iface is not None and slot.router.config.family in iface.deferred:
                self._read_deferred(iface, slot.router.config.family)
        deadline = slot.router.get_timer()
        if deadline is not None and float(deadline) - self._clock() > 2 * PRECISE_LEAD_S:
            self._rearm(slot)  # woken for a deadline that has since moved later
            return
        down = slot.router.master_down_timer
        if down is not None and deadline == down:
            # Armed PRECISE_LEAD_S early (see _rearm); finish the wait exactly. Only the
            # rare takeover pays this short blocking sleep, never the periodic adverts.
            early = float(down) - self._clock()
            if early > 0:
                time.sleep(early)
        self._apply(slot, slot.router.handle_timer(self.now()))

    def _rearm(self, slot: Slot) -> None:
        """Keep one wake-up per router at or before its next deadline. A deadline that moves
        later (a backup's Master_Down_Timer, pushed at every advert) keeps the armed
        wake-up, which re-arms when it comes. Routers due at the same instant share one
        loop timer (adverts go out on a common grid: 1000 routers, one wake-up)."""
        deadline = slot.router.get_timer()
        if slot.wake_at is not None:
            if deadline is not None and slot.armed is not None and slot.armed <= deadline:
                return
            self._unschedule(slot)
        slot.armed = deadline
        if deadline is None:
            return
        when = float(deadline)
        if deadline == slot.router.master_down_timer:
            # asyncio's epoll wait rounds up to whole milliseconds: a takeover would start
            # up to 1 ms late. Wake a little early and sleep the rest precisely.
            when -= PRECISE_LEAD_S
        due = self._wakeups.get(when)
        if due is None:
            due = self._wakeups[when] = {}
            self._wake_handles[when] = self._loop.call_at(when, self._on_wakeups, when)
        due[id(slot)] = slot
        slot.wake_at = when

    def _unschedule(self, slot: Slot) -> None:
        when, slot.wake_at = slot.wake_at, None
        due = self._wakeups.get(when) if when is not None else None
        if due is not None:
            due.pop(id(slot), None)
            if not due:
                del self._wakeups[when]  # type: ignore[arg-type]
                self._wake_handles.pop(when).cancel()  # type: ignore[arg-type]

    def _on_wakeups(self, when: float) -> None:
        self._wake_handles.pop(when, None)
        for slot in self._wakeups.pop(when, {}).values():
            slot.wake_at = None
            self._on_timer(slot)

    # ------------------------------------------------------------ actions

    def _apply(self, slot: Slot, actions: list[Action]) -> None:
        group_before = self.policy.active
        transitioned = False
        current = self.slots.get(slot.key) is slot
        for act in actions:
            if isinstance(act, SendAdvert):
                self._send_advert(slot, act)
            elif isinstance(act, AddVips):
                if slot.vmac is not None and not self._vmac_up(slot, True):
                    continue
                self._queue_addr(slot, "add")
            elif isinstance(act, RemoveVips):
                if slot.router.config.priority != OWNER_PRIORITY:  # never our real address
                    self._queue_addr(slot, "remove")
            elif isinstance(act, Announce):
                if slot.installing:  # announced once the VIPs are in the kernel
                    slot.announce_after_install = True
                else:
                    self._announce(slot)
            elif isinstance(act, Transitioned):
                transitioned = True
                if current:
                    self.policy.note(slot.key, act.old, act.new)
        self._rearm(slot)
        if not transitioned or not current or self.stopping:
            return
        if self.policy.active != group_before:
            self._drain_group(self.policy.active)
        elif slot.router.state is not State.FAULT and \
                (GROUP_FAULT in slot.router.drains) != self.policy.active:
            self._apply(slot, slot.router.set_drain(self.now(), GROUP_FAULT,
                                                    self.policy.active))

    def _drain_group(self, on: bool) -> None:
        """The group fault started or ended (vipd.core.policy): tell every router, once."""
        now = self.now()
        for s in list(self.slots.values()):
            if s.router.state is not State.FAULT:
                self._apply(s, s.router.set_drain(now, GROUP_FAULT, on))

    def _vmac_up(self, slot: Slot, up: bool) -> bool:
        assert slot.vmac is not None
        try:
            self.set_link_up(slot.vmac.name, up)
            return True
        except OSError as exc:
            log.warning("%s: cannot set %s %s: %s", slot.router.config.name, slot.vmac.name,
                        "up" if up else "down", exc)
            if up:
                self._apply(slot, slot.router.report_io(self.now(), False, "VIP install"))
            return False

    def _send_advert(self, slot: Slot, act: SendAdvert) -> None:
        c: RouterConfig = slot.router.config
        iface = self.ifaces[slot.vlan.interface]
        sock = iface.sockets.get(c.family)
        if slot.vmac is not None and slot.vmac.sock is not None:
            sock = slot.vmac.sock
        src = iface.primary.get(c.family)
        ok = True
        if sock is None or src is None:
            ok = False
            log.warning("%s: cannot send: %s", c.name,
                        "no socket" if sock is None else f"no IPv{c.family} source address")
        else:
            try:
                sock.send(encode_advert(c, act, src), src)
            except OSError as exc:
                ok = False
                log.warning("%s: advert send failed: %s", c.name, exc)
        if ok and not slot.router.io_failures_pending:
            return  # the common case, without a clock read
        follow = slot.router.report_io(self.now(), ok, "send")
        if follow:
            self._apply(slot, follow)

    def _announce(self, slot: Slot) -> None:
        iface = self.ifaces.get(slot.vlan.interface)
        if iface is None or iface.index is None:
            return
        name, index, mac = iface.name, iface.index, iface.mac
        if slot.vmac is not None:
            name, index, mac = slot.vmac.name, slot.vmac.index, slot.vmac.mac
        try:
            self.announcer.announce(name, index, mac, slot.router.config.addresses)
        except OSError as exc:
            log.warning("%s: announce failed: %s", slot.router.config.name, exc)

    def _announce_if_master(self, slot: Slot) -> None:
        if slot.router.state is State.MASTER:
            self._announce(slot)

    def _queue_addr(self, slot: Slot, op: str) -> None:
        """Queue "add", "remove" or "repair" for a slot's VIPs. The adds and removes of
        every router queued in one turn of the loop reach the kernel as one batch
        (vipd.io.addr_batch), in order: 1000 routers taking over cost one round trip.
        A repair dumps the link first and adds what is missing."""
        self._addr_queue.append((slot, op))
        if op == "add":
            slot.installing = True
        if self._addr_flush is None:
            self._addr_flush = asyncio.ensure_future(self._flush_addrs())
        slot.addr_task = self._addr_flush

    async def _flush_addrs(self) -> None:
        async with self._addr_lock:  # the previous flush finishes first: order is kept
            self._addr_flush = None
            queue, self._addr_queue = self._addr_queue, []
            batch: list[tuple[Slot, str, int | None]] = []
            for slot, op in queue:
                if op == "repair":
                    await self._run_batch(batch)
                    batch = []
                    await self._repair(slot)
                else:
                    batch.append((slot, op, self._vip_index(slot)))
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[tuple[Slot, str, int | None]]) -> None:
        if not batch:
            return
        ops = [(op == "add", index, vip) for slot, op, index in batch if index is not None
               for vip in slot.vips]
        t0 = self._loop.time()
        try:
            results = iter(await self.rtnl.apply_addresses(ops)) if ops else iter(())
        except Exception as exc:  # the whole batch failed: every op of it failed
            failed: list[OSError | None] = [OSError(str(exc))] * len(ops)
            results = iter(failed)
        done = 0
        for slot, op, index in batch:
            add = op == "add"
            errors = [e for e in (next(results) for _ in slot.vips) if e] if index is not None \
                else [OSError("interface missing")]
            self._addr_outcome(slot, add, index, errors)
            done += not errors
        if len(batch) > 8:
            log.info("VIPs changed for %d routers (%d addresses) in %.1f ms", done, len(ops),
                     (self._loop.time() - t0) * 1000)

    def _addr_outcome(self, slot: Slot, add: bool, index: int | None,
                      errors: list[OSError]) -> None:
        name = slot.router.config.name
        if add:
            slot.installing = False
        if errors:
            log.warning("%s: VIP %s failed: %s", name, "install" if add else "removal",
                        errors[0])
            if add:
                slot.announce_after_install = False
                self._apply(slot, slot.router.report_io(self.now(), False, "VIP install"))
                if slot.router.state is State.MASTER:  # try again, one interval later
                    self._loop.call_later(float(slot.router.advertisement_interval),
                                          self._retry_install, slot)
            return
        assert index is not None
        held = self.kernel_addrs.setdefault(index, set())
        if add:
            held.update(v.ip for v in slot.vips)
            if slot.router.io_failures_pending:
                slot.router.report_io(self.now(), True, "VIP install")
            if slot.announce_after_install:  # the order: VIPs installed, then announced
                slot.announce_after_install = False
                self._announce_if_master(slot)
        else:
            held.difference_update(v.ip for v in slot.vips)
            if slot.vmac is not None:
                self._vmac_up(slot, False)  # a backup never sends from the virtual MAC
        log.debug("%s: VIPs %s", name, "added" if add else "removed")

    async def _repair(self, slot: Slot) -> None:
        """Put back VIPs that someone removed while we are master (the kernel is the
        truth: dump the link, add what is missing)."""
        index = self._vip_index(slot)
        if slot.router.state is not State.MASTER or index is None:
            return
        try:
            held = {a.ip for a, _ in await self.rtnl.addresses(index)}
            self.kernel_addrs[index] = held
            missing = tuple(v for v in slot.vips if v.ip not in held)
            if not missing or slot.router.state is not State.MASTER:
                return
            errors = [e for e in await self.rtnl.apply_addresses(
                [(True, index, v) for v in missing]) if e]
        except Exception as exc:
            errors = [OSError(str(exc))]
        if errors:
            self._addr_outcome(slot, True, index, errors)
            return
        held.update(v.ip for v in missing)
        slot.vips_repaired += len(missing)
        log.warning("%s: VIP %s removed from outside while MASTER: restored",
                    slot.router.config.name, ", ".join(str(v) for v in missing))
        self._announce(slot)

    def _retry_install(self, slot: Slot) -> None:
        if slot.router.state is State.MASTER and self.slots.get(slot.key) is slot:
            self._queue_addr(slot, "add")

    # ------------------------------------------------------------ control

    def status(self) -> dict[str, Any]:
        now = self.now()
        views = [self._router_view(s) for s in self.slots.values()]
        ifaces = [{"name": i.name, "index": i.index, "up": i.up, "mac": i.mac,
                   "primary": {f"IPv{f}": str(a) if a else None for f, a in i.primary.items()},
                   "drops": {f"IPv{f}": {k.value: n for k, n in c.items() if n}
                             for f, c in i.drops.items()}}
                  for i in self.ifaces.values()]
        node_problems = [f"{name} is down ({why}); restarting"
                         for name, why in sorted(self.tasks_down.items())]
        snap = snapshot(self.cfg.node.name, self.cfg.mode.value, views, ifaces, now,
                        float(now - self._started), self.reloads, node_problems,
                        self.stopping)
        snap["accept_mode_enforced"] = self.accept_mode_enforced
        snap["task_restarts"] = dict(self.task_restarts)
        if self._control is not None:
            snap["control"] = dict(self._control.stats)
        return snap

    def _shared_status(self) -> dict[str, Any]:
        """One snapshot serves every status request of a short window: a storm of clients
        costs one build per window, not one per client (the adverts keep their time)."""
        now = self._loop.time()
        if self._status_cache is None or now - self._status_cache[0] > STATUS_REUSE_S:
            self._status_cache = (now, {"ok": True, "status": self.status()})
        return self._status_cache[1]

    def _router_view(self, slot: Slot) -> RouterView:
        index = self._vip_index(slot)
        held = self.kernel_addrs.get(index) if index is not None else None
        return RouterView(
            slot.vlan.name, slot.vlan.interface, slot.router, slot.static_status["vips"],
            slot.drops,
            kernel_vips=None if held is None else tuple(
                text for v, text in zip(slot.vips, slot.static_status["vips"], strict=True)
                if v.ip in held),
            vips_settling=slot.addr_task is not None and not slot.addr_task.done(),
            vips_repaired=slot.vips_repaired, static=slot.static_status)

    def set_maintenance(self, on: bool) -> None:
        now = self.now()
        for slot in self.slots.values():
            self._apply(slot, slot.router.set_maintenance(now, on))
        log.info("maintenance %s", "on" if on else "off")

    async def reload(self) -> dict[str, Any]:
        """SIGHUP: all or nothing. Everything that can fail (parsing, claiming interfaces,
        creating macvlans) is done before any running router is touched; if any of it fails
        the reload is refused and the old configuration keeps running untouched. Routers
        whose configuration did not change keep their state and timers."""
        if self.config_path is None:
            return {"changed": 0}
        try:
            new_cfg = await self._loop.run_in_executor(None, load, self.config_path)
            new_slots = build_slots(new_cfg)
            kept_keys = {k for k, old in self.slots.items()
                         if (new := new_slots.get(k)) is not None
                         and new.router.config == old.router.config and new.vips == old.vips
                         and new.inst.virtual_mac == old.inst.virtual_mac}
            prepared = await self._prepare_reload(new_cfg, new_slots, kept_keys)
        except ConfigError as exc:
            for line in exc.errors:
                log.error("reload refused, the running configuration stays: %s", line)
            raise
        # Commit. Nothing below refuses: a router that cannot run is reported by its core.
        now = self.now()
        changed = 0
        for key, old in list(self.slots.items()):
            if key in kept_keys:
                new_slots[key] = old
                continue
            changed += 1
            self._apply(old, old.router.shutdown(now, "reload"))
            self._apply(old, old.router.release_now())  # its replacement starts afresh
            new = new_slots.get(key)
            if old.addr_task is not None:  # its VIP removal, on the link it knows, first
                with contextlib.suppress(Exception):
                    await old.addr_task
            if old.vmac is not None and new is not None and new.inst.virtual_mac:
                new.vmac, old.vmac = old.vmac, None  # same name and MAC: keep the link
            else:
                await self._drop_vmac(old)
        self.cfg = new_cfg
        added = [s for k, s in new_slots.items() if k not in kept_keys]
        self.slots = new_slots
        self._index_vips()
        was_active = self.policy.active
        self.policy = GroupPolicy(new_cfg.mode.value, (k for k, s in new_slots.items()
                                                       if s.router.state is State.FAULT))
        if self.policy.active != was_active:
            self._drain_group(self.policy.active)
        self.lock.release_interfaces(v.interface for v in new_cfg.vlans)
        for slot in added:
            await self._ensure_interface(slot.vlan.interface)
            await self._attach_existing(slot)
        for name in [n for n in self.ifaces if not self._slots_on(n)]:
            gone = self.ifaces.pop(name)
            self._close_sockets(gone)
        await self._remove_leftovers([s for s in added if not s.router.holding_vips])
        await self._apply_accept_mode()
        for slot in added:
            self._start_slot(slot, "reload")
        self.reloads += 1
        log.info("reloaded: %d kept, %d replaced or removed, %d started (%d macvlans made)",
                 len(kept_keys), changed, len(added), prepared)
        return {"kept": len(kept_keys), "replaced_or_removed": changed, "started": len(added)}

    async def _prepare_reload(self, new_cfg: Config, new_slots: dict[Key, Slot],
                              kept_keys: set[Key]) -> int:
        """The fallible part of a reload; on failure undo it and raise ConfigError."""
        try:
            self.lock.claim_interfaces(v.interface for v in new_cfg.vlans)
        except OSError as exc:
            raise ConfigError([str(exc)]) from exc
        made: list[Slot] = []
        new_ifaces = [v.interface for v in new_cfg.vlans if v.interface not in self.ifaces]
        try:
            for key, slot in new_slots.items():
                old = self.slots.get(key)
                if (key in kept_keys or not slot.inst.virtual_mac
                        or (old is not None and old.vmac is not None)):
                    continue
                iface = await self._ensure_interface(slot.vlan.interface)
                if iface.index is not None:
                    await self._setup_vmac(slot)
                    made.append(slot)
        except OSError as exc:
            for slot in made:
                await self._drop_vmac(slot)
            for name in new_ifaces:
                if name in self.ifaces:
                    self._close_sockets(self.ifaces.pop(name))
            self.lock.release_interfaces(v.interface for v in self.cfg.vlans)
            raise ConfigError([f"{exc}"]) from exc
        return len(made)

    async def _attach_existing(self, slot: Slot) -> None:
        iface = self.ifaces[slot.vlan.interface]
        if iface.index is not None:
            info = await self.rtnl.link(iface.name)
            if info is not None:
                await self._attach(iface, info)

    async def _handle_request(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("command")
        if cmd == "status":
            return self._shared_status()
        if cmd == "maintenance":
            on = req.get("on")
            if not isinstance(on, bool):
                return error("bad_request", "maintenance needs \"on\": true or false")
            self.set_maintenance(on)
            return {"ok": True, "maintenance": on}
        if cmd == "reload":
            try:
                return {"ok": True, "reload": await self.reload()}
            except ConfigError as exc:
                return error("bad_config", "; ".join(exc.errors))
        if cmd == "ping":
            return {"ok": True, "node": self.cfg.node.name}
        return error("unknown_command", f"unknown command {cmd!r}")


def error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


# ---------------------------------------------------------------- entry point


def run(config_path: str, *, control_socket: str | None = None, verbose: bool = False) -> int:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load(config_path)
    except ConfigError as exc:
        for line in exc.errors:
            log.error("%s: %s", config_path, line)
        return 1
    return asyncio.run(_main(cfg, config_path, control_socket))


async def _main(cfg: Config, config_path: str, control_socket: str | None) -> int:
    from vipd.io.announce import LinuxAnnouncer
    from vipd.io.rtnl import PyrouteRtnl
    from vipd.io.vrrp_socket import VrrpSocket

    daemon = Daemon(cfg, rtnl=PyrouteRtnl(), open_socket=VrrpSocket,
                    announcer=LinuxAnnouncer(), control_socket=control_socket,
                    config_path=config_path)
    try:
        await daemon.start()
    except (ConfigError, OSError) as exc:
        log.error("cannot start: %s", exc)
        await daemon.close()
        return 1
    loop = asyncio.get_running_loop()
    slow_ms = os.environ.get("VIPD_SLOW_CALLBACK_MS")
    if slow_ms:  # diagnostics: asyncio logs every callback that blocks the loop longer
        loop.set_debug(True)
        loop.slow_callback_duration = float(slow_ms) / 1000
    loop.add_signal_handler(signal.SIGTERM, daemon.request_stop)
    loop.add_signal_handler(signal.SIGINT, daemon.request_stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_reload(daemon)))
    await daemon.run_until_stopped()
    log.info("stopped")
    return 0


async def _reload(daemon: Daemon) -> None:
    with contextlib.suppress(ConfigError):
        await daemon.reload()
