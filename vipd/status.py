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
from vipd.core.timing import cs_to_ms, master_down_interval, s_to_ms, skew_time
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
    static: tuple[Any, ...] | None = None  # static_row(), kept by whoever owns the router
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


# The fields of one router's status, in order: first what its configuration decides
# (built once per router, STATIC_FIELDS), then what changes.
STATIC_FIELDS = ("name", "vlan", "interface", "vrid", "family", "version", "priority",
                 "preempt", "accept_mode", "advert_interval_ms", "vips", "address_check",
                 "checksum_sent", "unicast_peers")
FIELDS = STATIC_FIELDS + (
    "state", "effective_priority", "priority_contributions", "group", "maintenance", "drains",
    "primary_address", "master", "master_is_self", "master_priority", "master_heard_ago_s",
    "master_adver_interval_ms", "master_down_interval_ms", "skew_time_ms", "vips_in_kernel",
    "vips_settling", "vips_repaired", "holding_vips_for_successor", "peers",
    "address_mismatch_peers", "notes", "last_transition", "transitions", "became_master",
    "adverts_sent", "adverts_received", "priority_zero_sent", "priority_zero_received",
    "io_failures", "dual_master_episodes", "fast_takeovers_armed", "split_brain_seen",
    "split_brain_with_node", "vlan_silent_held", "vlan_silent_ago_s", "dual_master", "drops")


def static_row(v: RouterView) -> tuple[Any, ...]:
    """The values of STATIC_FIELDS for one router (built once, kept by its owner)."""
    c = v.router.config
    return (c.name, v.vlan, v.interface, c.vrid, f"IPv{c.family}", c.version, c.priority,
            c.preempt, c.accept_mode, cs_to_ms(c.advert_interval_cs), list(v.vips),
            "strict" if c.strict_addresses else "relaxed", c.checksum.value,
            list(v.unicast_peers))


@functools.lru_cache(maxsize=1024)
def _timing_ms(version: int, priority: int, interval_cs: int) -> tuple[int, float, float]:
    """Learned interval, Master_Down_Interval and Skew_Time in ms (Fractions are slow)."""
    return (cs_to_ms(interval_cs), s_to_ms(master_down_interval(version, priority, interval_cs)),
            s_to_ms(skew_time(version, priority, interval_cs)))


# Enum.value goes through a descriptor: slow at 1000 routers
_STATE_TEXT = {s: s.value for s in State}


def router_row(v: RouterView, now_s: Fraction) -> tuple[Any, ...]:
    """One router's status: the values of FIELDS, in order. The status of 1000 routers is
    built on every `vipctl status`, so this avoids Fraction arithmetic and empty work."""
    r = v.router
    now = float(now_s)
    lt = r.last_transition
    state = r.state
    master: IPAddress | None = r.master_address if state in (State.BACKUP, State.MASTER) \
        else None
    c = r.counters
    prio = r.priority
    peers = r.peers
    return (v.static if v.static is not None else static_row(v)) + (
        _STATE_TEXT[state],
        prio,
        # why it is what it is: each tracker or demotion that moves it (a fault: delta 0)
        [{"source": x.source, "delta": x.delta, "fault": x.fault} for x in v.contributions]
        if v.contributions else [],
        v.group,
        r.maintenance,
        sorted(r.drains) if r.drains else [],
        _s(r.primary_address) if r.primary_address else None,
        _s(master) if master else None,
        state is State.MASTER,
        r.master_priority if master else None,
        _age(now, r.master_heard_at) if master else None,
        *_timing_ms(r.config.version, prio, r.master_adver_interval_cs),
        None if v.kernel_vips is None else list(v.kernel_vips),
        v.vips_settling,
        v.vips_repaired,
        r.holding_vips,
        [
            {"address": _s(a), "priority": p.priority, "version": p.version,
             "interval_ms": cs_to_ms(p.interval_cs), "checksum": p.checksum.value,
             "adverts": p.adverts, "last_heard_ago_s": _age(now, p.last_heard),
             "first_address_not_link_local": p.first_not_link_local,
             "addresses_differ": None if p.address_diff is None else {
                 "missing_there": [_s(x) for x in p.address_diff.missing],
                 "extra_there": [_s(x) for x in p.address_diff.extra]}}
            for a, p in (sorted(peers.items(), key=lambda kv: kv[0].packed)
                         if len(peers) > 1 else peers.items())
        ],
        [_s(a) for a in r.mismatched_peers(now_s)] if peers else [],
        {k: n for k, n in (("ipv6_not_link_local", c.ipv6_not_link_local),
                           ("address_mismatch", c.address_mismatch)) if n}
        if c.ipv6_not_link_local or c.address_mismatch else {},
        None if lt is None else {
            "from": _STATE_TEXT[lt.old], "to": _STATE_TEXT[lt.new], "cause": lt.cause,
            "ago_s": _age(now, lt.at),
            "master_silent_ms": None if lt.master_silent is None
            else round(s_to_ms(lt.master_silent), 3)},
        c.transitions,
        c.became_master,
        c.adverts_sent,
        c.adverts_received,
        c.priority_zero_sent,
        c.priority_zero_received,
        c.io_failures,
        c.dual_master_episodes,
        c.fast_takeovers_armed,
        c.split_brain_seen,
        v.split_brain_with,
        c.vlan_silent_held,
        _age(now, r.vlan_silent_since),
        r.dual_master_recent(now_s),
        {k.value: n for k, n in sorted(v.drops.items(), key=lambda kv: kv[0].value) if n}
        if v.drops else {},
    )


