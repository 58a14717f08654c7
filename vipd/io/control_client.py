"""The control socket's client side, for vipctl and tests: stdlib only, so that a
`vipctl status` does not pay for asyncio and the daemon's imports."""

from __future__ import annotations

import json
import socket

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs vipctl 3 ms
if TYPE_CHECKING:
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


# what vipctl sends for the status: the instances as a table, expanded by expand_status
STATUS_REQUEST = {"command": "status", "instances": "table"}


def expand_status(reply: dict[str, Any]) -> dict[str, Any]:
    """A status reply with its instances as a table ({"fields", "rows"}) turned into the
    status model's form (one object per instance), in place; any other reply as it is."""
    st = reply.get("status")
    if isinstance(st, dict) and isinstance(st.get("instances"), dict):
        fields, rows = st["instances"]["fields"], st["instances"]["rows"]
        st["instances"] = [dict(zip(fields, row, strict=True)) for row in rows]
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
