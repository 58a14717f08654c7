"""The control socket's client side, for vipctl and tests: stdlib only, so that a
`vipctl status` does not pay for asyncio and the daemon's imports."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any


def request(path: str, req: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request, return the reply (blocking)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        chunks = []
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            if chunk.endswith(b"\n"):
                break
    reply: dict[str, Any] = json.loads(b"".join(chunks))
    return reply


def stream(path: str, req: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Send one request and yield every JSON line the daemon writes until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                yield dict(json.loads(line))
