"""A control-socket storm: many concurrent `status` requests plus idle connections.

    storm.py SOCKET [--clients 200] [--idle 100] [--seconds 5]

Prints one JSON object: replies, errors by code, connections refused, and the slowest
reply in ms. Bounded in time; every connection is closed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("socket")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--idle", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    end = time.monotonic() + args.seconds
    stats: Counter[str] = Counter()
    slowest = 0.0
    idle: list[asyncio.StreamWriter] = []
    for _ in range(args.idle):
        try:
            _r, w = await asyncio.open_unix_connection(args.socket)
            idle.append(w)
        except OSError:
            stats["connect_failed"] += 1

    async def client() -> None:
        nonlocal slowest
        while time.monotonic() < end:
            try:
                r, w = await asyncio.open_unix_connection(args.socket, limit=1 << 24)
            except OSError:
                stats["connect_failed"] += 1
                await asyncio.sleep(0.01)
                continue
            try:
                while time.monotonic() < end:
                    t0 = time.monotonic()
                    w.write(b'{"command": "status"}\n')
                    line = await asyncio.wait_for(r.readline(), 5)
                    if not line:
                        stats["closed"] += 1
                        break
                    reply = json.loads(line)
                    if reply.get("ok"):
                        stats["replies"] += 1
                        slowest = max(slowest, time.monotonic() - t0)
                    else:
                        stats[f"error_{reply['error']['code']}"] += 1
                        break
            except (TimeoutError, OSError, ValueError):
                stats["failed"] += 1
            finally:
                w.close()

    await asyncio.gather(*(client() for _ in range(args.clients)))
    for w in idle:
        w.close()
    print(json.dumps({**stats, "slowest_reply_ms": round(slowest * 1000, 1)}))


if __name__ == "__main__":
    asyncio.run(main())
