"""Track scripts and files: one task per tracker, feeding its state to the node core
(vipd.core.track explains what a state does to the routers that follow it).

A script runs every `interval`, never overlapping itself, bounded by `timeout` (then its
process group is killed: a failure), as its configured user; its exit status goes through
rise/fall. A file is read every `interval`: a whole number (blank: 0); unreadable or not a
number counts as failing, with the number 0. Interface trackers need no task: the node
follows them from the link monitor. Nothing here blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from vipd.core.node import Node
from vipd.core.track import RiseFall, TrackerSpec, TrackState
from vipd.io.command import OK, TIMED_OUT, run_command

log = logging.getLogger("vipd.track")

MAX_FILE_BYTES = 64


@dataclass
class Result:
    """What the operator sees of one tracker: its last result and counts."""

    runs: int = 0
    failures: int = 0
    timeouts: int = 0
    last: str = ""  # "ok", "exit 1", "timed_out", "cannot_start: ...", "value 3", ...


def read_number(path: str) -> tuple[bool, int, str]:
    """A track file's number: (readable, value, what was read or why not)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        return False, 0, exc.strerror or str(exc)
    text = raw.decode(errors="replace").strip()
    if len(raw) > MAX_FILE_BYTES:
        return False, 0, "longer than a number"
    if not text:
        return True, 0, "value 0 (empty)"
    try:
        return True, int(text), f"value {int(text)}"
    except ValueError:
        return False, 0, f"not a number: {text[:20]!r}"


class TrackRunner:
    def __init__(self, node: Node, now: Callable[[], Fraction], pump: Callable[[], None],
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        self.node, self.now, self.pump, self.sleep = node, now, pump, sleep
        self.specs: dict[str, TrackerSpec] = {}
        self.results: dict[str, Result] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def apply(self, trackers: Iterable[TrackerSpec]) -> None:
        """Run these trackers (at start, and after a reload: unchanged ones keep running
        with their rise/fall state; changed and new ones start afresh)."""
        wanted = {t.name: t for t in trackers if t.kind in ("script", "file")}
        for name in list(self._tasks):
            if wanted.get(name) != self.specs.get(name):
                self._tasks.pop(name).cancel()
                self.results.pop(name, None)
        self.specs = wanted
        for name, spec in wanted.items():
            if name not in self._tasks:
                self.results[name] = Result()
                run = self._script(spec) if spec.kind == "script" else self._file(spec)
                self._tasks[name] = asyncio.ensure_future(run)

    def close(self) -> None:
        for t in self._tasks.values():
            t.cancel()
        self._tasks.clear()

    def _set(self, name: str, state: TrackState) -> None:
        self.node.set_track(self.now(), name, state)
        self.pump()

    async def _script(self, spec: TrackerSpec) -> None:
        rf = RiseFall(spec.rise, spec.fall)
        res = self.results[spec.name]
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            got = await run_command(spec.argv, spec.timeout_ms / 1000, user=spec.user,
                                    env={"VIPD_TRACKER": spec.name})
            res.runs += 1
            passed = got.status == OK
            if not passed:
                res.failures += 1
                res.timeouts += got.status == TIMED_OUT
            res.last = "ok" if passed else (f"exit {got.returncode}" if got.returncode
                                             else f"{got.status} {got.detail}".strip())
            changed = rf.feed(passed)
            if changed:
                log.warning("track %s: now %s (%s)", spec.name,
                            "passing" if rf.ok else "FAILING", res.last)
            if changed or res.runs == 1:
                self._set(spec.name, TrackState(ok=rf.ok))
            await self.sleep(max(0.0, spec.interval_ms / 1000 - (loop.time() - began)))

    async def _file(self, spec: TrackerSpec) -> None:
        res = self.results[spec.name]
        while True:
            ok, value, what = read_number(spec.path)
            res.runs += 1
            res.failures += not ok
            if what != res.last:
                log.info("track %s: %s: %s", spec.name, spec.path, what)
            res.last = what
            self._set(spec.name, TrackState(ok=ok, value=value))
            await self.sleep(spec.interval_ms / 1000)

    def status(self) -> list[dict[str, Any]]:
        """Every tracker of the node with its state, for `vipctl status`."""
        out = []
        for name, spec in sorted(self.node.trackers.items()):
            st = self.node.track_states.get(name)
            res = self.results.get(name)
            target = {"interface": spec.interface, "script": " ".join(spec.argv),
                      "file": spec.path}[spec.kind]
            item: dict[str, Any] = {
                "name": name, "kind": spec.kind, "target": target, "weight": spec.weight,
                "ok": None if st is None else st.ok,
                "value": None if st is None or spec.kind != "file" else st.value,
                "followers": self.node.follower_count(name)}
            if res is not None:
                item.update(runs=res.runs, failures=res.failures, timeouts=res.timeouts,
                            last=res.last)
            out.append(item)
        return out

    async def drain(self) -> None:
        """Stop every task and wait for them (their scripts are killed)."""
        tasks = list(self._tasks.values())
        self.close()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
