"""Mode policy: what the virtual routers of this node should do as a group. Pure.

single-active: the node is active for every VLAN or for none. One router in FAULT (its
interface down, or it could not hold its VIPs) drains every other router of the node, so the
peer takes all VLANs at once and traffic through a stateful firewall stays symmetric.
per-vlan-active: each VLAN's election stands alone, except in named groups, which behave
as single-active does for their members.
all-active: the routers are the buckets (vipd.core.cluster) and move together like
single-active: a member that loses any of its VLANs (`link`) or faults one bucket gives up
every bucket, since a connection's packets cross several VLANs and must meet one member.

Incremental: a transition costs O(1); only when the group fault starts or ends does every
router of the node need telling (once, O(routers)), never on every transition.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from vipd.core.router import State

GROUP_FAULT = "group fault"


class GroupPolicy:
    """One group of routers that move together: the whole node (single-active,
    all-active) or a named group of VLANs (per-vlan-active, keepalived's sync groups)."""

    def __init__(self, faulted: Iterable[Hashable] = ()) -> None:
        self.faulted: set[Hashable] = set(faulted)
        self.links_down: set[str] = set()  # watched links (all-active) that are down

    @property
    def active(self) -> bool:
        """True while the other routers of the group should drain."""
        return bool(self.faulted or self.links_down)

    def link(self, name: str, up: bool) -> None:
        """A watched link (one without routers of its own) went up or down."""
        if up:
            self.links_down.discard(name)
        else:
            self.links_down.add(name)

    def note(self, key: Hashable, old: str, new: str) -> None:
        """Record one router's transition (O(1)); compare `active` before and after."""
        if new == State.FAULT.value:
            self.faulted.add(key)
        elif old == State.FAULT.value:
            self.faulted.discard(key)
