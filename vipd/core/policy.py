"""Mode policy: what the virtual routers of this node should do as a group. Pure.

single-active: the node is active for every VLAN or for none. One router in FAULT (its
interface down, or it could not hold its VIPs) drains every other router of the node, so the
peer takes all VLANs at once and traffic through a stateful firewall stays symmetric.
per-vlan-active: each VLAN's election stands alone.
all-active: TODO(#10) load sharing is not implemented; vipd.config refuses the mode.
"""

from __future__ import annotations

from collections.abc import Iterable

from vipd.core.router import State

GROUP_FAULT = "group fault"


def group_fault(mode: str, states: Iterable[State]) -> bool:
    """True when the other routers of the node should drain (single-active only)."""
    return mode == "single-active" and any(s is State.FAULT for s in states)
