"""The daemon's driver: one asyncio loop feeding the pure cores and carrying out their actions.

Inputs: VRRP packets (one raw socket per interface and family), link events (rtnetlink),
each router's single armed timer, the control socket, signals. After every input the
router's timer is re-armed from `get_timer()`. VIP changes go through rtnetlink in order per
router; a failure is reported back to the core, which gives up mastership after repeats.
Time is the loop's monotonic clock, converted to an exact Fraction once, in `now()`.
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
    Mode,
    VlanConfig,
    link_local_vips,
    load,
    router_configs,
    virtual_mac,
)
from vipd.core.actions import Action, AddVips, Announce, RemoveVips, SendAdvert, Transitioned
from vipd.core.advert import encode_advert, receiver_view
from vipd.core.packet import (
    DecodeError,
    DropReason,
    IPAddress,
    IpMeta,
    ReceiverView,
    check_against,
    decode,
)
from vipd.core.policy import GROUP_FAULT, group_fault
from vipd.core.router import OWNER_PRIORITY, RouterConfig, State, VirtualRouter
from vipd.io.announce import Announcer
from vipd.io.control import ControlServer
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
from vipd.io.vrrp_socket import VrrpTransport, latest_per_sender
from vipd.status import RouterView, snapshot

log = logging.getLogger("vipd")

SocketFactory = Callable[[str, int, int], VrrpTransport]
PRECISE_LEAD_S = 0.0015
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
    timer: asyncio.TimerHandle | None = None
    addr_task: asyncio.Future[None] | None = None
    vmac: Vmac | None = None

    @property
    def key(self) -> Key:
        c = self.router.config
        return (self.vlan.interface, c.vrid, c.family)

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
                 accept_guard: AcceptGuard | None = None) -> None:
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
        self.ifaces: dict[str, Interface] = {}
        self.slots: dict[Key, Slot] = {}
        self.stopping = False
        self._reconciling = False
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
        if self.cfg.mode is Mode.ALL_ACTIVE:
            # TODO(#3): all-active load sharing has its own issue; refuse rather than pretend
            raise ConfigError(["mode: 'all-active' is not implemented by this vipd yet"])
        await self.rtnl.open()
        self.slots = build_slots(self.cfg)
        for slot in self.slots.values():
            await self._ensure_interface(slot.vlan.interface)
        for slot in self.slots.values():
            if slot.inst.virtual_mac:
                await self._setup_vmac(slot)
        await self._remove_leftovers(self.slots.values())
        await self._apply_accept_mode()
        self._control = ControlServer(self.control_path, self._handle_request,
                                      self.cfg.node.control_socket_mode)
        await self._control.start()
        self._tasks.append(asyncio.ensure_future(self.rtnl.watch(self._on_link)))
        for slot in self.slots.values():
            self._start_slot(slot, "startup")
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
            if slot.timer:
                slot.timer.cancel()
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
        with contextlib.suppress(Exception):
            await self.accept_guard.remove()
        for slot in self.slots.values():
            await self._drop_vmac(slot)
        for iface in self.ifaces.values():
            self._close_sockets(iface)
        if self._control:
            await self._control.stop()
        await self.rtnl.close()

    # ------------------------------------------------------------ virtual MAC

    @staticmethod
    def _default_send_socket(name: str, index: int, family: int) -> VrrpTransport:
        from vipd.io.vrrp_socket import VrrpSocket

        return VrrpSocket(name, index, family, send_only=True)

    async def _setup_vmac(self, slot: Slot) -> None:
        iface = self.ifaces[slot.vlan.interface]
        c = slot.router.config
        if iface.index is None:
            raise OSError(f"{c.name}: virtual_mac needs {iface.name} to exist at start")
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
        log.info("%s: virtual MAC %s on %s", c.name, mac, name)

    async def _drop_vmac(self, slot: Slot) -> None:
        if slot.vmac is None:
            return
        if slot.addr_task is not None:  # let a queued VIP removal finish on the macvlan
            with contextlib.suppress(Exception):
                await slot.addr_task
        vm, slot.vmac = slot.vmac, None
        if vm.sock is not None:
            vm.sock.close()
        with contextlib.suppress(Exception):
            await self.rtnl.delete_link(vm.name)

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
                    self._loop.add_reader(sock.fileno(), self._on_readable, iface, fam)
        await self._refresh_addresses(iface)

    def _close_sockets(self, iface: Interface) -> None:
        for sock in iface.sockets.values():
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        iface.sockets.clear()

    async def _refresh_addresses(self, iface: Interface) -> None:
        if iface.index is None:
            return
        addrs = await self.rtnl.addresses(iface.index)
        vips = {v.ip for s in self.slots.values() if s.vlan.interface == iface.name
                and s.router.config.priority != OWNER_PRIORITY for v in s.vips}
        iface.own = {a.ip for a, _ in addrs if a.ip not in vips}
        for fam in (4, 6):
            iface.primary[fam] = primary_address(addrs, fam, vips)
        for slot in self.slots.values():
            if slot.vlan.interface == iface.name:
                slot.router.primary_address = iface.primary.get(slot.router.config.family)

    async def _remove_leftovers(self, slots: Iterable[Slot]) -> None:
        """VIPs of ours left on an interface by a crash: nobody elected us, remove them."""
        for slot in slots:
            iface = self.ifaces[slot.vlan.interface]
            if iface.index is None or slot.router.config.priority == OWNER_PRIORITY:
                continue
            present = {a.ip for a, _ in await self.rtnl.addresses(iface.index)}
            for vip in slot.vips:
                if vip.ip in present:
                    log.info("%s: removing leftover VIP %s", slot.router.config.name, vip)
                    await self.rtnl.del_address(iface.index, vip)
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
        if info.up == was_up:
            return
        log.info("%s: link %s", iface.name, "up" if info.up else "down")
        now = self.now()
        for slot in self.slots.values():
            if slot.vlan.interface == iface.name:
                self._apply(slot, slot.router.set_link(now, info.up))

    # ------------------------------------------------------------ routers

    def _start_slot(self, slot: Slot, cause: str) -> None:
        iface = self.ifaces[slot.vlan.interface]
        slot.router.primary_address = iface.primary.get(slot.router.config.family)
        now = self.now()
        if not iface.up:
            slot.router.link_up = False
        self._apply(slot, slot.router.start(now, cause))

    def _on_readable(self, iface: Interface, family: int) -> None:
        sock = iface.sockets.get(family)
        if sock is None:
            return
        batch, superseded = latest_per_sender(sock.recv_all())
        if superseded:
            iface.drops[family][DropReason.SUPERSEDED] += superseded
        for payload, meta, age_s in batch:
            self.receive(iface, family, payload, meta, age_s)

    def receive(self, iface: Interface, family: int, payload: bytes, meta: IpMeta,
                age_s: float = 0.0) -> None:
        """One received packet; `age_s` back-dates it to its kernel reception time."""
        drops = iface.drops[family]
        if meta.src in iface.own:
            drops[DropReason.OWN_PACKET] += 1
            return
        try:
            adv = decode(payload, meta)
        except DecodeError as exc:
            drops[exc.reason] += 1
            return
        slot = self.slots.get((iface.name, adv.vrid, family))
        try:
            check_against(adv, slot.view if slot else None)
        except DecodeError as exc:
            (slot.drops if slot else drops)[exc.reason] += 1
            return
        assert slot is not None
        self._apply(slot, slot.router.receive(self.now() - Fraction(age_s), adv))

    def _on_timer(self, slot: Slot) -> None:
        slot.timer = None
        if self.slots.get(slot.key) is not slot and not slot.router.holding_vips:
            return
        down = slot.router.master_down_timer
        if down is not None and slot.router.get_timer() == down:
            # Armed PRECISE_LEAD_S early (see _rearm); finish the wait exactly. Only the
            # rare takeover pays this short blocking sleep, never the periodic adverts.
            early = float(down) - self._clock()
            if early > 0:
                time.sleep(early)
        self._apply(slot, slot.router.handle_timer(self.now()))

    def _rearm(self, slot: Slot) -> None:
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None
        deadline = slot.router.get_timer()
        if deadline is None:
            return
        when = float(deadline)
        if deadline == slot.router.master_down_timer:
            # asyncio's epoll wait rounds up to whole milliseconds: a takeover would start
            # up to 1 ms late. Wake a little early and sleep the rest precisely.
            when -= PRECISE_LEAD_S
        slot.timer = self._loop.call_at(when, self._on_timer, slot)

    # ------------------------------------------------------------ actions

    def _apply(self, slot: Slot, actions: list[Action]) -> None:
        transitioned = False
        for act in actions:
            if isinstance(act, SendAdvert):
                self._send_advert(slot, act)
            elif isinstance(act, AddVips):
                if slot.vmac is not None and not self._vmac_up(slot, True):
                    continue
                self._queue_addr(slot, add=True)
            elif isinstance(act, RemoveVips):
                if slot.router.config.priority != OWNER_PRIORITY:  # never our real address
                    self._queue_addr(slot, add=False)
            elif isinstance(act, Announce):
                self._announce(slot)
            elif isinstance(act, Transitioned):
                transitioned = True
        self._rearm(slot)
        if transitioned:
            self._reconcile_group()

    def _reconcile_group(self) -> None:
        """Apply the mode policy (vipd.core.policy) to every router of this node."""
        if self._reconciling or self.stopping:
            return
        self._reconciling = True
        try:
            fault = group_fault(self.cfg.mode.value,
                                (s.router.state for s in self.slots.values()))
            now = self.now()
            for s in list(self.slots.values()):
                if s.router.state is not State.FAULT:
                    self._apply(s, s.router.set_drain(now, GROUP_FAULT, fault))
        finally:
            self._reconciling = False

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
        follow = slot.router.report_io(self.now(), ok, "send")
        if follow:
            self._apply(slot, follow)

    def _announce(self, slot: Slot) -> None:
        iface = self.ifaces[slot.vlan.interface]
        if iface.index is None:
            return
        name, index, mac = iface.name, iface.index, iface.mac
        if slot.vmac is not None:
            name, index, mac = slot.vmac.name, slot.vmac.index, slot.vmac.mac
            task = slot.addr_task
            if slot.router.config.family == 6 and task is not None and not task.done():
                # an NA from the macvlan needs its (virtual) link-local source installed
                task.add_done_callback(lambda _t: self._announce_if_master(slot))
                return
        try:
            self.announcer.announce(name, index, mac, slot.router.config.addresses)
        except OSError as exc:
            log.warning("%s: announce failed: %s", slot.router.config.name, exc)

    def _announce_if_master(self, slot: Slot) -> None:
        if slot.router.state is State.MASTER:
            self._announce(slot)

    def _queue_addr(self, slot: Slot, add: bool) -> None:
        prev = slot.addr_task
        slot.addr_task = asyncio.ensure_future(self._addr_op(slot, add, prev))

    async def _addr_op(self, slot: Slot, add: bool, prev: asyncio.Future[None] | None) -> None:
        if prev is not None:
            with contextlib.suppress(Exception):
                await prev
        iface = self.ifaces[slot.vlan.interface]
        name = slot.router.config.name
        index = slot.vmac.index if slot.vmac else iface.index
        try:
            if index is None:
                raise OSError("interface missing")
            for vip in slot.vips:
                if add:
                    await self.rtnl.add_address(index, vip)
                else:
                    await self.rtnl.del_address(index, vip)
            if not add and slot.vmac is not None:
                self._vmac_up(slot, False)  # a backup never sends from the virtual MAC
        except Exception as exc:  # netlink errors come in several types
            log.warning("%s: VIP %s failed: %s", name, "install" if add else "removal", exc)
            if add:
                self._apply(slot, slot.router.report_io(self.now(), False, "VIP install"))
                if slot.router.state is State.MASTER:  # try again, one interval later
                    self._loop.call_later(float(slot.router.advertisement_interval),
                                          self._retry_install, slot)
            return
        if add:
            slot.router.report_io(self.now(), True, "VIP install")
        log.debug("%s: VIPs %s", name, "added" if add else "removed")

    def _retry_install(self, slot: Slot) -> None:
        if slot.router.state is State.MASTER and self.slots.get(slot.key) is slot:
            self._queue_addr(slot, add=True)

    # ------------------------------------------------------------ control

    def status(self) -> dict[str, Any]:
        now = self.now()
        views = [RouterView(s.vlan.name, s.vlan.interface, s.router,
                            tuple(str(v) for v in s.vips), s.drops)
                 for s in self.slots.values()]
        ifaces = [{"name": i.name, "index": i.index, "up": i.up, "mac": i.mac,
                   "primary": {f"IPv{f}": str(a) if a else None for f, a in i.primary.items()},
                   "drops": {f"IPv{f}": {k.value: n for k, n in c.items() if n}
                             for f, c in i.drops.items()}}
                  for i in self.ifaces.values()]
        snap = snapshot(self.cfg.node.name, self.cfg.mode.value, views, ifaces, now,
                        float(now - self._started), self.reloads)
        snap["accept_mode_enforced"] = self.accept_mode_enforced
        return snap

    def set_maintenance(self, on: bool) -> None:
        now = self.now()
        for slot in self.slots.values():
            self._apply(slot, slot.router.set_maintenance(now, on))
        log.info("maintenance %s", "on" if on else "off")

    async def reload(self) -> dict[str, Any]:
        """SIGHUP: routers whose configuration did not change keep state and timers."""
        if self.config_path is None:
            return {"changed": 0}
        try:
            new_cfg = load(self.config_path)
        except ConfigError as exc:
            for line in exc.errors:
                log.error("reload refused: %s", line)
            raise
        new_slots = build_slots(new_cfg)
        now = self.now()
        kept = changed = 0
        for key, old in list(self.slots.items()):
            new = new_slots.get(key)
            if new is not None and new.router.config == old.router.config \
                    and new.vips == old.vips:
                new_slots[key] = old
                kept += 1
                continue
            self._apply(old, old.router.shutdown(now, "reload"))
            self._apply(old, old.router.release_now())  # its replacement starts afresh
            await self._drop_vmac(old)
            changed += 1
        self.cfg = new_cfg
        added = [s for k, s in new_slots.items() if self.slots.get(k) is not s]
        self.slots = new_slots
        for slot in added:
            await self._ensure_interface(slot.vlan.interface)
            await self._attach_existing(slot)
            if slot.inst.virtual_mac:
                await self._setup_vmac(slot)
        await self._remove_leftovers([s for s in added if not s.router.holding_vips])
        await self._apply_accept_mode()
        for slot in added:
            self._start_slot(slot, "reload")
        self.reloads += 1
        log.info("reloaded: %d kept, %d replaced or removed, %d started", kept, changed,
                 len(added))
        return {"kept": kept, "replaced_or_removed": changed, "started": len(added)}

    async def _attach_existing(self, slot: Slot) -> None:
        iface = self.ifaces[slot.vlan.interface]
        if iface.index is not None:
            info = await self.rtnl.link(iface.name)
            if info is not None:
                await self._attach(iface, info)

    async def _handle_request(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("command")
        if cmd == "status":
            return {"ok": True, "status": self.status()}
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
