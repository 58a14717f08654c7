"""A 1 ms ICMP echo probe that measures outages as docs/benchmarks.md describes.

    probe.py TARGET [--interval-ms 1] [--duration-s 10]

Runs until the duration passes or SIGTERM/SIGINT, then waits for late replies and prints one
JSON object: requests sent and answered, every run of unanswered requests (first and last
send time on CLOCK_MONOTONIC, shared by all namespaces, and how many), the outage of the
longest run (last lost send - first lost send + one interval), the longest gap between
replies, and the probe's own longest send gap (a stalled probe is not an outage).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from typing import Any

ICMP_ECHO, ICMP_ECHOREPLY = 8, 0


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def echo(ident: int, seq: int, counter: int) -> bytes:
    payload = struct.pack("!I", counter) + b"vipd-probe".ljust(28, b".")
    head = struct.pack("!BBHHH", ICMP_ECHO, 0, 0, ident, seq & 0xFFFF)
    cks = checksum(head + payload)
    return struct.pack("!BBHHH", ICMP_ECHO, 0, cks, ident, seq & 0xFFFF) + payload


def summarize(send_times: list[float], replies: dict[int, float],
              interval: float) -> dict[str, Any]:
    lost = [k for k in range(len(send_times)) if k not in replies]
    runs: list[dict[str, Any]] = []
    for k in lost:
        if runs and runs[-1]["last"] == k - 1:
            runs[-1]["last"] = k
            runs[-1]["count"] += 1
        else:
            runs.append({"first": k, "last": k, "count": 1})
    for r in runs:
        r["first_send"] = send_times[r["first"]]
        r["last_send"] = send_times[r["last"]]
        r["outage_ms"] = round((r["last_send"] - r["first_send"] + interval) * 1000, 3)
    recv = sorted(replies.values())
    reply_gaps = [(b - a, a) for a, b in zip(recv, recv[1:], strict=False)]
    longest = max(reply_gaps, default=(0.0, 0.0))
    send_gaps = [b - a for a, b in zip(send_times, send_times[1:], strict=False)]
    worst = max(runs, key=lambda r: r["count"], default=None)
    return {
        "sent": len(send_times),
        "received": len(replies),
        "lost": len(lost),
        "loss_runs": runs,
        "outage_ms": worst["outage_ms"] if worst else 0.0,
        "outage_lost": worst["count"] if worst else 0,
        "outage_first_send": worst["first_send"] if worst else None,
        "longest_reply_gap_ms": round(longest[0] * 1000, 3),
        "longest_reply_gap_at": longest[1],
        "max_send_gap_ms": round(max(send_gaps, default=0.0) * 1000, 3),
        "interval_ms": interval * 1000,
    }


def run(target: str, interval: float, duration: float) -> dict[str, Any]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.setblocking(False)
    ident = os.getpid() & 0xFFFF
    stop = False

    def on_signal(_sig: int, _frm: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    send_times: list[float] = []
    replies: dict[int, float] = {}

    def drain() -> None:
        while True:
            try:
                data = sock.recv(2048)
            except BlockingIOError:
                return
            ihl = (data[0] & 0x0F) * 4
            if len(data) < ihl + 12:
                continue
            typ, _code, _ck, rid, _seq = struct.unpack_from("!BBHHH", data, ihl)
            if typ != ICMP_ECHOREPLY or rid != ident:
                continue
            counter = struct.unpack_from("!I", data, ihl + 8)[0]
            if counter < len(send_times) and counter not in replies:
                replies[counter] = time.monotonic()

    start = time.monotonic()
    end = start + duration
    k = 0
    while not stop:
        due = start + k * interval
        now = time.monotonic()
        if now >= end:
            break
        if now < due:
            select.select([sock], [], [], due - now)
            drain()
            continue
        with contextlib.suppress(OSError):  # no route for a moment is loss like any other
            sock.sendto(echo(ident, k, k), (target, 0))
        send_times.append(time.monotonic())
        k += 1
        # catch up without bursts: a stalled probe skips slots rather than flooding
        if time.monotonic() - (start + k * interval) > 5 * interval:
            start = time.monotonic() - k * interval
    grace = time.monotonic() + 0.3
    while time.monotonic() < grace:
        select.select([sock], [], [], 0.02)
        drain()
    sock.close()
    out = summarize(send_times, replies, interval)
    out["started"] = send_times[0] if send_times else start
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("--interval-ms", type=float, default=1.0)
    ap.add_argument("--duration-s", type=float, default=10.0)
    args = ap.parse_args(argv)
    result = run(args.target, args.interval_ms / 1000, args.duration_s)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
