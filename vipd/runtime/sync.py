"""Connection-state sync in the daemon: feeds the sync core (vipd.core.sync.session) with
conntrack events and sync-link datagrams, sends what it asks, commits the peers' flows
when the node core asks (CommitFlows, before the VIPs of a takeover), and tells the node
when the bulk sync is done (until then it stays out of the elections).

At start the table is dumped into the internal cache; after an event overrun (ENOBUFS)
it is dumped again and the difference sent (new and changed flows as updates, vanished
ones as destroys).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from vipd.config import SyncConfig
from vipd.core.node import Node
from vipd.core.sync.record import RecordFilter, key_of, without_timeout
from vipd.core.sync.session import SyncSession, SyncSettings, alive_payload
from vipd.core.sync.wire import OP_DESTROY, OP_UPDATE
from vipd.core.timing import ms_to_s
from vipd.io.conntrack import CommitResult, Conntrack, Overrun
from vipd.io.hold import Hold, HoldResult
from vipd.io.sync_link import SyncLink

log = logging.getLogger("vipd.sync")
QUIET_COMMIT = 1000  # commits this large run with the event subscription suspended
COALESCE_S = 0.003


class SyncDriver:
    def __init__(self, cfg: SyncConfig, key: bytes, node: Node, *, conntrack: Conntrack,
                 link: SyncLink, now: Callable[[], Fraction], pump: Callable[[], None],
                 epoch: int | None = None, install_continuously: bool = False,
                 hold: Hold | None = None, hold_threshold: int = 10_000) -> None:
        self.cfg = cfg
        self.node = node
        self.ct = conntrack
        self.link = link
        self.now = now
        self.pump = pump
        settings = SyncSettings(alive_interval=ms_to_s(cfg.alive_interval_ms))
        self.session = SyncSession(cfg.effective_node_id, epoch or time.time_ns(), key,
                                   cfg.peers, now(), settings)
        # the sync link's own traffic is never synced
        from ipaddress import ip_network

        own = tuple(ip_network(a) for a in (cfg.local, *cfg.peers))
        self.filter = RecordFilter(cfg.protocols, cfg.ignore + own, cfg.zones)
        # per-vlan-active: both nodes carry traffic, so the peers' state goes into the
        # kernel as it arrives (either node can then carry any flow), not only at takeover
        self.install_continuously = install_continuously
        self.session.keep_applied = install_continuously
        self.installs = 0
        self._installing: asyncio.Future[None] | None = None
        # the takeover hold (vipd.io.hold), for commits long enough to matter
        self.hold = hold
        self.hold_threshold = hold_threshold
        self.last_hold: HoldResult | None = None
        self._peer_up: dict[object, bool] = {}
        self._peer_released: dict[object, frozenset[bytes]] = {}
        self.handoffs_told = 0
        self.handoffs_heard = 0
        self.ready_latched = False
        self.last_commit: CommitResult | None = None
        self.commits = 0
        self.overruns = 0
        self.send_errors = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._loop = asyncio.get_running_loop()
        self._readers: list[int] = []

    async def start(self) -> None:
        table = await self.ct.dump()
        self.session.local(self.now(), [(OP_UPDATE, r) for r in table if self.filter.keep(r)])
        self.session.pop_datagrams()  # nobody to send to yet: peers get a resync on contact
        # conntrack events are read in coalesced bursts (full datagrams, few wake-ups); the
        # sync link at once: a peer's release or a takeover is waiting on it
        if self.ct.fileno() >= 0:
            fd = self.ct.fileno()
            self._loop.add_reader(fd, self._coalesced, fd, self._on_conntrack)
            self._readers.append(fd)
        if self.link.fileno() >= 0:
            self._loop.add_reader(self.link.fileno(), self._on_link)
            self._readers.append(self.link.fileno())
        log.info("sync: node id %d, %d flows of ours, peers %s", self.session.node_id,
                 len(self.session.internal), ", ".join(str(p) for p in self.cfg.peers))
        self._after()

    def _coalesced(self, fd: int, read: Callable[[], None]) -> None:
        """A socket became readable: read it COALESCE_S later, so a burst of flows costs
        one wake-up and full datagrams per few milliseconds, not one of each per event."""
        self._loop.remove_reader(fd)

        def later() -> None:
            try:
                read()
            finally:
                if fd in self._readers:
                    self._loop.add_reader(fd, self._coalesced, fd, read)

        self._loop.call_later(COALESCE_S, later)

    def close(self) -> None:
        for fd in self._readers:
            self._loop.remove_reader(fd)
        self._readers.clear()  # a coalesced read still pending finds itself closed
        if self._timer is not None:
            self._timer.cancel()
        self.ct.close()
        self.link.close()

    # ------------------------------------------------------------ events

    def _on_conntrack(self) -> None:
        try:
            changes = self.ct.read_events(self.filter.keep_fields)
        except Overrun:
            self.overruns += 1
            log.warning("sync: conntrack events overran the socket buffer; dumping the table")
            asyncio.ensure_future(self._resync_table())
            return
        self.session.local_keyed(self.now(), changes)
        self._after()

    async def _resync_table(self) -> None:
        """After events were missed (an overrun, a quiet commit): dump the table and send
        the difference with what we had: new or changed entries, and the ones gone."""
        internal = self.session.internal
        present: set[bytes] = set()
        changes = []
        for r in await self.ct.dump():
            if not self.filter.keep(r):
                continue
            k = key_of(r)
            present.add(k)
            old = internal.get(k)
            if old is None or without_timeout(old) != without_timeout(r):
                changes.append((OP_UPDATE, k, r))
        changes += [(OP_DESTROY, k, r) for k, r in internal.items() if k not in present]
        self.session.local_keyed(self.now(), changes)
        self._after()

    def _on_link(self) -> None:
        now = self.now()
        for addr, data in self.link.recv_all():
            self.session.datagram(now, addr, data)
        self._released_by_peers(now)
        if self.session.view_changes:
            self._peer_views(now)
        if self.session.applied and self._installing is None:
            self._installing = asyncio.ensure_future(self._install())
        self._after()

    async def _install(self) -> None:
        """Put the peers' changes into the kernel as they come, in batches (one at a
        time; what arrives meanwhile goes in the next)."""
        try:
            while self.session.applied:
                batch, self.session.applied = self.session.applied, []
                latest: dict[bytes, tuple[int, bytes]] = {}
                for op, rec in batch:  # a flow changed twice in a batch: its last state
                    latest[key_of(rec)] = (op, rec)
                updates = [r for op, r in latest.values() if op == OP_UPDATE]
                gone = [r for op, r in latest.values() if op == OP_DESTROY]
                if updates:
                    await self.ct.commit(updates)
                if gone:
                    await self.ct.delete(gone)
                self.installs += len(latest)
        except Exception as exc:
            log.error("sync: installing the peers' state failed: %s", exc)
        finally:
            self._installing = None

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        now = self.now()
        self._refresh_payload()
        self.session.handle_timer(now)
        self._check_peers(now)
        self._after()

    def _refresh_payload(self) -> None:
        self.session.alive_payload = alive_payload(self.node.own_addresses(),
                                                   self.node.released())

    def tell_peers(self) -> None:
        """A master of ours went to FAULT: say so now (node action TellPeers)."""
        self._refresh_payload()
        self.session.alive_now()
        self.handoffs_told += 1
        self._send_out()  # (not _after: this runs while the daemon carries out actions)

    def set_view(self, wid: bytes, view: bytes) -> None:
        """Our view of a virtual router changed (node action ViewChanged): send it now."""
        now = self.now()
        self.session.set_view(now, wid, view)
        self.session.flush(now)
        self._send_out()

    def _peer_views(self, now: Fraction) -> None:
        changes, self.session.view_changes = self.session.view_changes, []
        for origin, wid, view in changes:
            self.node.peer_view(now, origin, wid, view)
        if changes:
            self.pump()

    def _released_by_peers(self, now: Fraction) -> None:
        """Routers a peer newly reports in FAULT: our backups following it there take
        over (at once in a pair; after Skew_Time when more backups may exist)."""
        alone = len(self.session.peers) == 1
        for p in self.session.peers.values():
            before = self._peer_released.get(p.addr, frozenset())
            if p.released == before:
                continue
            self._peer_released[p.addr] = p.released
            new = p.released - before
            if new and self.node.peer_released(now, new, p.addresses, alone):
                self.handoffs_heard += 1
                log.warning("sync: peer %s released %d virtual routers (link lost): "
                            "taking over", p.addr, len(new))
                self.pump()

    def _check_peers(self, now: Fraction) -> None:
        """A peer silent on the sync link: if its adverts stop too, its node is gone and
        our backups need not wait for the whole Master_Down_Interval (vipd.core.router
        master_node_gone). O(peers) per tick; O(routers) once per peer lost."""
        for p in self.session.peers.values():
            up = self.session.reachable(p, now)
            was = self._peer_up.get(p.addr)
            self._peer_up[p.addr] = up
            if was and not up and p.node is not None:
                # its views are stale now: a bucket it owned is not waited for (all-active)
                self.node.forget_peer_views(p.node)
            if was and not up and p.addresses:
                n = self.node.master_node_gone(now, p.addresses)
                log.warning("sync: peer %s silent on the sync link; %d backups will take "
                            "over after two missed adverts", p.addr, n)
                if n:
                    self.pump()

    def _after(self) -> None:
        """After every event: send what the session asks, follow readiness, re-arm."""
        now = self.now()
        self.session.flush(now)
        self._send_out()
        if not self.ready_latched and self.session.ready(now):
            # latched: a peer restarting later must not drain a running master
            self.ready_latched = True
            log.info("sync: bulk sync done (%d flows from peers): joining the elections",
                     self.session.external_count())
            self.node.set_sync_ready(now, True)
            self.pump()
        t = self.session.get_timer()
        if t is None:
            return
        when = float(t)
        if self._timer is not None and self._timer_at is not None and self._timer_at <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = max(when, self._loop.time())
        self._timer = self._loop.call_at(self._timer_at, self._on_timer)

    def _send_out(self) -> None:
        for to, data in self.session.pop_datagrams():
            try:
                self.link.send(to, data)  # type: ignore[arg-type]
            except OSError:
                self.send_errors += 1  # the peer's problem shows as unreachable

    # ------------------------------------------------------------ commit

    async def commit(self) -> CommitResult:
        records = list(self.session.external_records())
        held = self.hold is not None and len(records) >= self.hold_threshold
        if held:
            assert self.hold is not None
            await self.hold.start()
        # No events while we commit (the kernel would build one per entry we create, and
        # we would only skip them); what others did meanwhile is found by a dump after.
        quiet = len(records) >= QUIET_COMMIT
        if quiet:
            self.ct.suspend_events()
        try:
            res = await self.ct.commit(records)
        finally:
            if quiet:
                self.ct.resume_events()
            if held:
                assert self.hold is not None
                self.last_hold = await self.hold.release()
        self.last_commit = res
        self.commits += 1
        # These flows are ours now: tell the peers, so the one that takes them back later
        # replaces its stale entries (our commit's own events are skipped by port id, and
        # an established flow causes no further event).
        self.session.local(self.now(), [(OP_UPDATE, r) for r in records])
        self._after()
        if quiet:
            asyncio.ensure_future(self._resync_table())
        log.info("sync: committed %d peer flows in %.0f ms (%d new, %d already there, "
                 "%d failed)", len(records), res.seconds * 1000, res.created, res.existed,
                 res.failed)
        return res

    # ------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        st = self.session.status(self.now())
        st["ready"] = self.ready_latched
        st["filtered_out"] = self.filter.dropped
        st["event_overruns"] = self.overruns
        st["send_errors"] = self.send_errors
        c = self.last_commit
        st["last_commit"] = None if c is None else {
            "entries": c.created + c.existed + c.failed, "created": c.created,
            "existed": c.existed, "failed": c.failed, "duration_ms": round(c.seconds * 1000, 1),
            "errors": {str(k): v for k, v in c.errors.items()}}
        st["commits"] = self.commits
        st["handoffs_told"] = self.handoffs_told
        st["handoffs_heard"] = self.handoffs_heard
        h = self.last_hold
        st["last_hold"] = None if h is None else {
            "available": h.available, "held": h.held, "passed_over_limit": h.passed_over_limit,
            "released_after_ms": round(h.released_after_s * 1000, 1)}
        st["install_continuously"] = self.install_continuously
        st["installed"] = self.installs
        return st

    def problems(self) -> list[str]:
        now = self.now()
        out = [f"sync peer {p.addr} unreachable on the sync link"
               for p in self.session.peers.values() if not self.session.reachable(p, now)]
        if not self.ready_latched:
            out.append("sync: bulk sync not done yet (staying out of the elections)")
        return out
