"""Repeated log lines, rate-limited: the first of a kind goes out, the rest are counted and
summed up in the next line of that kind after the interval (a flood of bad requests must
not become a flood of log)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.interval_s, self.clock = logger, interval_s, clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log unless a line of this `key` went out within the interval; True if logged."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        n = self._suppressed.pop(key, 0)
        if n:
            msg += f" ({n} more like this suppressed)"
        self.logger.log(level, msg, *args)
        if len(self._last) > 1000:  # keys are few; never let them grow without bound
            self._last.clear()
        return True
