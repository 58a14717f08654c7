"""One VRRP virtual router (one VRID, one address family): the RFC 9568 section 6 machine.

Pure: no sockets, no clock. Every entry point takes `now` (monotonic seconds as a Fraction),
returns the actions to carry out, and `get_timer()` answers the next deadline. The driver
calls `handle_timer(now)` when that deadline passes. Timers are exact Fractions.

States are INIT (RFC "Initialize"), BACKUP, MASTER (RFC 9568 "Active") and FAULT (interface
down, or repeated I/O failures while master). Every change goes through `_transition`.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from fractions import Fraction

from vipd.core.actions import (
    Action,
    AddVips,
    Announce,
    RemoveVips,
    SendAdvert,
    Transitioned,
)
from vipd.core.packet import (
    AddressDiff,
    Advert,
    ChecksumVariant,
    DropReason,
    IPAddress,
    sorted_addresses,
)
from vipd.core.timing import Seconds, cs_to_s, master_down_interval, skew_time

log = logging.getLogger("vipd.vrrp")

OWNER_PRIORITY = 255


class State(enum.Enum):
    INIT = "INIT"
    BACKUP = "BACKUP"
    MASTER = "MASTER"
    FAULT = "FAULT"


_ALLOWED: dict[State, frozenset[State]] = {
    State.INIT: frozenset({State.BACKUP, State.MASTER, State.FAULT}),
    State.BACKUP: frozenset({State.MASTER, State.INIT, State.FAULT}),
    State.MASTER: frozenset({State.BACKUP, State.INIT, State.FAULT}),
    State.FAULT: frozenset({State.INIT}),
}


class TransitionError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Everything one virtual router needs; built by vipd.config, never mutated."""

    name: str  # "lan-a/vrid 51/IPv4", used in logs and status
    vrid: int
    family: int
    version: int
    priority: int
    advert_interval_cs: int
    addresses: tuple[IPAddress, ...]  # on the wire, in order (IPv6: link-local first)
    preempt: bool = True
    preempt_delay: Seconds = Fraction(0)
    accept_mode: bool = False
    accept_v2: bool = False
    checksum: ChecksumVariant = ChecksumVariant.PSEUDO_HEADER
    garp_count: int = 3
    garp_interval: Seconds = Fraction(1, 10)
    garp_refresh: Seconds | None = None
    reannounce_on_lower: bool = True
    max_io_failures: int = 3
    # RFC 3768 7.1 drops adverts whose address list differs (except the owner's); RFC 9568
    # 7.1 only asks to log. Relaxed (the default) keeps the election whole during a rolling
    # change; either way the peer is listed, warned about and the router is degraded.
    strict_addresses: bool = False


MISMATCH_WARN_INTERVAL = Fraction(60)  # seconds between repeated warnings per peer
# The peer table is for the operator; a LAN full of spoofed senders must not grow it or
# make any advert cost more. Kept in order of last advert; the oldest go first.
MAX_PEERS = 64
PEER_TTL = Fraction(300)  # forgotten after this long unheard (or 3 Master_Down_Intervals)


@dataclass(slots=True)
class PeerInfo:
    """What we last heard from one sender on this virtual router."""

    priority: int
    version: int
    interval_cs: int
    checksum: ChecksumVariant
    last_heard: Seconds
    adverts: int = 0
    address_diff: AddressDiff | None = None
    first_not_link_local: bool = False
    warned_at: Seconds | None = None
    warned_diff: AddressDiff | None = None


@dataclass(slots=True)
class LastTransition:
    old: State
    new: State
    cause: str
    at: Seconds
    # a takeover: how long the master we followed had been silent (its last advert to now)
    master_silent: Seconds | None = None


