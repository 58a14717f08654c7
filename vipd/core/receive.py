"""The receive path's checks, pure, in one copy: the daemon and the simulated segment both
call `Receiver.check`. Order: our own packets, the VRID (a packet for a router we do not
run costs no decoding), the decoder, the checks against the router's configuration.

A peer sends the same bytes every interval: what passed every check before passes again,
so accepted adverts are remembered by (payload, IP metadata) for as long as the router they
were checked against is the one running (the caller's `current` says so) and our own
addresses stay the same (the caller calls `forget` when they change).
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Generic, NamedTuple, TypeVar

from vipd.core.packet import (
    AddressDiff,
    Advert,
    DecodeError,
    DropReason,
    IPAddress,
    IpMeta,
    ReceiverView,
    check_against,
    decode,
)

T = TypeVar("T")
MEMO_SIZE = 1024

# Drop reasons that concern a configured router (counted on it); the others are counted
# before a VRID matched (on the interface).
ROUTER_REASONS = frozenset({DropReason.VERSION, DropReason.V2_INTERVAL_MISMATCH,
                            DropReason.UNKNOWN_PEER})

Accepted = tuple[T, Advert, AddressDiff | None]


class Dropped(NamedTuple, Generic[T]):
    target: T | None  # the router it concerns, or None before a VRID matched
    reason: DropReason


class Receiver(Generic[T]):
    """Checks for one interface and address family; T is whatever names a router."""

    def __init__(self) -> None:
        self._memo: dict[tuple[bytes, IpMeta], Accepted[T]] = {}

    def check(self, payload: bytes, meta: IpMeta, own: Container[IPAddress],
              lookup: Callable[[int], tuple[T, ReceiverView] | None],
              current: Callable[[T], bool]) -> Accepted[T] | Dropped[T]:
        """An accepted advert (router, advert, address difference), or Dropped."""
        memo = self._memo.get((payload, meta))
        if memo is not None and current(memo[0]):
            return memo  # not from us: the memo is forgotten when our addresses change
        if meta.src in own:
            return Dropped(None, DropReason.OWN_PACKET)
        found = lookup(payload[1]) if len(payload) > 1 else None
        if found is None and len(payload) > 1:
            return Dropped(None, DropReason.UNKNOWN_VRID)
        target, view = found if found is not None else (None, None)
        try:
            adv = decode(payload, meta)
            diff = check_against(adv, view)
        except DecodeError as exc:
            return Dropped(target if exc.reason in ROUTER_REASONS else None, exc.reason)
        assert target is not None
        if len(self._memo) >= MEMO_SIZE:
            self._memo.clear()
        accepted: Accepted[T] = (target, adv, diff)
        self._memo[(payload, meta)] = accepted
        return accepted

    def forget(self) -> None:
        """Our own addresses changed: what was accepted is checked afresh."""
        self._memo.clear()
