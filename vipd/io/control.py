"""The control socket: a Unix stream socket, newline-delimited JSON requests and replies.

A request is {"command": NAME, ...}; a reply is {"ok": true, ...} or
{"ok": false, "error": {"code": CODE, "message": TEXT}}. A bad request gets an error reply,
never a crash; a client may send several requests on one connection.

Bounded, so a storm of clients cannot take the daemon's time or descriptors: at most
MAX_CLIENTS connections; when a new one comes while all are taken, the connection idle for
longest (and for at least MIN_IDLE_EVICT_S) is closed to make room, so idle connections can
never lock the operator out; otherwise the newcomer gets a "busy" error. An idle
connection is closed after IDLE_TIMEOUT_S, a client that does not read its reply is dropped,
requests are at most 64 KiB and any nesting depth is answered with an error; repeated
failures are logged once per ten seconds.

The caller holds the instance lock (vipd.io.lock) before `start`, so a socket found at the
path is a stale one from a crash and is replaced; anything else there (a regular file, a
symlink, a directory) is never deleted or followed: start refuses. `stop` removes the socket
only if it is still the one we made.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any

from vipd.io.lock import ensure_dir
from vipd.ratelimit import RateLimitedLog

log = logging.getLogger("vipd.control")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_REQUEST = 64 * 1024
MAX_CLIENTS = 256  # well under the default 1024 descriptors; all are served in turn
IDLE_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 5.0
MIN_IDLE_EVICT_S = 0.5
EVENTS_QUEUE = 1000


class ControlServer:
    def __init__(self, path: str, handler: Handler, mode: int = 0o600,
                 max_clients: int = MAX_CLIENTS, idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self.path, self.handler, self.mode = path, handler, mode
        self.max_clients, self.idle_timeout_s = max_clients, idle_timeout_s
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        # open connections, in the order they last went idle: writer -> since when it has
        # waited for a request (loop time), or None while one is being answered
        self._clients: dict[asyncio.StreamWriter, float | None] = {}
        self.stats: dict[str, int] = {"connections": 0, "refused_busy": 0, "idle_closed": 0,
                                      "idle_evicted": 0, "bad_requests": 0,
                                      "internal_errors": 0}
        self._log = RateLimitedLog(log)
        self._encoded: tuple[dict[str, Any], bytes] | None = None
        # `events` subscribers: one bounded queue each (the oldest event is dropped and
        # counted when a slow reader lets it fill)
        self._subscribers: set[asyncio.Queue[bytes]] = set()
        self.stats["events_dropped"] = 0

    def publish(self, event: dict[str, Any]) -> None:
        """Send an event (a transition) to every `events` subscriber. O(subscribers)."""
        if not self._subscribers:
            return
        line = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        for q in self._subscribers:
            if q.full():
                q.get_nowait()
                self.stats["events_dropped"] += 1
            q.put_nowait(line)

    async def _stream_events(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        """Keep the connection for the events: a JSON line per event until the client
        closes it (noticed at once: a gone subscriber must not hold a connection slot)."""
        q: asyncio.Queue[bytes] = asyncio.Queue(maxsize=EVENTS_QUEUE)
        self._subscribers.add(q)
        gone = asyncio.ensure_future(reader.read())  # returns at end of file
        try:
            writer.write(b'{"ok":true,"events":"following"}\n')
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
            while True:
                nxt = asyncio.ensure_future(q.get())
                done, _ = await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    nxt.cancel()
                    return
                writer.write(nxt.result())
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
        finally:
            gone.cancel()
            self._subscribers.discard(q)

    async def start(self) -> None:
        ensure_dir(os.path.dirname(self.path))
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(errno.EEXIST, f"{self.path} exists and is not a socket: "
                              "refusing to replace it")
            os.unlink(self.path)  # a stale socket from a crash (we hold the instance lock)
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=self.path,
                                                           limit=MAX_REQUEST)
        finally:
            os.umask(old)
        os.chmod(self.path, self.mode, follow_symlinks=False)
        st = os.lstat(self.path)
        self._inode = (st.st_dev, st.st_ino)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)
            self._server = None
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        self._inode = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats["connections"] += 1
        if len(self._clients) >= self.max_clients and not self._evict_idle():
            self.stats["refused_busy"] += 1
            self._log.log(logging.WARNING, "busy", "control socket: %d requests under way "
                          "at once; refusing the extra ones", self.max_clients)
            with contextlib.suppress(Exception):
                await self._reply(writer, _err("busy", f"{self.max_clients} requests under "
                                               "way at once; try again"))
            writer.close()
            return
        loop = asyncio.get_running_loop()
        self._clients[writer] = loop.time()
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), self.idle_timeout_s)
                except TimeoutError:
                    self.stats["idle_closed"] += 1
                    return
                except (ValueError, asyncio.LimitOverrunError):
                    self.stats["bad_requests"] += 1
                    await self._reply(writer, _err("too_long", "request over 64 KiB"))
                    return
                if not line or writer not in self._clients:
                    return
                self._clients[writer] = None
                if b'"events"' in line and _is_events(line):
                    await self._stream_events(reader, writer)  # until the client goes
                    return
                await self._reply(writer, await self._dispatch(line))
                self._clients.pop(writer, None)  # idle again: now the newest idle one
                self._clients[writer] = loop.time()
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            return
        finally:
            self._clients.pop(writer, None)
            writer.close()

    def _evict_idle(self) -> bool:
        """Close the connection idle for longest; False when none has been idle long."""
        horizon = asyncio.get_running_loop().time() - MIN_IDLE_EVICT_S
        for w, since in self._clients.items():
            if since is not None and since <= horizon:
                del self._clients[w]
                w.close()  # its readline sees end of file
                self.stats["idle_evicted"] += 1
                return True
        return False

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except RecursionError:
            self.stats["bad_requests"] += 1
            return _err("bad_json", "nested too deeply")
        except (ValueError, UnicodeDecodeError) as exc:
            self.stats["bad_requests"] += 1
            return _err("bad_json", str(exc)[:200])
        if not isinstance(req, dict) or not isinstance(req.get("command"), str):
            self.stats["bad_requests"] += 1
            return _err("bad_request", 'a request is an object with a "command" string')
        try:
            return await self.handler(req)
        except Exception as exc:  # a handler bug must not take the daemon down
            self.stats["internal_errors"] += 1
            command = req["command"][:40]
            if self._log.log(logging.ERROR, f"internal {command}", "control request %r "
                             "failed: %s: %s", command, type(exc).__name__, exc):
                log.debug("traceback", exc_info=exc)
            return _err("internal", f"{type(exc).__name__}: {exc}"[:500])

    async def _reply(self, writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        # A reply object served to many clients (the shared status) is encoded once.
        if self._encoded is None or self._encoded[0] is not reply:
            self._encoded = (reply, json.dumps(reply, separators=(",", ":")).encode() + b"\n")
        writer.write(self._encoded[1])
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)


def _is_events(line: bytes) -> bool:
    try:
        req = json.loads(line)
    except (ValueError, RecursionError, UnicodeDecodeError):
        return False
    return isinstance(req, dict) and req.get("command") == "events"


def _err(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}