# where each field sits in a router_row()
_AT = {name: n for n, name in enumerate(FIELDS)}
(_NAME, _STATE, _DUAL, _SPLIT, _SILENT, _MISMATCH, _KERNEL, _SETTLING, _VIPS,
 _HOLDING, _LAST) = (_AT[k] for k in (
    "name", "state", "dual_master", "split_brain_with_node", "vlan_silent_ago_s",
    "address_mismatch_peers", "vips_in_kernel", "vips_settling", "vips",
    "holding_vips_for_successor", "last_transition"))


def router_problems(row: tuple[Any, ...], stopping: bool = False) -> list[str]:
    """Why one router (its router_row()) makes the node degraded; empty when it is fine."""
    out = []
    name, state = row[_NAME], row[_STATE]
    if state == State.FAULT.value:
        out.append(f"{name}: FAULT ({(row[_LAST] or {}).get('cause')})")
    if state == State.INIT.value and not stopping:
        out.append(f"{name}: not running (INIT)")
    if row[_DUAL]:
        out.append(f"{name}: two masters heard")
    if row[_SPLIT] is not None:
        out.append(f"{name}: split brain: node {row[_SPLIT]} is master too "
                   "(per the sync link)")
    if row[_SILENT] is not None:
        out.append(f"{name}: the master is silent on this VLAN but alive on the sync link "
                   "(VLAN broken between the nodes?); holding as configured")
    if row[_MISMATCH]:
        out.append(f"{name}: peer(s) {', '.join(row[_MISMATCH])} advertise "
                   "another address list")
    kernel = row[_KERNEL]
    if kernel is not None and not row[_SETTLING]:
        if state == State.MASTER.value:
            missing = [v for v in row[_VIPS] if v not in kernel]
            if missing:
                out.append(f"{name}: MASTER but the kernel lacks {', '.join(missing)}")
        elif kernel and not row[_HOLDING]:
            out.append(f"{name}: {state} but the kernel holds {', '.join(kernel)}")
    return out


def snapshot(node: str, mode: str, routers: Iterable[RouterView],
             interfaces: Iterable[dict[str, Any]], now: Fraction,
             started_ago_s: float, reloads: int = 0,
             node_problems: Iterable[str] = (), stopping: bool = False,
             table: bool = False) -> dict[str, Any]:
    """The node's status. `table`: "instances" as {"fields": FIELDS, "rows": [values]}, a
    third of the bytes to encode and parse at 1000 routers (vipctl asks for it and expands
    it with vipd.io.control_client.expand_status: the same model)."""
    rows = [router_row(v, now) for v in routers]
    problems = list(node_problems)
    for row in rows:
        problems += router_problems(row, stopping)
    critical = any(row[_DUAL] or row[_SPLIT] is not None for row in rows)
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
        "instances": {"fields": FIELDS, "rows": rows} if table else
        [dict(zip(FIELDS, row, strict=True)) for row in rows],
        "interfaces": list(interfaces),
    }