@dataclass(slots=True)
class Counters:
    adverts_sent: int = 0
    adverts_received: int = 0
    priority_zero_sent: int = 0
    priority_zero_received: int = 0
    became_master: int = 0
    transitions: int = 0
    io_failures: int = 0
    dual_master_episodes: int = 0
    # accepted, but worth telling the operator (liberal in what we accept, loud about it)
    ipv6_not_link_local: int = 0
    address_mismatch: int = 0
    peers_forgotten: int = 0  # aged out, or pushed out by newer senders (MAX_PEERS)
    fast_takeovers_armed: int = 0  # master_node_gone moved the Master_Down_Timer
    split_brain_seen: int = 0  # a peer's view over the sync link said master too
    vlan_silent_held: int = 0  # takeovers held: master alive on the sync link only


class _Timers:
    """A router's timers. Master_Down_Timer may be kept as (heard at, interval) and added
    up only when read: a backup pushes it later at every advert, and the timer is read
    a few times per Master_Down_Interval (Fraction addition is the costly part)."""

    __slots__ = ("adver", "_master_down", "_md_parts", "announce", "fault_retry", "release")

    def __init__(self) -> None:
        self.adver: Seconds | None = None
        self._master_down: Seconds | None = None
        self._md_parts: tuple[Seconds, Seconds] | None = None
        self.announce: Seconds | None = None
        self.fault_retry: Seconds | None = None
        self.release: Seconds | None = None

    @property
    def master_down(self) -> Seconds | None:
        parts = self._md_parts
        if parts is not None:
            self._master_down, self._md_parts = parts[0] + parts[1], None
        return self._master_down

    @master_down.setter
    def master_down(self, at: Seconds | None) -> None:
        self._master_down, self._md_parts = at, None

    def master_down_after(self, heard: Seconds, interval: Seconds) -> None:
        """Master_Down_Timer = heard + interval, added up when read."""
        self._md_parts = (heard, interval)

    def clear(self) -> None:
        self.adver = self.master_down = self.announce = self.fault_retry = None

    def earliest(self) -> Seconds | None:
        best = self.adver  # (no list, no min(): called for every advert sent or heard)
        for t in (self.master_down, self.announce, self.fault_retry, self.release):
            if t is not None and (best is None or t < best):
                best = t
        return best


