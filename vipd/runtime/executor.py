"""The executor: carries out the node core's actions and makes the kernel match its desired
state, then reports the outcomes back to the core as events.

Adverts go out at once. VIP changes (SetVips) of every router asked in one turn of the loop
reach the kernel as one netlink batch (vipd.io.addr_batch), in order: 1000 routers taking
over cost one round trip. A router with a virtual MAC has its macvlan brought up before
its VIPs go in, and down once they are out (a backup never sends from the virtual MAC).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from fractions import Fraction
from typing import Any

from vipd.core.node import (
    Alarm,
    AnnounceVips,
    CommitFlows,
    Key,
    Node,
    NodeAction,
    RepairVips,
    Send,
    SetVips,
    Slot,
    TellPeers,
    Transition,
    ViewChanged,
)
from vipd.core.router import State
from vipd.io.cluster import ClusterPlane
from vipd.io.offload import Offload
from vipd.runtime.links import Links
from vipd.runtime.notify import Notifier

log = logging.getLogger("vipd")

ANNOUNCE_THREAD_MIN = 32  # announcement rounds in one turn from which they leave the loop

Op = tuple[Slot | None, str]  # "add", "remove", "repair" (a router's), or "commit"


class Executor:
    def __init__(self, node: Node, links: Links, *, set_link_up: Callable[[str, bool], None],
                 now: Callable[[], Fraction], pump: Callable[[], None]) -> None:
        self.node = node
        # the sync driver's commit, once sync runs (vipd.runtime.sync)
        self.commit_flows: Callable[[], Awaitable[object]] | None = None
        self.tell_peers: Callable[[], None] | None = None
        self.set_view: Callable[[bytes, bytes], None] | None = None
        self.notifier: Notifier | None = None  # vipd.runtime.notify
        self.publish: Callable[[dict[str, Any]], None] | None = None  # `vipctl events`
        self.cluster: ClusterPlane | None = None  # all-active: bucket ownership
        self.owned: set[int] = set()  # the buckets the kernel's rules own
        self.links = links
        self.set_link_up = set_link_up
        self.now = now
        self.pump = pump
        self._queue: list[Op] = []
        self._flush: asyncio.Future[None] | None = None
        self._lock = asyncio.Lock()
        self._pending: dict[Key, asyncio.Future[None]] = {}  # the flush carrying a change
        self._in_kernel: set[asyncio.Future[None]] = set()  # batches handed over, unanswered
        self._rounds: list[tuple[Slot, str, int, str]] = []  # announcements of this turn
        self.announce_thread = Offload("vipd-announce", ANNOUNCE_THREAD_MIN)
        self._loop = asyncio.get_running_loop()

    def settling(self, key: Key) -> bool:
        """A VIP change of this router is queued or under way."""
        fut = self._pending.get(key)
        return fut is not None and not fut.done()

    async def drain(self) -> None:
        """Wait until every queued VIP change has reached the kernel."""
        while self._flush is not None or self._lock.locked() or self._in_kernel:
            if self._in_kernel:
                await asyncio.wait(list(self._in_kernel))
                continue
            fut = self._flush
            if fut is not None:
                with contextlib.suppress(Exception):
                    await fut
            else:
                async with self._lock:
                    pass

    def execute(self, act: NodeAction) -> None:
        if isinstance(act, Send):
            self._send(act)
        elif isinstance(act, SetVips):
            slot = self.node.slots.get(act.key)
            if slot is not None:
                self._queue_op(slot, "add" if act.present else "remove")
        elif isinstance(act, AnnounceVips):
            self._announce(act.key)
        elif isinstance(act, RepairVips):
            slot = self.node.slots.get(act.key)
            if slot is not None:
                self._queue_op(slot, "repair")
        elif isinstance(act, CommitFlows):
            self._queue_op(None, "commit")  # in order: before the VIPs behind it
        elif isinstance(act, TellPeers):
            if self.tell_peers is not None:
                self.tell_peers()
        elif isinstance(act, ViewChanged):
            if self.set_view is not None:
                self.set_view(act.wire_id, act.view)
        elif isinstance(act, Transition):
            self._transition(act)
        elif isinstance(act, Alarm):
            slot = self.node.slots.get(act.key)
            if slot is None:
                return
            if self.notifier is not None:
                self.notifier.alarm(slot.router.config.name, act.what)
            if self.publish is not None:
                self.publish({"event": "alarm", "router": slot.router.config.name,
                              "what": act.what, "time": time.time()})

    def _transition(self, act: Transition) -> None:
        """For `vipctl events` and the notify hooks (the router logged it already)."""
        slot = self.node.slots.get(act.key)
        if slot is None:
            return
        c = slot.router.config
        if self.publish is not None:
            self.publish({"event": "transition", "router": c.name, "vlan": slot.spec.vlan,
                          "from": act.old, "to": act.new, "cause": act.cause,
                          "priority": slot.router.priority, "time": time.time()})
        if self.notifier is not None and self.notifier.enabled:
            self.notifier.transition(c.name, slot.spec.vlan, slot.spec.interface, c.vrid,
                                     c.family, act.old, act.new, slot.router.priority,
                                     act.cause)

    # ------------------------------------------------------------ adverts

    def _send(self, act: Send) -> None:
        key = act.key
        iface = self.links.ifaces.get(key[0])
        sock = iface.sockets.get(key[2]) if iface else None
        vm = self.links.vmacs.get(key)
        if vm is not None and vm.sock is not None:
            sock = vm.sock
        ok = True
        if sock is None:
            ok = False
            log.warning("%s/vrid %d/IPv%d: cannot send: no socket", *key)
        else:
            try:
                sock.send(act.payload, act.src, act.dst)
            except OSError as exc:
                ok = False
                log.warning("%s/vrid %d/IPv%d: advert send failed: %s", *key, exc)
        if ok and not self.node.io_pending(key):
            return  # the common case, without a clock read
        self.node.advert_sent(self.now(), key, ok)

    def _announce(self, key: Key) -> None:
        """Queue one router's announcement round (sent by `flush`, at the end of the turn)."""
        iface = self.links.ifaces.get(key[0])
        slot = self.node.slots.get(key)
        if iface is None or iface.index is None or slot is None or slot.spec.bucket is not None:
            return  # (a bucket has no address of its own to announce)
        name, index, mac = iface.name, iface.index, iface.mac
        vm = self.links.vmacs.get(key)
        if vm is not None:
            name, index, mac = vm.name, vm.index, vm.mac
        self._rounds.append((slot, name, index, mac))

    def flush(self) -> None:
        """End of a turn: send the announcement rounds it asked for. A few go out at once;
        many (a mass takeover: 750 IPv6 routers' NAs are about 70 ms of kernel work) go
        from the announce thread, so the loop goes on with the next takeovers. In order
        either way (vipd.io.offload)."""
        if not self._rounds:
            return
        rounds, self._rounds = self._rounds, []
        if self.announce_thread.inline_ok(len(rounds)):
            self._send_rounds(rounds)  # at once, without a task (as before the thread)
            return
        task = asyncio.ensure_future(self.announce_thread.run(len(rounds), self._send_rounds,
                                                          rounds))
        self._in_kernel.add(task)
        task.add_done_callback(self._in_kernel.discard)

    def _send_rounds(self, rounds: list[tuple[Slot, str, int, str]]) -> None:
        """(Maybe in the announce thread.) A router that stopped being master since its
        round was asked for is skipped: its VIPs are going or gone, and its successor
        announces them."""
        announce = self.links.announcer.announce
        for slot, name, index, mac in rounds:
            r = slot.router
            if r.state is not State.MASTER:
                continue
            try:
                announce(name, index, mac, r.config.addresses)
            except OSError as exc:
                log.warning("%s: announce failed: %s", r.config.name, exc)

    def close(self) -> None:
        self.announce_thread.close()

    # ------------------------------------------------------------ VIPs

    def _queue_op(self, slot: Slot | None, op: str) -> None:
        self._queue.append((slot, op))
        if self._flush is None:
            self._flush = asyncio.ensure_future(self._run_queue())
        if slot is not None:
            self._pending[slot.key] = self._flush

    async def _run_queue(self) -> None:
        async with self._lock:  # the previous flush finishes first: order is kept
            self._flush = None
            queue, self._queue = self._queue, []
            batch: list[tuple[Slot, str, int | None]] = []
            for slot, op in queue:
                if slot is None:  # commit the peers' flows before the VIPs queued after
                    await self._run_batch(batch)
                    batch = []
                    await self._commit()
                elif op == "repair":
                    await self._run_batch(batch)
                    batch = []
                    await self._repair(slot)
                else:
                    batch.append((slot, op, self.links.vip_index(slot.key)))
            await self._run_batch(batch)
            self.pump()

    async def _commit(self) -> None:
        try:
            if self.commit_flows is not None:
                await self.commit_flows()
        except Exception as exc:  # the VIPs go up anyway: a takeover without state
            log.error("connection-state commit failed: %s", exc)  # beats none
        self.node.flows_committed()

    async def _run_batch(self, batch: list[tuple[Slot, str, int | None]]) -> None:
        """Hand a batch to the kernel without waiting for its answer: the next batch may
        be handed over while this one is in the kernel (batches reach it in order), and
        the outcomes come back to the core when it answers (`_apply`)."""
        if not batch:
            return
        ready: list[tuple[Slot, str, int | None]] = []
        for slot, op, index in batch:
            if op == "add" and not self._vmac_up(slot, True):
                self._outcome(slot, True, index, [OSError("virtual MAC link down")])
            else:
                ready.append((slot, op, index))
        owning = [(slot, op) for slot, op, _ in ready if slot.spec.bucket is not None]
        bucket_error = await self._own(owning) if owning else None
        ops = [(op == "add", index, vip) for slot, op, index in ready if index is not None
               for vip in slot.vips]
        # the task ends once the outcomes are with the core; it is held here (the loop
        # keeps only a weak reference to a task) until then
        task = asyncio.ensure_future(self._apply(ready, ops, bucket_error))
        for slot, _, _ in ready:
            self._pending[slot.key] = task
        self._in_kernel.add(task)
        task.add_done_callback(self._in_kernel.discard)

    async def _apply(self, ready: list[tuple[Slot, str, int | None]],
                     ops: list[tuple[bool, int, Any]], bucket_error: OSError | None) -> None:
        t0 = self._loop.time()
        try:
            results = iter(await self.links.rtnl.apply_addresses(ops)) if ops else iter(())
        except Exception as exc:  # the whole batch failed: every op of it failed
            failed: list[OSError | None] = [OSError(str(exc))] * len(ops)
            results = iter(failed)
        try:
            ok = 0
            for slot, op, index in ready:
                errors = [e for e in (next(results) for _ in slot.vips) if e] \
                    if index is not None else [OSError("interface missing")]
                if slot.spec.bucket is not None and bucket_error is not None:
                    errors.append(bucket_error)
                self._outcome(slot, op == "add", index, errors)
                ok += not errors
            if len(ready) > 8:
                log.info("VIPs changed for %d routers (%d addresses) in %.1f ms", ok,
                         len(ops), (self._loop.time() - t0) * 1000)
        finally:
            self.pump()

    async def _own(self, changes: list[tuple[Slot, str]]) -> OSError | None:
        """all-active: the buckets of this batch taken or given up, as one ownership
        change (one nftables transaction)."""
        want = set(self.owned)
        for slot, op in changes:
            assert slot.spec.bucket is not None
            (want.add if op == "add" else want.discard)(slot.spec.bucket)
        if self.cluster is None:
            return OSError("no all-active data plane")
        try:
            await self.cluster.own(want)
        except OSError as exc:
            return exc
        self.owned = want
        return None

    def _vmac_up(self, slot: Slot, up: bool) -> bool:
        vm = self.links.vmacs.get(slot.key)
        if vm is None:
            return True
        try:
            self.set_link_up(vm.name, up)
            return True
        except OSError as exc:
            log.warning("%s: cannot set %s %s: %s", slot.router.config.name, vm.name,
                        "up" if up else "down", exc)
            return False

    def _outcome(self, slot: Slot, add: bool, index: int | None,
                 errors: list[OSError]) -> None:
        name = slot.router.config.name
        if errors:
            log.warning("%s: VIP %s failed: %s", name, "install" if add else "removal",
                        errors[0])
        elif index is not None:
            held = self.links.kernel_addrs.setdefault(index, set())
            if add:
                held.update(v.ip for v in slot.vips)
            else:
                held.difference_update(v.ip for v in slot.vips)
                self._vmac_up(slot, False)  # a backup never sends from the virtual MAC
            log.debug("%s: VIPs %s", name, "added" if add else "removed")
        self.node.vips_applied(self.now(), slot.key, add, not errors, slot)

    async def _repair(self, slot: Slot) -> None:
        """Put back VIPs that someone removed while we are master (the kernel is the
        truth: dump the link, add what is missing)."""
        index = self.links.vip_index(slot.key)
        if index is None or self.node.slots.get(slot.key) is not slot:
            return
        try:
            held = {a.ip for a, _ in await self.links.rtnl.addresses(index)}
            self.links.kernel_addrs[index] = held
            missing = tuple(v for v in slot.vips if v.ip not in held)
            if not missing or slot.router.state.value != "MASTER":
                return
            errors = [e for e in await self.links.rtnl.apply_addresses(
                [(True, index, v) for v in missing]) if e]
        except Exception as exc:
            errors = [OSError(str(exc))]
        if errors:
            self._outcome(slot, True, index, errors)
            return
        held.update(v.ip for v in missing)
        log.warning("%s: VIP %s removed from outside while MASTER: restored",
                    slot.router.config.name, ", ".join(str(v) for v in missing))
        self.node.vips_repaired(slot.key, len(missing))
