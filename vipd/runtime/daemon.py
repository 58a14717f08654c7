"""The daemon's loop: one asyncio loop feeding the node core (vipd.core.node) its events and
handing its actions to the executor (vipd.runtime.executor). Link watching lives in
vipd.runtime.links, the control commands in vipd.runtime.commands.

After every event the node's actions are carried out (`pump`) and its one timer is
re-armed. Time is the loop's monotonic clock, converted to an exact Fraction once, in
`now()`. Nothing is touched before the instance lock is held (vipd.io.lock); long-lived
tasks are supervised: one that dies is restarted and keeps status degraded until back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable
from fractions import Fraction
from math import ceil
from typing import Any

from vipd.config import (
    Config,
    ConfigError,
    IPInterface,
    SyncConfig,
    election_vlan,
    load,
    load_sync_key,
    router_specs,
)
from vipd.core.node import Key, Node, Slot
from vipd.core.track import MAX_DEMOTION, NODE, demoted
from vipd.io.announce import Announcer
from vipd.io.cluster import ClusterPlane, ClusterVlan
from vipd.io.conntrack import Conntrack
from vipd.io.control import ControlServer
from vipd.io.hold import Hold
from vipd.io.lock import InstanceLock
from vipd.io.nft import AcceptGuard, NftAcceptGuard
from vipd.io.rtnl import Rtnl
from vipd.io.sync_link import SyncLink
from vipd.io.systemd import Notifier as SystemdNotifier
from vipd.io.vmac import ProcSysctl, Sysctl
from vipd.io.vmac import set_link_up as vmac_link_up
from vipd.io.vrrp_socket import VrrpTransport
from vipd.runtime.commands import Commands
from vipd.runtime.executor import Executor
from vipd.runtime.links import LINK_MONITOR, Interface, Links, SocketFactory
from vipd.runtime.notify import Notifier
from vipd.runtime.sync import SyncDriver
from vipd.runtime.track import TrackRunner

log = logging.getLogger("vipd")

PRECISE_LEAD_S = 0.0015
RX_COALESCE_S = 0.002
RX_TICKS_PER_S = 10_000  # reception times are kept to 100 us


def _send_socket(name: str, index: int, family: int) -> VrrpTransport:
    from vipd.io.vrrp_socket import VrrpSocket

    return VrrpSocket(name, index, family, send_only=True)


class Daemon:
    def __init__(self, cfg: Config, *, rtnl: Rtnl, open_socket: SocketFactory,
                 announcer: Announcer, control_socket: str | None = None,
                 config_path: str | None = None,
                 clock: Callable[[], float] | None = None,
                 sysctl: Sysctl | None = None,
                 open_send_socket: SocketFactory | None = None,
                 set_link_up: Callable[[str, bool], None] = vmac_link_up,
                 accept_guard: AcceptGuard | None = None,
                 lock: InstanceLock | None = None,
                 sync_adapters: Callable[[], tuple[Conntrack, SyncLink]] | None = None,
                 hold: Hold | None = None,
                 cluster: ClusterPlane | None = None,
                 systemd: SystemdNotifier | None = None) -> None:
        self.cfg = cfg
        self.cluster = cluster  # all-active data plane (None: the real one if needed)
        self.systemd = systemd or SystemdNotifier()
        self.metrics: Any = None  # vipd.io.metrics_http.MetricsServer when configured
        self._lags: deque[tuple[float, float]] = deque()
        self.cluster_vips: list[tuple[str, IPInterface]] = []  # (interface, VIP) we added
        self.cluster_counters: dict[str, int] = {}  # read once a second (status)
        self.sync_adapters = sync_adapters  # None: the real ones, if cfg.sync says so
        self.hold = hold
        self.sync: SyncDriver | None = None
        self.config_path = config_path
        self.rtnl = rtnl
        self.accept_guard = accept_guard or NftAcceptGuard()
        self.accept_mode_enforced = True
        self.control_path = control_socket or cfg.node.control_socket
        self.lock = lock or InstanceLock(self.control_path)
        self._locked = False  # nothing is touched, nor cleaned up, without the lock
        self.tasks_down: dict[str, str] = {}  # supervised task -> why it is down
        self.task_restarts: Counter[str] = Counter()
        self.reloads = 0
        self._loop = asyncio.get_running_loop()
        # The loop's monotonic clock, unless a test drives time itself.
        self._clock = clock or self._loop.time
        self._started = self.now()
        self._done = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.node = Node(router_specs(cfg), cfg.mode.value,
                         commit_before_vips=cfg.sync is not None,
                         watch=_watched_interfaces(cfg), trackers=cfg.trackers)
        self.tracks = TrackRunner(self.node, self.now, self.pump)
        self.links = Links(self.node, rtnl=rtnl, open_socket=open_socket,
                           open_send_socket=open_send_socket or _send_socket,
                           announcer=announcer, sysctl=sysctl or ProcSysctl(), now=self.now,
                           pump=self.pump, on_readable=self._on_wakeup,
                           tasks_down=self.tasks_down)
        self.executor = Executor(self.node, self.links, set_link_up=set_link_up, now=self.now,
                                 pump=self.pump)
        self.notifier = Notifier(cfg.notify)
        self.executor.notifier = self.notifier
        self.commands = Commands(self)
        self._control: ControlServer | None = None

    def now(self) -> Fraction:
        return Fraction(self._clock())

    @property
    def slots(self) -> dict[Key, Slot]:
        return self.node.slots

    @property
    def stopping(self) -> bool:
        return self.node.stopping

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
        for name in self.node.interfaces():
            await self.links.ensure_interface(name)
        for slot in self.node.slots.values():
            if slot.spec.virtual_mac and slot.key not in self.links.vmacs:
                await self.links.setup_vmac(slot)  # at start, failing to make one is fatal
        await self.links.remove_leftovers(self.node.slots.values())
        if self.cfg.cluster is not None:
            await self._start_cluster()
        await self.apply_accept_mode()
        if self.cfg.sync is not None:
            await self._start_sync(self.cfg.sync)
        self._control = ControlServer(self.control_path, self.commands.handle,
                                      self.cfg.node.control_socket_mode)
        await self._control.start()
        self.executor.publish = self._control.publish
        if self.cfg.node.metrics:
            from vipd import __version__
            from vipd.io.metrics_http import MetricsServer
            from vipd.metrics import exposition

            self.metrics = MetricsServer(self.cfg.node.metrics, lambda: exposition(
                self.status(), self.loop_lag_s(), __version__))
            await self.metrics.start()
            self._tasks.append(asyncio.ensure_future(self._measure_lag()))
        self._tasks.append(self._supervise(LINK_MONITOR,
                                           lambda: self.rtnl.watch(self.links.on_event)))
        for iface in self.links.ifaces.values():
            self.node.set_link(self.now(), iface.name, iface.up)
        self._load_demotions()
        self.node.start(self.now())
        self.links.running = True
        self.pump()
        self.tracks.apply(self.cfg.trackers)
        log.info("vipd %s: %d virtual routers on %d interfaces, mode %s", self.cfg.node.name,
                 len(self.node.slots), len(self.links.ifaces), self.cfg.mode.value)
        self.systemd.ready(self._summary())
        if self.systemd.watchdog_s is not None:
            self._tasks.append(asyncio.ensure_future(self._watchdog(self.systemd.watchdog_s)))

    async def _start_cluster(self) -> None:
        """all-active: every member holds every VLAN's VIPs; the data plane takes frames
        for the VLANs' multicast MACs and keeps the buckets this node owns."""
        cl = self.cfg.cluster
        assert cl is not None
        if self.cluster is None:
            from vipd.io.cluster import LinuxClusterPlane

            self.cluster = LinuxClusterPlane(cl.queue, cl.buckets, cl.seed)
        vlans = [ClusterVlan(v.interface, v.multicast_mac, tuple(str(x.ip) for x in v.vips),
                             self.links.ifaces[v.interface].mac or "")
                 for v in self.cfg.vlans]
        await self.cluster.start(vlans, cl.buckets)
        self.executor.cluster = self.cluster
        ops: list[tuple[bool, int, IPInterface]] = []
        for v in self.cfg.vlans:
            index = self.links.ifaces[v.interface].index
            if index is None:
                raise OSError(f"{v.interface}: no such interface")
            for vip in v.vips:
                ops.append((True, index, vip))
                self.cluster_vips.append((v.interface, vip))
        errors = [e for e in await self.rtnl.apply_addresses(ops) if e]
        if errors:
            raise OSError(f"cannot add the cluster VIPs: {errors[0]}")
        self._tasks.append(self._supervise("cluster counters", self._poll_counters))
        log.info("all-active: %d buckets, VIPs %s on every member", cl.buckets,
                 ", ".join(str(v) for _, v in self.cluster_vips))

    async def _poll_counters(self) -> None:
        assert self.cluster is not None  # started by _start_cluster
        while True:
            self.cluster_counters = await self.cluster.counters()
            await asyncio.sleep(1.0)

    async def _stop_cluster(self) -> None:
        if self.cluster is None:
            return
        ops = [(False, index, vip) for i, vip in self.cluster_vips
               if i in self.links.ifaces and (index := self.links.ifaces[i].index) is not None]
        with contextlib.suppress(Exception):
            await self.rtnl.apply_addresses(ops)
        self.cluster_vips = []
        with contextlib.suppress(Exception):
            await self.cluster.stop()

    async def _start_sync(self, cfg: SyncConfig) -> None:
        key = load_sync_key(cfg.key_file)
        hold = self.hold
        if self.sync_adapters is not None:
            ct, link = self.sync_adapters()
        else:
            from vipd.io.conntrack import NetlinkConntrack
            from vipd.io.hold import NfqueueHold
            from vipd.io.sync_link import UdpSyncLink

            ct, link = NetlinkConntrack(), UdpSyncLink(cfg.interface, cfg.local, cfg.port)
            if hold is None:
                nfq = NfqueueHold(cfg.interface)
                if nfq.unavailable:
                    log.warning("takeover hold unavailable: %s", nfq.unavailable)
                else:
                    nfq.remove_leftovers()
                    hold = nfq
        self.sync = SyncDriver(cfg, key, self.node, conntrack=ct, link=link, now=self.now,
                               pump=self.pump, hold=hold,
                               install_continuously=self.cfg.mode.value in (
                                   "per-vlan-active", "all-active"))
        self.executor.commit_flows = self.sync.commit
        self.executor.tell_peers = self.sync.tell_peers
        self.executor.set_view = self.sync.set_view
        self.node.on_vlan_silent = cfg.on_vlan_silent
        await self.sync.start()

    async def _measure_lag(self) -> None:
        """How late the loop runs a 100 ms tick; the worst of the last minute is kept."""
        while True:
            t = self._loop.time()
            await asyncio.sleep(0.1)
            now = self._loop.time()
            self._lags.append((now, max(0.0, now - t - 0.1)))
            while self._lags and self._lags[0][0] < now - 60:
                self._lags.popleft()

    def loop_lag_s(self) -> float | None:
        return max((lag for _, lag in self._lags), default=None)

    async def _watchdog(self, every_s: float) -> None:
        """systemd's watchdog, pinged from the loop itself: a loop that stops turning stops
        the pings (WatchdogSec= in the unit)."""
        while True:
            self.systemd.watchdog()
            await asyncio.sleep(every_s)

    async def run_until_stopped(self) -> None:
        await self._done.wait()

    def request_stop(self) -> None:
        if self.node.stopping:
            return
        log.info("stopping: releasing mastership")
        self.systemd.stopping()
        self.links.stopping = True
        self.node.shutdown(self.now())
        self.pump()
        asyncio.ensure_future(self._finish_stop())

    async def _finish_stop(self) -> None:
        # Keep the loop (and receive path) alive until every released master has handed
        # its VIPs to a successor or given up waiting: the core bounds that time.
        while self.node.holding_vips:
            await asyncio.sleep(0.005)
        await self.executor.drain()
        with contextlib.suppress(Exception):
            await self.notifier.drain()  # the STOP hooks run before vipd exits
        await self.close()
        self._done.set()

    async def apply_accept_mode(self) -> None:
        """RFC 9568 Accept_Mode False: a non-owner master drops traffic to its VIPs."""
        self.accept_mode_enforced = await self.accept_guard.apply(self.node.denied_vips())

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await self.tracks.drain()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._locked:  # refused to start: what is out there belongs to another vipd
            await self.rtnl.close()
            return
        with contextlib.suppress(Exception):
            await self.accept_guard.remove()
        await self.executor.drain()
        self.executor.close()
        await self._stop_cluster()
        if self.sync is not None:
            self.sync.close()
        await self.links.close()
        if self._control:
            await self._control.stop()
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                await self.metrics.stop()
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

    # ------------------------------------------------------------ the node's actions

    def pump(self) -> None:
        """Carry out what the node asked for, then re-arm its timer. Outcomes the executor
        reports while this runs land in the same queue and are carried out here too."""
        execute = self.executor.execute
        for act in self.node.pop_actions():
            execute(act)
        self.executor.flush()
        self._arm()

    def _arm(self) -> None:
        """One loop timer for the whole node, at its next deadline. A deadline that moves
        later keeps the armed timer, which re-arms when it comes."""
        head = self.node.next_timer()
        if head is None:
            return
        when = float(head[0])
        if head[1]:
            # asyncio's epoll wait rounds up to whole milliseconds: a takeover would start
            # up to 1 ms late. Wake a little early and sleep the rest precisely.
            when -= PRECISE_LEAD_S
        if self._timer is not None and self._timer_at is not None and self._timer_at <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self.on_timer)

    def on_timer(self) -> None:
        """The node's timer came due (tests call this after moving their clock)."""
        self._timer = self._timer_at = None
        head = self.node.next_timer()
        if head is not None:
            early = float(head[0]) - self._clock()
            if early > 2 * PRECISE_LEAD_S:
                self._arm()  # woken for a deadline that has since moved later
                return
            if early > 0 and head[1]:
                # Armed PRECISE_LEAD_S early (see _arm); finish the wait exactly. Only the
                # rare takeover pays this short blocking sleep, never the periodic adverts.
                time.sleep(early)
        # An advert may wait in a deferred read (_on_wakeup): hear it before any timer
        # runs, since whatever is due now may include a takeover behind the first bucket.
        for iface in list(self.links.ifaces.values()):
            for family in list(iface.deferred):
                self._read_deferred(iface, family)
        self.node.handle_timer(self.now())
        self.pump()

    # ------------------------------------------------------------ receiving

    def _on_wakeup(self, iface: Interface, family: int) -> None:
        """A socket became readable: read it RX_COALESCE_S later, so a burst (a peer's
        1000 routers advertise in one instant) costs one wake-up, not hundreds. Adverts
        are dated by the kernel (SO_TIMESTAMPNS), so the delay moves no timer, and a
        takeover falling due meanwhile reads the socket first (on_timer)."""
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
            self.read(iface.name, family)
        finally:
            if iface.sockets.get(family) is sock and sock.fileno() >= 0:
                self._loop.add_reader(sock.fileno(), self._on_wakeup, iface, family)

    def read(self, ifname: str, family: int) -> None:
        """Read what the interface's socket holds for the family and feed it to the node
        (tests call this after queueing packets on a fake socket)."""
        iface = self.links.ifaces.get(ifname)
        sock = iface.sockets.get(family) if iface else None
        if sock is None:
            return
        # Reception times of the loop clock, rounded up to RX_TICK (never earlier than
        # the packet came, so no timer runs early): a burst of adverts then shares a few
        # Fractions (one made from two ints costs about a microsecond; from a float, 4).
        now_tick = self._clock() * RX_TICKS_PER_S
        packets = []
        last_tick, at = -1, Fraction(0)
        for payload, meta, age_s in sock.recv_all():
            tick = ceil(now_tick - age_s * RX_TICKS_PER_S)
            if tick != last_tick:
                last_tick, at = tick, Fraction(tick, RX_TICKS_PER_S)
            packets.append((payload, meta, at))
        self.node.receive(ifname, family, packets)
        self.pump()

    # ------------------------------------------------------------ commands

    def status(self) -> dict[str, Any]:
        return self.commands.status()

    def set_maintenance(self, on: bool) -> None:
        self.node.set_maintenance(self.now(), on)
        self.pump()
        log.info("maintenance %s", "on" if on else "off")

    # ------------------------------------------------------------ demotion

    @property
    def demote_path(self) -> str:
        """Where the demotion counters are kept: beside the control socket (a runtime
        directory), so they outlive a restart of vipd but not a reboot, as carpdemote."""
        return self.control_path + ".demote"

    def demote(self, target: str, change: str) -> int:
        """`vipctl demote TARGET +N|-N|0`. Raises ValueError for an unknown target or a
        malformed change."""
        groups = {g.name for g in self.cfg.groups}
        if target != NODE and target not in groups:
            known = ", ".join([NODE, *sorted(groups)])
            raise ValueError(f"{target!r} is not a group of this node (known: {known})")
        count = demoted(self.node.demotions.get(target, 0), change)
        self.node.set_demotion(self.now(), target, count)
        self.pump()
        log.info("demotion of %s: %d", target, count)
        tmp = self.demote_path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.node.demotions, f)
            os.replace(tmp, self.demote_path)
        except OSError as exc:
            log.warning("cannot keep the demotion in %s: %s", self.demote_path, exc)
        return count

    def _load_demotions(self) -> None:
        try:
            with open(self.demote_path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return
        if not isinstance(saved, dict):
            return
        for target, count in saved.items():
            if isinstance(target, str) and isinstance(count, int) and 0 < count <= MAX_DEMOTION:
                self.node.set_demotion(self.now(), target, count)
                log.warning("demotion of %s: %d (kept from before the restart; "
                            "`vipctl demote %s 0` clears it)", target, count, target)

    async def reload(self) -> dict[str, Any]:
        """SIGHUP: all or nothing. Everything that can fail (parsing, claiming interfaces,
        creating macvlans) is done before any running router is touched; if any of it fails
        the reload is refused and the old configuration keeps running untouched. Routers
        whose configuration did not change keep their state and timers."""
        if self.config_path is None:
            return {"changed": 0}
        try:
            new_cfg = await self._loop.run_in_executor(None, load, self.config_path)
            if new_cfg.sync != self.cfg.sync:
                raise ConfigError(["sync: changes to the sync section need a restart"])
            plan = self.node.plan_reload(router_specs(new_cfg), new_cfg.mode.value,
                                         new_cfg.trackers)
            made = await self._prepare_reload(new_cfg, plan.added())
        except ConfigError as exc:
            for line in exc.errors:
                log.error("reload refused, the running configuration stays: %s", line)
            raise
        # Commit. Nothing below refuses: a router that cannot run is reported by its core.
        replaced = self.node.retire(self.now(), plan)
        self.pump()
        await self.executor.drain()  # their VIPs leave the links they know first
        for old in replaced:
            new = plan.slots.get(old.key)
            if new is None or not new.spec.virtual_mac:
                await self.links.drop_vmac(old.key)  # else: same name and MAC, kept
        self.cfg = new_cfg
        self.node.adopt(self.now(), plan)
        self.lock.release_interfaces(v.interface for v in new_cfg.vlans)
        added = plan.added()
        for slot in added:
            iface = await self.links.ensure_interface(slot.spec.interface)
            if iface.index is not None:
                info = await self.rtnl.link(iface.name)
                if info is not None:
                    await self.links.attach(iface, info)
            if slot.key in self.links.vmacs:
                slot.vmac_ready = True
        for name in self.node.interfaces():  # tracked interfaces new in this configuration
            await self.links.ensure_interface(name)
        self.links.drop_unused()
        await self.links.remove_leftovers([s for s in added if not s.router.holding_vips])
        await self.apply_accept_mode()
        now = self.now()
        for iface in self.links.ifaces.values():
            self.node.set_link(now, iface.name, iface.up)
        self.node.start(now, [s.key for s in added], "reload")
        self.pump()
        self.tracks.apply(new_cfg.trackers)
        self.reloads += 1
        kept = len(plan.kept)
        log.info("reloaded: %d kept, %d replaced or removed, %d started (%d macvlans made)",
                 kept, len(replaced), len(added), made)
        self.systemd.status(f"{self._summary()}; reloaded ({kept} kept)")
        return {"kept": kept, "replaced_or_removed": len(replaced), "started": len(added)}

    def _summary(self) -> str:
        """systemd's STATUS= line."""
        return f"{len(self.node.slots)} virtual routers, mode {self.cfg.mode.value}"

    async def _prepare_reload(self, new_cfg: Config, added: list[Slot]) -> int:
        """The fallible part of a reload; on failure undo it and raise ConfigError."""
        try:
            self.lock.claim_interfaces(v.interface for v in new_cfg.vlans)
        except OSError as exc:
            raise ConfigError([str(exc)]) from exc
        made: list[Slot] = []
        new_ifaces = [v.interface for v in new_cfg.vlans if v.interface not in self.links.ifaces]
        try:
            for slot in added:
                if not slot.spec.virtual_mac or slot.key in self.links.vmacs:
                    continue
                iface = await self.links.ensure_interface(slot.spec.interface)
                if iface.index is not None:
                    await self.links.setup_vmac(slot)
                    made.append(slot)
        except OSError as exc:
            for slot in made:
                await self.links.drop_vmac(slot.key)
            for name in new_ifaces:
                if name in self.links.ifaces:
                    self.links.close_sockets(self.links.ifaces.pop(name))
            self.lock.release_interfaces(v.interface for v in self.cfg.vlans)
            raise ConfigError([f"{exc}"]) from exc
        return len(made)


def _watched_interfaces(cfg: Config) -> list[str]:
    """all-active: the VLANs other than the election VLAN (their loss drains every bucket)."""
    if cfg.cluster is None:
        return []
    ev = election_vlan(cfg).interface
    return [v.interface for v in cfg.vlans if v.interface != ev]
