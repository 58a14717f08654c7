"""A minimal HTTP endpoint for Prometheus scrapes: `GET /metrics` answers the exposition
that `render()` returns (vipd.metrics); anything else gets 404. One request per connection,
headers bounded (8 KiB) and timed (5 s), at most 16 connections at once: a scraper cannot
hold the daemon's loop or its memory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger("vipd.metrics")

MAX_HEADER = 8192
TIMEOUT_S = 5.0
MAX_CONNECTIONS = 16
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def parse_listen(text: str) -> tuple[str, int]:
    """"127.0.0.1:9765", "[::1]:9765" or ":9765" (every address)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(text)
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host, int(port)


class MetricsServer:
    def __init__(self, listen: str, render: Callable[[], str]) -> None:
        self.host, self.port = parse_listen(listen)
        self.render = render
        self._server: asyncio.base_events.Server | None = None
        self._active = 0
        self.scrapes = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host or None, self.port)
        log.info("metrics on http://%s:%d/metrics", self.host or "*", self.port)

    @property
    def bound_port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        self._active += 1
        try:
            if self._active > MAX_CONNECTIONS:
                return
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT_S)
            if len(head) > MAX_HEADER:
                return
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == \
                    b"/metrics":
                body = self.render().encode()
                self.scrapes += 1
                status, ctype = "200 OK", CONTENT_TYPE
            else:
                body, status, ctype = b"not found\n", "404 Not Found", "text/plain"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: "
                         f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await asyncio.wait_for(writer.drain(), TIMEOUT_S)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError):
            pass
        finally:
            self._active -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
