"""Accept_Mode (RFC 9568 6.1, default False) enforced with nftables.

A master that is not the address owner must not accept packets addressed to its VIPs; only
ARP (not IP, so untouched here) and IPv6 Neighbor Discovery get through. The table holds
the VIPs of every non-owner router with `accept_mode: false`, whatever the state: a node
that is not master does not have the VIPs, so its input hook never sees them anyway, and
nothing has to change at takeover time. Forwarded traffic is not affected (input hook).
The table is rebuilt whole at start and reload, and removed at exit. The first apply always
reaches the kernel, even with nothing to deny: a table left by a vipd killed with -9 must
not keep dropping traffic to VIPs that the new configuration accepts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from vipd.core.packet import IPAddress

log = logging.getLogger("vipd.nft")

TABLE = "vipd_accept"
DROP_TABLE = f"add table inet {TABLE}\ndelete table inet {TABLE}\n"  # idempotent


def ruleset(addresses: Iterable[IPAddress]) -> str:
    v4 = sorted(str(a) for a in addresses if isinstance(a, ipaddress.IPv4Address))
    v6 = sorted(str(a) for a in addresses if isinstance(a, ipaddress.IPv6Address))

    def elements(xs: list[str]) -> str:
        return f" elements = {{ {', '.join(xs)} }};" if xs else ""

    return "\n".join([
        f"add table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        f"  set deny4 {{ type ipv4_addr;{elements(v4)} }}",
        f"  set deny6 {{ type ipv6_addr;{elements(v6)} }}",
        "  chain input {",
        "    type filter hook input priority -10; policy accept;",
        "    ip daddr @deny4 counter drop",
        "    ip6 daddr @deny6 icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept",
        "    ip6 daddr @deny6 counter drop",
        "  }",
        "}",
    ]) + "\n"


class AcceptGuard(Protocol):
    async def apply(self, denied: set[IPAddress]) -> bool: ...
    async def remove(self) -> None: ...


class NftAcceptGuard:
    def __init__(self, nft: str | None = None) -> None:
        self.nft = nft or shutil.which("nft")
        self.active = False
        self._reconciled = False  # has the kernel been brought in line once?

    async def _run(self, script: str) -> tuple[int, str]:
        assert self.nft is not None
        proc = await asyncio.create_subprocess_exec(
            self.nft, "-f", "-", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _out, err = await proc.communicate(script.encode())
        return proc.returncode or 0, err.decode().strip()

    async def apply(self, denied: set[IPAddress]) -> bool:
        """Install the table; False (and a warning) when nftables cannot be used."""
        if not denied and not self.active and self._reconciled:
            return True
        if self.nft is None:
            if not denied:
                return True  # no nft: nobody can have left a table either
            log.warning("accept_mode false cannot be enforced: nft is not installed")
            return False
        if not denied:
            rc, err = await self._run(DROP_TABLE)
            if rc == 0:
                self.active, self._reconciled = False, True
                return True
            log.warning("cannot remove a stale nftables table %s: %s", TABLE, err)
            return False
        rc, err = await self._run(ruleset(denied))
        if rc != 0:
            log.warning("accept_mode false cannot be enforced: nft: %s", err)
            return False
        self.active = self._reconciled = True
        return True

    async def remove(self) -> None:
        if self.active and self.nft is not None:
            await self._run(DROP_TABLE)
            self.active = False


@dataclass
class FakeAcceptGuard:
    denied: set[IPAddress] = field(default_factory=set)
    works: bool = True

    async def apply(self, denied: set[IPAddress]) -> bool:
        self.denied = set(denied)
        return self.works

    async def remove(self) -> None:
        self.denied = set()
