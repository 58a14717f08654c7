"""One worker thread for blocking kernel work that releases the GIL.

A netlink batch of 1000 addresses or a round of 750 Neighbor Advertisements is kernel work
done inside a system call, with the GIL released: from a worker thread it runs on the other
core while the loop's thread handles the next takeovers. A small job runs inline while the
worker is idle (handing it over costs more than it does); otherwise every job queues behind
the worker, so jobs run in the order they were asked for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class Offload:
    def __init__(self, name: str, min_items: int) -> None:
        self.name = name
        self.min_items = min_items  # jobs of this many items or more leave the loop's thread
        self._worker: ThreadPoolExecutor | None = None  # one thread: jobs stay in order
        self._in_worker = 0
        self.offloaded = 0  # jobs run in the worker (tests and status count them)
        self.inline = 0

    def inline_ok(self, items: int) -> bool:
        """A job of `items` runs inline: it is small and the worker is idle."""
        return items < self.min_items and not self._in_worker

    async def run(self, items: int, fn: Callable[..., T], *args: object) -> T:
        """fn(*args), inline if `items` is small and the worker idle, else in the worker."""
        if self.inline_ok(items):
            self.inline += 1
            return fn(*args)
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix=self.name)
        self._in_worker += 1
        self.offloaded += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)
        finally:
            self._in_worker -= 1

    def close(self) -> None:
        """Wait for the job under way, then end the thread."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
