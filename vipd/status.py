"""The one status model: a snapshot built from the cores, served as JSON by the control
socket and rendered as text by vipctl. Times are ages in seconds relative to `now`."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from vipd.core.packet import DropReason, IPAddress
from vipd.core.router import State, VirtualRouter
from vipd.core.timing import cs_to_ms, s_to_ms
from vipd.core.track import Contribution

# The status JSON's version: raised when a field changes meaning or goes away (new fields
# may appear at any time). Programs reading `vipctl status --json` check it.
SCHEMA_VERSION = 1


@dataclass
class RouterView:
    """What status needs about one virtual router besides the core itself."""

    vlan: str
    interface: str
    router: VirtualRouter
    vips: tuple[str, ...]
    drops: Mapping[DropReason, int]
    # What the kernel holds (the truth), and whether a VIP change is still under way.
    kernel_vips: tuple[str, ...] | None = None
    vips_settling: bool = False
    vips_repaired: int = 0
    static: dict[str, Any] | None = None  # static_status(), kept by whoever owns the router
    split_brain_with: int | None = None  # a peer node saying over the sync link: master too
    unicast_peers: tuple[str, ...] = ()
    group: str | None = None  # the group it moves with (None: alone)
    contributions: tuple[Contribution, ...] = ()  # what moved its priority (tracking, demote)


def _age(now: float, t: Fraction | None) -> float | None:
    return None if t is None else round(now - float(t), 3)


@functools.lru_cache(maxsize=8192)
def _s(a: IPAddress) -> str:
    """str() of an address, remembered: IPv6 formatting is slow and status repeats it."""
    return str(a)


def static_status(v: RouterView) -> dict[str, Any]:
    """The part of a router's status that only its configuration decides (built once)."""
    c = v.router.config
    return {
        "name": c.name,
        "vlan": v.vlan,
        "interface": v.interface,
        "vrid": c.vrid,
        "family": f"IPv{c.family}",
        "version": c.version,
        "priority": c.priority,
        "preempt": c.preempt,
        "accept_mode": c.accept_mode,
        "advert_interval_ms": cs_to_ms(c.advert_interval_cs),
        "vips": list(v.vips),
        "address_check": "strict" if c.strict_addresses else "relaxed",
        "checksum_sent": c.checksum.value,
        "unicast_peers": list(v.unicast_peers),
    }


def router_status(v: RouterView, now_s: Fraction) -> dict[str, Any]:
    r = v.router
    now = float(now_s)
    lt = r.last_transition
    master: IPAddress | None = r.master_address if r.state in (State.BACKUP, State.MASTER) \
        else None
    out = dict(v.static) if v.static is not None else static_status(v)
    out.update({
        "state": r.state.value,
        "effective_priority": r.priority,
        # why it is what it is: each tracker or demotion that moves it (a fault: delta 0)
        "priority_contributions": [{"source": c.source, "delta": c.delta, "fault": c.fault}
                                   for c in v.contributions],
        "group": v.group,
        "maintenance": r.maintenance,
        "drains": sorted(r.drains),
        "primary_address": _s(r.primary_address) if r.primary_address else None,
        "master": _s(master) if master else None,
        "master_is_self": r.state is State.MASTER,
        "master_priority": r.master_priority if master else None,
        "master_heard_ago_s": _age(now, r.master_heard_at) if master else None,
        "master_adver_interval_ms": cs_to_ms(r.master_adver_interval_cs),
        "master_down_interval_ms": s_to_ms(r.master_down_interval),
        "skew_time_ms": s_to_ms(r.skew_time),
        "vips_in_kernel": None if v.kernel_vips is None else list(v.kernel_vips),
        "vips_settling": v.vips_settling,
        "vips_repaired": v.vips_repaired,
        "holding_vips_for_successor": r.holding_vips,
        "peers": [
            {"address": _s(a), "priority": p.priority, "version": p.version,
             "interval_ms": cs_to_ms(p.interval_cs), "checksum": p.checksum.value,
             "adverts": p.adverts, "last_heard_ago_s": _age(now, p.last_heard),
             "first_address_not_link_local": p.first_not_link_local,
             "addresses_differ": None if p.address_diff is None else {
                 "missing_there": [_s(x) for x in p.address_diff.missing],
                 "extra_there": [_s(x) for x in p.address_diff.extra]}}
            for a, p in sorted(r.peers.items(), key=lambda kv: kv[0].packed)
        ],
        "address_mismatch_peers": [_s(a) for a in r.mismatched_peers(now_s)],
        "notes": {k: n for k, n in (("ipv6_not_link_local", r.counters.ipv6_not_link_local),
                                    ("address_mismatch", r.counters.address_mismatch)) if n},
        "last_transition": None if lt is None else {
            "from": lt.old.value, "to": lt.new.value, "cause": lt.cause,
            "ago_s": _age(now, lt.at),
            "master_silent_ms": None if lt.master_silent is None
            else round(s_to_ms(lt.master_silent), 3)},
        "transitions": r.counters.transitions,
        "became_master": r.counters.became_master,
        "adverts_sent": r.counters.adverts_sent,
        "adverts_received": r.counters.adverts_received,
        "priority_zero_sent": r.counters.priority_zero_sent,
        "priority_zero_received": r.counters.priority_zero_received,
        "io_failures": r.counters.io_failures,
        "dual_master_episodes": r.counters.dual_master_episodes,
        "fast_takeovers_armed": r.counters.fast_takeovers_armed,
        "split_brain_seen": r.counters.split_brain_seen,
        "split_brain_with_node": v.split_brain_with,
        "vlan_silent_held": r.counters.vlan_silent_held,
        "vlan_silent_ago_s": _age(now, r.vlan_silent_since),
        "dual_master": r.dual_master_recent(now_s),
        "drops": {k.value: n for k, n in sorted(v.drops.items(), key=lambda kv: kv[0].value)
                  if n},
    })
    return out


