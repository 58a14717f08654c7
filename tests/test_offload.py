"""vipd.io.offload: small jobs inline while the worker is idle, large ones in the worker,
and every job in the order asked for."""

from __future__ import annotations

import asyncio
import threading

from vipd.io.offload import Offload


def test_small_jobs_run_inline_large_ones_in_the_worker_in_order() -> None:
    async def main() -> None:
        off = Offload("test-offload", 4)
        done: list[tuple[str, str]] = []
        gate = threading.Event()

        def job(name: str, wait: bool = False) -> str:
            if wait:
                assert gate.wait(5)
            done.append((name, threading.current_thread().name))
            return name

        assert await off.run(1, job, "small") == "small"
        assert done[-1] == ("small", threading.current_thread().name)  # inline
        big = asyncio.ensure_future(off.run(10, job, "big", True))
        await asyncio.sleep(0.01)
        assert not off.inline_ok(1)  # the worker is busy: small jobs queue behind it
        after = asyncio.ensure_future(off.run(1, job, "small after"))
        await asyncio.sleep(0.01)
        assert [n for n, _ in done] == ["small"]  # neither ran ahead of the big one
        gate.set()
        assert await big == "big" and await after == "small after"
        assert [n for n, _ in done] == ["small", "big", "small after"]
        assert all(t.startswith("test-offload") for _, t in done[1:])
        assert (off.inline, off.offloaded) == (1, 2) and off.inline_ok(1)
        off.close()

    asyncio.run(main())