class VirtualRouter:
    """RFC 9568 section 6 state machine for one (interface, VRID, family)."""

    def __init__(self, config: RouterConfig, primary_address: IPAddress | None = None) -> None:
        self.config = config
        self.primary_address = primary_address
        self.state = State.INIT
        self.master_adver_interval_cs = config.advert_interval_cs
        self.master_address: IPAddress | None = None
        self.master_priority: int | None = None
        self.master_heard_at: Seconds | None = None
        self.peers: dict[IPAddress, PeerInfo] = {}
        self.counters = Counters()
        self.last_transition: LastTransition | None = None
        self.drains: set[str] = set()  # "maintenance", "group fault": priority 0 while any
        # the configured priority moved by tracking and demotion (set_priority); the owner's
        # 255 is never moved
        self.base_priority = config.priority
        self.link_up = True
        self.fault_cause = "interface down"  # why link_up is False (a tracker names itself)
        self.last_conflict_at: Seconds | None = None
        self._timers = _Timers()
        self._backup_since: Seconds | None = None
        self._io_failures_in_row: dict[str, int] = {}  # per kind: "send", "VIP install"
        self._announce_round = 0
        self._last_sent_at: Seconds | None = None
        # the last two distinct senders claiming mastership, for constant-time dual-master
        # detection: (address, when heard)
        self._last_claim: tuple[IPAddress, Seconds] | None = None
        self._other_claim: tuple[IPAddress, Seconds] | None = None
        self._last_followed: Advert | None = None  # see heard_again
        self._followed_peer: PeerInfo | None = None  # the peer entry it came with
        # when the sync link moved our Master_Down_Timer earlier (master_released,
        # master_node_gone): an advert received before that moment, read after it (a
        # deferred socket read), must not push the takeover back
        self._expedited_at: Seconds | None = None
        self.vlan_silent_since: Seconds | None = None  # see hold_takeover

    # ------------------------------------------------------------ derived values

    @property
    def priority(self) -> int:
        """Effective priority: what we advertise and compare with."""
        return 0 if self.drains else self.base_priority

    @property
    def maintenance(self) -> bool:
        return "maintenance" in self.drains

    @property
    def skew_time(self) -> Seconds:
        return skew_time(self.config.version, self.priority, self.master_adver_interval_cs)

    @property
    def master_down_interval(self) -> Seconds:
        return master_down_interval(
            self.config.version, self.priority, self.master_adver_interval_cs
        )

    @property
    def advertisement_interval(self) -> Seconds:
        return cs_to_s(self.config.advert_interval_cs)

    def _next_advert(self, now: Seconds) -> Seconds:
        """The next Adver_Timer expiry, on a grid of the interval rather than `now + I`.

        Deliberate: every router of this node with the same interval then advertises in the
        same instant, so their backups time out together and all VLANs move as one (the
        first advert after a (re)start comes up to one interval early, which is harmless)."""
        interval = self.advertisement_interval
        return (now // interval + 1) * interval

    def get_timer(self) -> Seconds | None:
        return self._timers.earliest()

    @property
    def master_down_timer(self) -> Seconds | None:
        return self._timers.master_down

    @property
    def adver_timer(self) -> Seconds | None:
        return self._timers.adver

    def dual_master_recent(self, now: Seconds) -> bool:
        """Two masters were heard within the last three Master_Down_Intervals."""
        if self.last_conflict_at is None:
            return False
        return now - self.last_conflict_at <= 3 * self.master_down_interval

    # ------------------------------------------------------------ events

    def start(self, now: Seconds, cause: str = "startup") -> list[Action]:
        """RFC 9568 6.4.1: the Startup event."""
        acts: list[Action] = []
        if self.state is State.FAULT:
            self._transition(now, State.INIT, cause, acts)
        if self.state is not State.INIT:
            return acts
        if not self.link_up:
            self._transition(now, State.FAULT, self.fault_cause, acts)
            return acts
        if self.priority == OWNER_PRIORITY:
            self._become_master(now, "address owner", acts)
            return acts
        self.master_adver_interval_cs = self.config.advert_interval_cs
        self._enter_backup(now, cause, acts)
        return acts

    def shutdown(self, now: Seconds, cause: str = "shutdown") -> list[Action]:
        """RFC 9568 6.4.2/6.4.3: the Shutdown event. A master sends priority 0.

        The VIPs stay until a successor is heard (or the slowest backup, priority 1, must
        have taken over), so hosts that ARP in the Skew_Time gap still get an answer.
        `holding_vips` tells the daemon when it may exit."""
        acts: list[Action] = []
        was_master = self.state is State.MASTER
        if was_master:
            self._send(acts, 0, now)
        if self.state in (State.MASTER, State.BACKUP):
            self._transition(now, State.INIT, cause, acts)
        self._timers.clear()
        if was_master:
            self._timers.release = (now + self.advertisement_interval
                                    + skew_time(self.config.version, 1,
                                                self.config.advert_interval_cs))
        return acts

    @property
    def holding_vips(self) -> bool:
        """True while a released master still holds its VIPs for a successor."""
        return self._timers.release is not None

    def release_now(self) -> list[Action]:
        """Stop holding released VIPs at once (the router is being replaced)."""
        acts: list[Action] = []
        self._release(acts)
        return acts

    def _release(self, acts: list[Action]) -> None:
        if self._timers.release is not None:
            self._timers.release = None
            acts.append(RemoveVips())

    def handle_timer(self, now: Seconds) -> list[Action]:
        acts: list[Action] = []
        t = self._timers
        if t.release is not None and now >= t.release:
            self._release(acts)
        if t.fault_retry is not None and now >= t.fault_retry:
            t.fault_retry = None
            self._io_failures_in_row.clear()
            acts += self.start(now, "fault retry")
        if t.master_down is not None and now >= t.master_down and self.state is State.BACKUP:
            t.master_down = None
            if not self.drains:
                self._become_master(now, "master_down_timer", acts)
        if t.adver is not None and now >= t.adver and self.state is State.MASTER:
            self._send(acts, self.priority, now)
            t.adver = self._next_advert(now)
        if t.announce is not None and now >= t.announce and self.state is State.MASTER:
            self._announce(now, acts)
        return acts

    def handle_advert(self, now: Seconds, adv: Advert,
                      diff: AddressDiff | None = None) -> tuple[list[Action], DropReason | None]:
        """The receive path's entry: an advert that passed decode and check_against, with
        its address-list difference. Under `strict_addresses` a differing advert (not from
        the owner) is dropped for the election, RFC 3768 7.1, but its sender stays a peer:
        listed, warned about, and counted as a second master if it claims mastership while
        we are master. Returns the actions and the drop reason, if dropped."""
        if diff is not None and self.config.strict_addresses and adv.priority != OWNER_PRIORITY:
            self._note_peer(now, adv, diff)
            if self.state is State.MASTER and adv.priority > 0:
                self._note_conflict(now)
            return [], DropReason.ADDRESS_MISMATCH
        return self.receive(now, adv, diff), None

    def receive(self, now: Seconds, adv: Advert,
                diff: AddressDiff | None = None) -> list[Action]:
        """An advertisement that passed decode and check_against (RFC 9568 6.4.2, 6.4.3)."""
        acts: list[Action] = []
        self.counters.adverts_received += 1
        self._note_peer(now, adv, diff)
        if adv.priority == 0:
            self.counters.priority_zero_received += 1
        elif self.holding_vips:
            self._release(acts)  # a successor is advertising: hand the VIPs over
        if self.state is State.BACKUP:
            self._backup_receive(now, adv)
        elif self.state is State.MASTER:
            self._master_receive(now, adv, acts)
        return acts

    def heard_again(self, now: Seconds, adv: Advert) -> bool:
        """The fast path of `receive`, for the common case: a BACKUP hearing the master it
        follows send the very advert it accepted last time (the receive path's memo hands
        back the same object), alone on the link. Does exactly what `receive` would (count,
        note the peer, push Master_Down_Timer later) and returns True; returns False,
        changing nothing, whenever anything else could happen (then call `receive`)."""
        src = adv.src
        if (self.state is not State.BACKUP or self.drains or self._timers.release is not None
                or adv is not self._last_followed or len(self.peers) != 1
                or self._expedited_at is not None
                or self._other_claim is not None or self._last_claim is None
                or self.vlan_silent_since is not None):
            return False
        # (the same advert object: its address object is the one learned; `is` first)
        master, claimed = self.master_address, self._last_claim[0]
        if (master is not src and master != src) or (claimed is not src and claimed != src):
            return False
        # the only peer (len is 1 above), without hashing an address object per packet
        peer = next(iter(self.peers.values()))
        if peer is not self._followed_peer:
            return False
        self.counters.adverts_received += 1
        if peer.first_not_link_local:  # the same advert: flagged as before, counted again
            self.counters.ipv6_not_link_local += 1
        peer.last_heard = now
        peer.adverts += 1
        self._last_claim = (src, now)
        self.master_heard_at = now
        self._timers.master_down_after(now, master_down_interval(  # (not drained)
            self.config.version, self.base_priority, self.master_adver_interval_cs))
        return True

    def note_split_brain(self, now: Seconds) -> None:
        """A peer says over the sync link that it is master too: a dual master however it
        was seen (alarm in status; the RFC rules resolve it on the LAN)."""
        if self._note_conflict(now):
            log.warning("%s: split brain: another master per the sync link", self.config.name)
        self.counters.split_brain_seen += 1

    def hold_takeover(self, now: Seconds) -> None:
        """Master_Down_Timer ran out but the master says over the sync link that it is
        alive and reaches the VLAN: the VLAN between us is broken. Stay BACKUP (policy
        "hold"), wait another Master_Down_Interval, report it."""
        if self.state is not State.BACKUP or self._timers.master_down is None:
            return
        self._timers.master_down = now + self.master_down_interval
        self.counters.vlan_silent_held += 1
        self.vlan_silent_since = self.vlan_silent_since or now
        log.warning("%s: master silent on this VLAN but alive on the sync link: holding "
                    "(VLAN broken between the nodes?)", self.config.name)

    def master_node_gone(self, now: Seconds) -> bool:
        """A second channel (the sync link) says the master's node went silent: take over
        once its adverts have missed two intervals (plus Skew_Time, so the best backup still
        goes first), not after the whole Master_Down_Interval (three). Only moves the
        Master_Down_Timer earlier; an advert heard meanwhile sets it back as usual, so a lost
        second channel alone never causes a takeover. Two, not one: with one, the only
        slack for a late advert would be Skew_Time, 8 ms for a priority 254 backup at 1 s
        adverts, and a master delayed that much while the sync link alone is down would
        see its backup take over and hand back (a lab run under load did it at 100 ms
        adverts and priority 100). True if the timer moved."""
        heard = self.master_heard_at if self.master_heard_at is not None else now
        return self._take_over_by(now, max(
            now, heard + 2 * cs_to_s(self.master_adver_interval_cs) + self.skew_time))

    def master_released(self, now: Seconds, immediate: bool) -> bool:
        """The master's node said over the sync link that it no longer serves this virtual
        router (its link went down, or it drained): as a priority 0 advert would (RFC 9568
        6.4.2),
        take over after Skew_Time, or at once when no other backup can exist (`immediate`:
        a pair). True if the Master_Down_Timer moved."""
        return self._take_over_by(now, now if immediate else now + self.skew_time)

    def _take_over_by(self, now: Seconds, at: Seconds) -> bool:
        """Move an undrained backup's Master_Down_Timer earlier, to `at` (never later)."""
        if self.state is not State.BACKUP or self.drains or self._timers.master_down is None:
            return False
        if at >= self._timers.master_down:
            return False
        self._timers.master_down = at
        self._expedited_at = now
        self.counters.fast_takeovers_armed += 1
        return True

    def set_link(self, now: Seconds, up: bool, cause: str = "interface down",
                 can_send: bool = False) -> list[Action]:
        """Interface carrier/admin state from netlink, or a tracker that faults the router
        (`cause` names it). `can_send`: the link itself still works, so a master says
        goodbye (priority 0) and its backup takes over after Skew_Time, not
        Master_Down_Interval."""
        acts: list[Action] = []
        if up == self.link_up:
            if not up and cause != self.fault_cause and self.state is State.FAULT:
                self.fault_cause = cause  # still faulted, now for this reason
            return acts
        self.link_up = up
        if not up:
            self.fault_cause = cause
            self._release(acts)
            if self.state is State.MASTER:
                if can_send:
                    self._send(acts, 0, now)
                acts.append(RemoveVips())
            if self.state is not State.FAULT:
                self._timers.clear()
                self._transition(now, State.FAULT, cause, acts)
            return acts
        if self.state is State.FAULT:
            self._timers.clear()
            acts += self.start(now, "interface up" if self.fault_cause == "interface down"
                               else f"{self.fault_cause}: cleared")
        return acts

    def set_priority(self, now: Seconds, priority: int) -> None:
        """Tracking or a demotion moved the effective priority (the node computes it; the
        owner's is never moved). Takes effect in the next advert sent and the next one
        compared: a backup that now outranks the master discards its adverts and takes
        over after Master_Down_Interval (preemption, RFC 9568 6.4.2); a master that now
        ranks below a backup is preempted by it."""
        if priority == self.base_priority:
            return
        self.base_priority = priority
        self._last_followed = None  # heard_again assumed the old priority
        if self.state is State.MASTER and not self.drains:
            self.master_priority = priority

    @property
    def io_failures_pending(self) -> bool:
        """Some I/O kind has failed since its last success (report_io has work to do)."""
        return bool(self._io_failures_in_row)

    def report_io(self, now: Seconds, ok: bool, what: str = "send") -> list[Action]:
        """Feedback from the adapters: a failed send or VIP install. Repeated failures of
        one kind while master give up mastership (as carp demotes itself on send errors);
        a success resets that kind only, so working sends do not hide failing installs."""
        acts: list[Action] = []
        if ok:
            self._io_failures_in_row.pop(what, None)
            return acts
        self.counters.io_failures += 1
        n = self._io_failures_in_row[what] = self._io_failures_in_row.get(what, 0) + 1
        if self.state is State.MASTER and n >= self.config.max_io_failures:
            acts.append(RemoveVips())
            self._timers.clear()
            self._transition(now, State.FAULT, f"{n} {what} failures", acts)
            self._timers.fault_retry = now + self.master_down_interval
        return acts

    def set_maintenance(self, now: Seconds, on: bool) -> list[Action]:
        """Drain (priority 0, VIPs handed over) or return to the election."""
        return self.set_drain(now, "maintenance", on)

    def set_drain(self, now: Seconds, reason: str, on: bool) -> list[Action]:
        """Add or clear a reason to stay out of the election. While any reason holds, the
        router advertises priority 0 once if it was master, listens as BACKUP and never
        takes over; when the last one clears it rejoins through INIT."""
        acts: list[Action] = []
        was = bool(self.drains)
        if on:
            self.drains.add(reason)
        else:
            self.drains.discard(reason)
        if was == bool(self.drains):
            return acts
        if self.drains:
            if self.state in (State.MASTER, State.BACKUP):
                acts += self.shutdown(now, f"{reason} on")
                self._enter_backup(now, f"{reason} on", acts)
            return acts
        if self.state is State.BACKUP:
            self._transition(now, State.INIT, f"{reason} off", acts)
            self._timers.clear()
            acts += self.start(now, f"{reason} off")
        return acts

    # ------------------------------------------------------------ internals

    def _backup_receive(self, now: Seconds, adv: Advert) -> None:
        if self.drains:
            self._learn_master(now, adv)
            return
        if adv.priority == 0:
            # RFC 9568 6.4.2: the master is leaving; wait Skew_Time only (or less, if the
            # sync link already said so: master_released)
            at = now + self.skew_time
            md = self._timers.master_down
            self._timers.master_down = at if md is None or md > at else md
            return
        holding = (self.config.preempt_delay > 0 and self._backup_since is not None
                   and now < self._backup_since + self.config.preempt_delay)
        if not self.config.preempt or adv.priority >= self.priority or holding:
            if self._expedited_at is not None:
                if now < self._expedited_at:
                    return  # older than the sync link's word: the takeover stands
                self._expedited_at = None  # heard since: the master is back on the LAN
            self._learn_master(now, adv)
            self._timers.master_down = now + self.master_down_interval
            # heard_again may take the next identical one, unless something about it
            # needs the full path each time (preemption pending, a differing list)
            if (adv.priority >= self.priority or not self.config.preempt) \
                    and self.peers[adv.src].address_diff is None:
                self._last_followed = adv
                self._followed_peer = self.peers[adv.src]
        # else: preempt on and a lower priority master: discard (its Master_Down_Timer runs)

    def _master_receive(self, now: Seconds, adv: Advert, acts: list[Action]) -> None:
        if adv.priority == 0:
            # RFC 9568 6.4.3: another router released; re-assert at once.
            self._send(acts, self.priority, now)
            self._timers.adver = self._next_advert(now)
            return
        if self._sender_wins(adv):
            self._learn_master(now, adv)
            acts.append(RemoveVips())
            self._timers.adver = self._timers.announce = None
            self._enter_backup(now, f"higher priority master {adv.src} ({adv.priority})", acts)
            return
        # RFC 9568 6.4.3: a lower priority (or losing tie) advert: send one at once so the
        # sender steps down and learning bridges see the right port. After a dual-master
        # episode, re-announce the VIPs so hosts that followed the other master come back.
        # Within one interval of our own takeover it is the previous master's last advert,
        # sent before ours reached it (a preemption's adverts cross): answered, not an
        # episode. A master that goes on advertising is counted at its next advert.
        t = self.last_transition
        crossed = (t is not None and t.new is State.MASTER
                   and now - t.at < self.advertisement_interval)
        fresh = False if crossed else self._note_conflict(now)
        # A master resuming from a hang drains a queue of stale adverts at one instant:
        # answer once per quarter interval, not once per queued packet.
        if self._last_sent_at is None or now - self._last_sent_at >= (
                self.advertisement_interval / 4):
            self._send(acts, self.priority, now)
            self._timers.adver = self._next_advert(now)
        if fresh:
            log.info("%s: lower priority master %s (%d) heard while MASTER", self.config.name,
                     adv.src, adv.priority)
            if self.config.reannounce_on_lower:
                self._announce_round = 0
                self._announce(now, acts)

    def _sender_wins(self, adv: Advert) -> bool:
        if adv.priority != self.priority:
            return adv.priority > self.priority
        # RFC 9568 6.4.3: equal priority, compare primary addresses as unsigned integers
        if self.primary_address is None:
            return False
        return adv.src.packed > self.primary_address.packed

    def _learn_master(self, now: Seconds, adv: Advert) -> None:
        self._last_followed = None  # _backup_receive sets it again when it may
        self.vlan_silent_since = None
        self.master_address = adv.src
        self.master_priority = adv.priority
        self.master_heard_at = now
        if self.config.version == 3:
            # RFC 9568 6.4.2: Master_Adver_Interval from the advert (v2 was checked equal)
            self.master_adver_interval_cs = adv.interval_cs

    def _note_peer(self, now: Seconds, adv: Advert, diff: AddressDiff | None) -> None:
        peer = self.peers.pop(adv.src, None)  # re-inserted last: the dict stays in age order
        if peer is None:
            peer = PeerInfo(adv.priority, adv.version, adv.interval_cs, adv.checksum_variant,
                            now, address_diff=diff,
                            first_not_link_local=adv.first_not_link_local)
        else:
            peer.priority, peer.version, peer.interval_cs = (adv.priority, adv.version,
                                                             adv.interval_cs)
            peer.checksum, peer.last_heard, peer.address_diff = adv.checksum_variant, now, diff
            peer.first_not_link_local = adv.first_not_link_local
        peer.adverts += 1
        self.peers[adv.src] = peer
        self._forget_old_peers(now)
        if adv.first_not_link_local:
            self.counters.ipv6_not_link_local += 1
        if diff is not None:
            self.counters.address_mismatch += 1
            self._warn_mismatch(now, adv, peer, diff)
        if adv.priority > 0:
            self._note_claim(now, adv.src)

    def _forget_old_peers(self, now: Seconds) -> None:
        while self.peers:
            src, oldest = next(iter(self.peers.items()))
            if len(self.peers) <= MAX_PEERS and (
                    oldest.last_heard is now  # one peer only, just heard: nothing to do
                    or now - oldest.last_heard <= PEER_TTL  # the common case
                    or now - oldest.last_heard <= 3 * self.master_down_interval):
                return
            ttl = max(PEER_TTL, 3 * self.master_down_interval)
            del self.peers[src]
            if src == self.master_address and now - oldest.last_heard <= ttl:
                self.peers[src] = oldest  # the master we follow stays listed, however many
                continue                  # others speak (it is the newest again)
            self.counters.peers_forgotten += 1

    def _warn_mismatch(self, now: Seconds, adv: Advert, peer: PeerInfo,
                       diff: AddressDiff) -> None:
        """One WARNING per peer and minute (or at once when the difference changes)."""
        if (peer.warned_diff == diff and peer.warned_at is not None
                and now - peer.warned_at < MISMATCH_WARN_INTERVAL):
            return
        peer.warned_at, peer.warned_diff = now, diff
        log.warning("%s: peer %s (priority %d) advertises [%s], ours [%s]: missing there %s, "
                    "extra there %s (%s)", self.config.name, adv.src, adv.priority,
                    ", ".join(str(a) for a in adv.addresses),
                    ", ".join(str(a) for a in sorted_addresses(self.config.addresses)),
                    [str(a) for a in diff.missing] or "none",
                    [str(a) for a in diff.extra] or "none",
                    "dropped: address_check strict" if self.config.strict_addresses
                    else "accepted: address_check relaxed")

    def mismatched_peers(self, now: Seconds) -> list[IPAddress]:
        """Peers heard recently whose address list differs from ours."""
        horizon = 3 * self.master_down_interval
        return [a for a, p in self.peers.items()
                if p.address_diff is not None and now - p.last_heard <= horizon]

    def _note_claim(self, now: Seconds, src: IPAddress) -> None:
        """Two different senders claiming mastership within one Master_Down_Interval, heard
        while BACKUP, are two masters. Constant work per advert, whatever the peer count."""
        last = self._last_claim
        if last is not None and last[0] is not src and last[0] != src:
            self._other_claim = self._last_claim
        self._last_claim = (src, now)
        other = self._other_claim
        if (self.state is State.BACKUP and other is not None
                and now - other[1] < self.master_down_interval):
            self._note_conflict(now)

    def _note_conflict(self, now: Seconds) -> bool:
        """Two masters seen; True when this starts a new episode (counted once)."""
        fresh = (self.last_conflict_at is None
                 or now - self.last_conflict_at > self.master_down_interval)
        if fresh:
            self.counters.dual_master_episodes += 1
        self.last_conflict_at = now
        return fresh

    def _enter_backup(self, now: Seconds, cause: str, acts: list[Action]) -> None:
        self._transition(now, State.BACKUP, cause, acts)
        self._backup_since = now
        # A drained router (maintenance, group fault) never arms a takeover, however it
        # got here: startup, a link coming back, a fault retry.
        self._timers.master_down = None if self.drains else now + self.master_down_interval

    def _become_master(self, now: Seconds, cause: str, acts: list[Action]) -> None:
        silent = (now - self.master_heard_at if self.state is State.BACKUP
                  and self.master_heard_at is not None else None)
        self._timers.master_down = None
        self._timers.release = None  # still holding from a release: keep them
        self.master_address = self.primary_address
        self.master_priority = self.priority
        self.master_heard_at = now
        self.master_adver_interval_cs = self.config.advert_interval_cs
        self._transition(now, State.MASTER, cause, acts)
        if self.last_transition is not None:
            self.last_transition.master_silent = silent
        self.counters.became_master += 1
        acts.append(AddVips(accept_mode=self.config.accept_mode))
        self._send(acts, self.priority, now)
        self._timers.adver = self._next_advert(now)
        self._announce_round = 0
        self._announce(now, acts)

    def _announce(self, now: Seconds, acts: list[Action]) -> None:
        self._announce_round += 1
        acts.append(Announce(round=self._announce_round))
        if self._announce_round < self.config.garp_count:
            self._timers.announce = now + self.config.garp_interval
        elif self.config.garp_refresh is not None:
            self._timers.announce = now + self.config.garp_refresh
        else:
            self._timers.announce = None

    def _send(self, acts: list[Action], priority: int, now: Seconds) -> None:
        self._last_sent_at = now
        self.counters.adverts_sent += 1
        if priority == 0:
            self.counters.priority_zero_sent += 1
        acts.append(SendAdvert(priority=priority, interval_cs=self.config.advert_interval_cs))

    def _transition(self, now: Seconds, new: State, cause: str, acts: list[Action]) -> None:
        old = self.state
        if new not in _ALLOWED[old]:
            raise TransitionError(f"{self.config.name}: {old.value} -> {new.value} ({cause})")
        self.state = new
        self._last_followed = None  # see heard_again
        self._expedited_at = None
        self.counters.transitions += 1
        self.last_transition = LastTransition(old, new, cause, now)
        log.info("%s: %s -> %s (%s)", self.config.name, old.value, new.value, cause)
        acts.append(Transitioned(old.value, new.value, cause, self.master_address))