def router_problems(i: dict[str, Any], stopping: bool = False) -> list[str]:
    """Why one router makes the node degraded; empty when it is fine."""
    out = []
    name, state = i["name"], i["state"]
    if state == State.FAULT.value:
        out.append(f"{name}: FAULT ({(i['last_transition'] or {}).get('cause')})")
    if state == State.INIT.value and not stopping:
        out.append(f"{name}: not running (INIT)")
    if i["dual_master"]:
        out.append(f"{name}: two masters heard")
    if i.get("split_brain_with_node") is not None:
        out.append(f"{name}: split brain: node {i['split_brain_with_node']} is master too "
                   "(per the sync link)")
    if i.get("vlan_silent_ago_s") is not None:
        out.append(f"{name}: the master is silent on this VLAN but alive on the sync link "
                   "(VLAN broken between the nodes?); holding as configured")
    if i["address_mismatch_peers"]:
        out.append(f"{name}: peer(s) {', '.join(i['address_mismatch_peers'])} advertise "
                   "another address list")
    kernel = i["vips_in_kernel"]
    if kernel is not None and not i["vips_settling"]:
        if state == State.MASTER.value:
            missing = [v for v in i["vips"] if v not in kernel]
            if missing:
                out.append(f"{name}: MASTER but the kernel lacks {', '.join(missing)}")
        elif kernel and not i["holding_vips_for_successor"]:
            out.append(f"{name}: {state} but the kernel holds {', '.join(kernel)}")
    return out


def snapshot(node: str, mode: str, routers: Iterable[RouterView],
             interfaces: Iterable[dict[str, Any]], now: Fraction,
             started_ago_s: float, reloads: int = 0,
             node_problems: Iterable[str] = (), stopping: bool = False) -> dict[str, Any]:
    instances = [router_status(v, now) for v in routers]
    problems = list(node_problems)
    for i in instances:
        problems += router_problems(i, stopping)
    critical = any(i["dual_master"] or i.get("split_brain_with_node") is not None
                   for i in instances)
    return {
        "schema_version": SCHEMA_VERSION,
        "node": node,
        "mode": mode,
        "uptime_s": round(started_ago_s, 3),
        "reloads": reloads,
        "healthy": not problems,
        # monitoring-plugin levels: two masters for one virtual router is critical
        "severity": "critical" if critical else ("degraded" if problems else "ok"),
        "problems": problems,
        "instances": instances,
        "interfaces": list(interfaces),
    }
