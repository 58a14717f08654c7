"""Tracking and demotion: what moves a virtual router's priority, or faults it. Pure.

Trackers are named once in the configuration and followed by routers (directly, through
their VLAN, their group or the whole node). Each has a state, fed by the daemon:
- interface: up or down (netlink);
- script: a command run every `interval`, its exit status filtered by rise/fall;
- file: a number another tool writes (keepalived's track_file).

What a followed tracker does to a router (keepalived's rules):
- weight 0 (none given): the router goes to FAULT while the interface is down, the script
  fails, or the file holds a number other than 0;
- weight > 0: added while the interface is up / the script succeeds;
- weight < 0: added while the interface is down / the script fails;
- a file: its number times the weight (default weight 1).
The demotion counters (`vipctl demote`, OpenBSD's carpdemote) of the node and of the router's
group are subtracted. The result is kept within 1..254; the address owner's 255 is never
moved by weights or demotion (a FAULT still applies to it).
"""

from __future__ import annotations

from dataclasses import dataclass

from vipd.core.router import OWNER_PRIORITY

MAX_DEMOTION = 254
NODE = "node"  # the demotion target (and group name) meaning every router of the node


@dataclass(frozen=True)
class TrackerSpec:
    name: str
    kind: str  # "interface", "script" or "file"
    interface: str = ""
    argv: tuple[str, ...] = ()
    path: str = ""
    interval_ms: int = 1000
    timeout_ms: int = 2000
    rise: int = 1
    fall: int = 1
    user: str = ""  # scripts run as this user ("" = vipd's own)
    weight: int = 0


@dataclass(frozen=True)
class TrackRef:
    """A router follows a tracker, possibly with its own weight, through `via` (node,
    group NAME, vlan NAME, or the instance itself): for the operator's explanation."""

    tracker: str
    weight: int | None = None
    via: str = "instance"


@dataclass(frozen=True)
class TrackState:
    ok: bool = True  # interface up / script passing / file readable
    value: int = 0  # a file's number


@dataclass(frozen=True)
class Contribution:
    """One line of the explanation of a router's effective priority."""

    source: str  # "track uplink (vlan lan-a)", "demote node"
    delta: int  # added to the configured priority (0 for a fault)
    fault: bool = False


@dataclass(frozen=True)
class Effective:
    priority: int
    faults: tuple[str, ...]  # tracker names that fault the router
    contributions: tuple[Contribution, ...]


def contribution(spec: TrackerSpec, ref: TrackRef, state: TrackState) -> Contribution | None:
    """What one followed tracker does now, or None when it does nothing."""
    weight = spec.weight if ref.weight is None else ref.weight
    source = f"track {spec.name} ({ref.via})"
    if spec.kind == "file":
        if weight == 0:
            return Contribution(source, 0, True) if state.value != 0 else None
        delta = state.value * weight
        return Contribution(source, delta) if delta else None
    if weight == 0:
        return None if state.ok else Contribution(source, 0, True)
    if (weight > 0) == state.ok:
        return Contribution(source, weight)
    return None


def effective(configured: int, refs: tuple[TrackRef, ...], specs: dict[str, TrackerSpec],
              states: dict[str, TrackState], demotions: tuple[tuple[str, int], ...]) -> Effective:
    """The router's priority and faults from its configured priority, the trackers it
    follows and the demotion counters that apply to it ((target, count) pairs)."""
    parts: list[Contribution] = []
    faults: list[str] = []
    for ref in refs:
        spec = specs.get(ref.tracker)
        if spec is None:
            continue
        c = contribution(spec, ref, states.get(ref.tracker, TrackState()))
        if c is None:
            continue
        parts.append(c)
        if c.fault and spec.name not in faults:
            faults.append(spec.name)
    for target, n in demotions:
        if n:
            parts.append(Contribution(f"demote {target}", -n))
    if configured == OWNER_PRIORITY:
        return Effective(OWNER_PRIORITY, tuple(faults), tuple(parts))
    total = configured + sum(c.delta for c in parts)
    return Effective(max(1, min(254, total)), tuple(faults), tuple(parts))


def demoted(current: int, change: str) -> int:
    """`vipctl demote TARGET +N|-N|0`: add N, take N away, or reset; kept in 0..254.
    Raises ValueError on anything else."""
    text = change.strip()
    if text in ("0", "+0", "-0"):
        return 0
    if not text or text[0] not in "+-" or not text[1:].isdigit():
        raise ValueError(f"{change!r}: give +N, -N or 0")
    n = int(text[1:])
    return max(0, min(MAX_DEMOTION, current + (n if text[0] == "+" else -n)))


class RiseFall:
    """A script's passing state, changed only after `rise` passes in a row (failing ->
    passing) or `fall` failures in a row (passing -> failing). Starts passing."""

    def __init__(self, rise: int, fall: int, ok: bool = True) -> None:
        self.rise, self.fall = max(1, rise), max(1, fall)
        self.ok = ok
        self._run = 0  # results in a row that disagree with `ok`

    def feed(self, passed: bool) -> bool:
        """One result; True when the state changed."""
        if passed == self.ok:
            self._run = 0
            return False
        self._run += 1
        if self._run >= (self.rise if passed else self.fall):
            self.ok, self._run = passed, 0
            return True
        return False
