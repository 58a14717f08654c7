"""Notify hooks: the operator's commands run on transitions (MASTER, BACKUP, FAULT, STOP)
and alarms (two masters), as keepalived's notify scripts.

Queued in order and run one at a time by one task, never blocking the loop: a slow hook
delays the next hook, not an advert. Each runs with a timeout (then killed), no shell;
arguments: the router's name, the new state, its priority. Environment: VIPD_EVENT,
VIPD_ROUTER, VIPD_VLAN, VIPD_INTERFACE, VIPD_VRID, VIPD_FAMILY, VIPD_STATE, VIPD_OLD_STATE,
VIPD_PRIORITY, VIPD_CAUSE. Failures (exit status, timeout, cannot start) are logged and
counted; the queue is bounded (the oldest hooks are dropped and counted when it is full).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque

from vipd.config import NotifyConfig
from vipd.io.command import FAILED, OK, TIMED_OUT, run_command

log = logging.getLogger("vipd.notify")
QUEUE_MAX = 1000

STATE_EVENTS = {"MASTER": "master", "BACKUP": "backup", "FAULT": "fault", "INIT": "stop"}


class Notifier:
    def __init__(self, cfg: NotifyConfig) -> None:
        self.cfg = cfg
        self.by_event: dict[str, list[tuple[str, ...]]] = {}
        for ev, argv in cfg.commands:
            self.by_event.setdefault(ev, []).append(argv)
        self.stats: Counter[str] = Counter()
        self._queue: deque[tuple[tuple[str, ...], list[str], dict[str, str]]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.by_event)

    def transition(self, router: str, vlan: str, interface: str, vrid: int, family: int,
                   old: str, new: str, priority: int, cause: str) -> None:
        event = STATE_EVENTS.get(new)
        if event is None or event not in self.by_event:
            return
        env = {"VIPD_EVENT": event, "VIPD_ROUTER": router, "VIPD_VLAN": vlan,
               "VIPD_INTERFACE": interface, "VIPD_VRID": str(vrid),
               "VIPD_FAMILY": f"IPv{family}", "VIPD_STATE": new, "VIPD_OLD_STATE": old,
               "VIPD_PRIORITY": str(priority), "VIPD_CAUSE": cause}
        self._enqueue(event, [router, new, str(priority)], env)

    def alarm(self, router: str, what: str) -> None:
        if "alarm" in self.by_event:
            self._enqueue("alarm", [router, what, "0"],
                          {"VIPD_EVENT": "alarm", "VIPD_ROUTER": router, "VIPD_CAUSE": what})

    def _enqueue(self, event: str, args: list[str], env: dict[str, str]) -> None:
        for argv in self.by_event[event]:
            if len(self._queue) >= QUEUE_MAX:
                self._queue.popleft()
                self.stats["dropped"] += 1
            self._queue.append((argv, args, env))
            self.stats["queued"] += 1
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        self._wake.set()

    async def _run(self) -> None:
        while self._queue:
            argv, args, env = self._queue.popleft()
            await self._one(argv, args, env)

    async def _one(self, argv: tuple[str, ...], args: list[str], env: dict[str, str]) -> None:
        event = env.get("VIPD_EVENT")
        got = await run_command((*argv, *args), self.cfg.timeout_ms / 1000, env)
        if got.status == OK:
            self.stats["ran"] += 1
            return
        self.stats["timed_out" if got.status == TIMED_OUT else "failed"] += 1
        how = f"exited {got.returncode}" if got.status == FAILED else got.status.replace("_", " ")
        log.warning("notify %s: %s %s: %s", event, argv[0], how, got.detail)

    async def drain(self) -> None:
        """Wait for the queued hooks (at a clean stop: STOP hooks run before exit)."""
        if self._task is not None:
            bound = self.cfg.timeout_ms / 1000 * (len(self._queue) + 1) + 1
            await asyncio.wait_for(asyncio.shield(self._task), bound)
