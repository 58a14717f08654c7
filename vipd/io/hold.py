"""The takeover hold: while a taking-over node commits the peers' connection state, packets
arriving on its VLAN interfaces are queued (NFQUEUE, in the raw table's PREROUTING, before
conntrack sees them) and released once the commit is done, so a packet of a flow the
kernel does not know yet is neither dropped by the stateful firewall nor answered with a
reset.

Bounded: at most `max_packets` are held (more pass at once) and for at most `max_s`
seconds; the rule has `--queue-bypass`, so if vipd dies the packets pass instead of being
dropped. Uses iptables (the xt NFQUEUE target through iptables-nft: this kernel's nft has
no `queue` statement) and the netfilterqueue package. Either missing: the hold is
unavailable, said once, and the commit goes ahead without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger("vipd.hold")

QUEUE_NUM = 3780
COMMENT = "vipd takeover hold"


@dataclass
class HoldResult:
    held: int = 0
    passed_over_limit: int = 0
    released_after_s: float = 0.0
    available: bool = True


class Hold(Protocol):
    async def start(self) -> None: ...
    async def release(self) -> HoldResult: ...


def _rules(cmd: str, sync_interface: str) -> list[list[str]]:
    """One rule per family: everything but the sync link (whose traffic the commit does not
    concern) and loopback."""
    return [[tool, "-w", "-t", "raw", cmd, "PREROUTING", "!", "-i", sync_interface,
             "-m", "addrtype", "!", "--src-type", "LOCAL",
             "-m", "comment", "--comment", COMMENT,
             "-j", "NFQUEUE", "--queue-num", str(QUEUE_NUM), "--queue-bypass"]
            for tool in ("iptables", "ip6tables")]


def nfqueue_unavailable() -> str | None:
    """Why NFQUEUE cannot be used from vipd here, or None (the hold and the all-active
    classifier both need it)."""
    if shutil.which("iptables") is None:
        return "iptables is not installed"
    try:
        import netfilterqueue  # noqa: F401
    except ImportError:
        return "the netfilterqueue package is not installed (extra: hold)"
    return None


def delete_all(argv: list[str], most: int = 4) -> None:
    """Run an iptables `-D` command until it fails (at most `most` times): copies of the
    rule left by killed vipds go too."""
    for _ in range(most):
        if subprocess.run(argv, capture_output=True, check=False, timeout=5).returncode != 0:
            return


class NfqueueHold:
    def __init__(self, sync_interface: str, max_packets: int = 20000,
                 max_s: float = 2.0) -> None:
        self.sync_interface = sync_interface
        self.max_packets = max_packets
        self.max_s = max_s
        self._queue: Any = None
        self._held: list[Any] = []
        self._over = 0
        self._t0 = 0.0
        self._fd = -1
        self._timer: asyncio.TimerHandle | None = None
        self.unavailable = nfqueue_unavailable()

    async def start(self) -> None:
        if self.unavailable is not None or self._queue is not None:
            return
        from netfilterqueue import NetfilterQueue

        loop = asyncio.get_running_loop()
        q = NetfilterQueue()
        try:
            q.bind(QUEUE_NUM, self._on_packet, max_len=self.max_packets)
        except OSError as exc:
            self.unavailable = f"cannot bind NFQUEUE {QUEUE_NUM}: {exc}"
            log.warning("takeover hold unavailable: %s", self.unavailable)
            return
        self._queue = q
        self._fd = q.get_fd()
        loop.add_reader(self._fd, q.run, False)
        self._t0 = time.monotonic()
        self._timer = loop.call_later(self.max_s, lambda: asyncio.ensure_future(
            self.release()))
        await self._run_rules("-I")

    def _on_packet(self, pkt: Any) -> None:
        if len(self._held) >= self.max_packets:
            self._over += 1
            pkt.accept()
            return
        pkt.retain()  # keeps the payload; the verdict comes at release
        self._held.append(pkt)

    async def release(self) -> HoldResult:
        if self._queue is None:
            return HoldResult(available=self.unavailable is None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._run_rules("-D")
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            self._queue.run(False)  # what the rule queued before it went
        held, self._held = self._held, []
        for pkt in held:
            with contextlib.suppress(Exception):
                pkt.accept()
        res = HoldResult(len(held), self._over, time.monotonic() - self._t0)
        self._over = 0
        loop.remove_reader(self._fd)
        with contextlib.suppress(Exception):
            self._queue.unbind()
        self._queue = None
        return res

    async def _run_rules(self, cmd: str) -> None:
        loop = asyncio.get_running_loop()

        def apply(argv: list[str]) -> None:
            subprocess.run(argv, capture_output=True, check=False, timeout=5)

        await asyncio.gather(*(loop.run_in_executor(None, apply, argv)
                               for argv in _rules(cmd, self.sync_interface)))

    def remove_leftovers(self) -> None:
        """A hold rule left by a killed vipd (it bypasses, but would delay nothing: go)."""
        if shutil.which("iptables") is None:
            return
        for argv in _rules("-D", self.sync_interface):
            delete_all(argv)


@dataclass
class FakeHold:
    events: list[str] = field(default_factory=list)

    async def start(self) -> None:
        self.events.append("hold")

    async def release(self) -> HoldResult:
        self.events.append("release")
        return HoldResult()
