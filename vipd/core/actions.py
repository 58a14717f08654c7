"""What a core asks the I/O adapters to do, as plain data (docs/architecture.md: actions)."""

from __future__ import annotations

from dataclasses import dataclass

from vipd.core.packet import IPAddress


@dataclass(frozen=True, slots=True)
class SendAdvert:
    """Send one advertisement for this virtual router (priority 0 = release)."""

    priority: int
    interval_cs: int


@dataclass(frozen=True, slots=True)
class AddVips:
    """Install the virtual addresses (idempotent)."""

    accept_mode: bool


@dataclass(frozen=True, slots=True)
class RemoveVips:
    """Remove the virtual addresses (idempotent)."""


@dataclass(frozen=True, slots=True)
class Announce:
    """One round of gratuitous ARP (IPv4) or unsolicited NA (IPv6) for the VIPs."""

    round: int  # 1-based; refresh rounds continue counting


@dataclass(frozen=True, slots=True)
class Transitioned:
    """A state change, for whoever wants to notify (scripts, metrics)."""

    old: str
    new: str
    cause: str
    master: IPAddress | None


Action = SendAdvert | AddVips | RemoveVips | Announce | Transitioned
