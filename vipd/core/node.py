"""The node: every virtual router of one vipd, as one pure core. Events in, one queue of
actions out, one `get_timer()` (the shape of aioquic's connection).

Events: datagrams per interface and family with their reception time (`receive`), timer
expiry (`handle_timer`), links and their addresses (`set_link`, `set_addresses`,
`set_vmac`), I/O outcomes (`vips_applied`, `advert_sent`, `vips_repaired`), control
commands (`set_maintenance`, `shutdown`) and a new configuration (`plan_reload`,
`retire`, `adopt`). Actions (`pop_actions`): send these bytes, the kernel should (not) hold a
router's VIPs, check and repair them, announce them, a transition happened.

What it owns: receive demultiplexing and drop accounting (vipd.core.receive, the same copy
the simulated segment drives), the mode policy (incremental, vipd.core.policy), the owner
rules, the reload diff and the order "VIPs installed, then announced". Router outcomes
that call for more work (a group drain) go on a work list handled in a loop: no recursion.

Timers: routers due at the same instant share one bucket; a router keeps its bucket while
its deadline only moves later (a backup's Master_Down_Timer, pushed at every advert) and is
re-filed when the bucket comes due. Work per event is what it touches, never all routers.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from ipaddress import IPv4Interface, IPv6Interface

from vipd.core.actions import Action as RouterAction
from vipd.core.actions import AddVips, Announce, RemoveVips, SendAdvert, Transitioned
from vipd.core.advert import encode_advert, receiver_view
from vipd.core.batch import newest_per_key
from vipd.core.packet import AddressDiff, Advert, DropReason, IPAddress, IpMeta, ReceiverView
from vipd.core.policy import GROUP_FAULT, GroupPolicy
from vipd.core.receive import Dropped, Receiver
from vipd.core.router import OWNER_PRIORITY, RouterConfig, State, VirtualRouter
from vipd.core.track import NODE, Effective, TrackerSpec, TrackRef, TrackState, effective

Key = tuple[str, int, int]  # interface, vrid, family
IPInterface = IPv4Interface | IPv6Interface
VIP_INSTALL = "VIP install"


# ---------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Send:
    """Send this advert for the router (its virtual MAC's socket if it has one)."""

    key: Key
    payload: bytes
    src: IPAddress
    dst: IPAddress | None = None  # a unicast peer; None: the VRRP multicast group


@dataclass(frozen=True, slots=True)
class SetVips:
    """Desired state: the kernel should (present) or should not hold the router's VIPs.
    Answer with `vips_applied`."""

    key: Key
    present: bool


@dataclass(frozen=True, slots=True)
class RepairVips:
    """Read what the kernel holds and put back the router's missing VIPs. Answer with
    `vips_repaired` (or `vips_applied(..., ok=False)`)."""

    key: Key


@dataclass(frozen=True, slots=True)
class AnnounceVips:
    """One round of gratuitous ARP / unsolicited NA for the router's VIPs."""

    key: Key


@dataclass(frozen=True, slots=True)
class CommitFlows:
    """Write the peers' connection state (the sync cache) into the kernel. Comes before
    the SetVips of a takeover, which the executor carries out in order; answer with
    `flows_committed`."""


@dataclass(frozen=True, slots=True)
class TellPeers:
    """A master of ours stopped serving (FAULT, or drained by a group fault or maintenance):
    tell the peers over the sync link now, so the best backup takes over without waiting
    for Master_Down_Interval or Skew_Time (`released()`)."""


@dataclass(frozen=True, slots=True)
class Alarm:
    """Two masters for a virtual router began (on the LAN or per the sync link): for the
    notify hooks (logged and counted by the router already)."""

    key: Key
    what: str


@dataclass(frozen=True, slots=True)
class ViewChanged:
    """Our view of a virtual router changed: the peers get it over the sync link."""

    wire_id: bytes
    view: bytes  # state code, effective priority, link usable (one byte each)


STATE_CODES = {State.INIT.value: 0, State.BACKUP.value: 1, State.MASTER.value: 2,
               State.FAULT.value: 3}
MASTER_CODE = STATE_CODES[State.MASTER.value]


@dataclass(frozen=True, slots=True)
class Transition:
    """A router changed state (for logs, notify hooks, metrics)."""

    key: Key
    old: str
    new: str
    cause: str


NodeAction = (Send | SetVips | RepairVips | AnnounceVips | CommitFlows | TellPeers
              | ViewChanged | Alarm | Transition)
SYNC_DRAIN = "bulk sync"


# ---------------------------------------------------------------- state


@dataclass(frozen=True)
class RouterSpec:
    """One virtual router as configured: where it runs and what it holds."""

    vlan: str
    interface: str
    config: RouterConfig
    vips: tuple[IPInterface, ...]
    virtual_mac: bool = False
    bucket: int | None = None  # all-active: master of this router = owner of the bucket
    # unicast peers (keepalived's unicast_peer): adverts go to each, and only theirs count
    peers: tuple[IPAddress, ...] = ()
    # what may change without restarting the router (a reload updates them in place):
    # the group it moves with ("node": every router of the node; None: alone) and the
    # trackers it follows
    group: str | None = field(default=None, compare=False)
    track: tuple[TrackRef, ...] = field(default=(), compare=False)

    @property
    def key(self) -> Key:
        return (self.interface, self.config.vrid, self.config.family)


@dataclass(eq=False)
class Slot:
    """One virtual router in the node: the RFC state machine plus what the node tracks."""

    spec: RouterSpec
    router: VirtualRouter
    key: Key
    view: ReceiverView
    drops: Counter[DropReason] = field(default_factory=Counter)
    vmac_ready: bool = False  # its virtual-MAC link exists (only matters with virtual_mac)
    started: bool = False
    installing: bool = False  # an install of its VIPs was asked and not yet answered
    announce_after_install: bool = False
    retry_at: Fraction | None = None  # a failed install is tried again then
    # all-active: a bucket won while a peer still says it owns it waits for the peer's
    # release (its view over the sync link), at most until retry_at, so no two members
    # own it at once
    awaiting_release: bool = False
    released_view_due: bool = False  # its view goes out once the removal is applied
    vips_repaired: int = 0
    group: str | None = None  # the group it moves with (see Node._index)
    effective: Effective | None = None  # its priority explained (tracking, demotion)
    track_faults: tuple[str, ...] = ()  # trackers that hold it in FAULT
    armed: tuple[Fraction, bool] | None = None  # the timer bucket it is filed in
    # the last advert encoded: its fields, then one payload per destination (the group, or
    # each unicast peer: the checksum covers the destination)
    advert: tuple[tuple[int, int, IPAddress], tuple[bytes, ...]] | None = None

    @property
    def owner(self) -> bool:
        return self.router.config.priority == OWNER_PRIORITY

    @property
    def vips(self) -> tuple[IPInterface, ...]:
        return self.spec.vips

    @property
    def wire_id(self) -> bytes:
        """The virtual router's name between nodes: VRID, family and first address (the
        same on every node of the cluster, whatever the interfaces are called)."""
        c = self.router.config
        return bytes([c.vrid, c.family]) + c.addresses[0].packed


def make_slot(spec: RouterSpec) -> Slot:
    return Slot(spec, VirtualRouter(spec.config), spec.key,
                receiver_view(spec.config, spec.peers))


@dataclass(eq=False)
class Link:
    """What the node knows of one interface: up or down, and its own addresses."""

    name: str
    up: bool = False
    own: frozenset[IPAddress] = frozenset()
    primary: dict[int, IPAddress | None] = field(default_factory=lambda: {4: None, 6: None})
    drops: dict[int, Counter[DropReason]] = field(
        default_factory=lambda: {4: Counter(), 6: Counter()})
    receivers: dict[int, Receiver[Slot]] = field(
        default_factory=lambda: {4: Receiver(), 6: Receiver()})
    slots: dict[Key, Slot] = field(default_factory=dict)


@dataclass
class ReloadPlan:
    slots: dict[Key, Slot]
    kept: set[Key]
    mode: str
    trackers: dict[str, TrackerSpec]

    def added(self) -> list[Slot]:
        return [s for k, s in self.slots.items() if k not in self.kept]


@dataclass
class Stats:
    """Work counters: unit tests assert on them (work per event, not seconds)."""

    router_calls: int = 0  # calls into a router that may change it
    timer_buckets: int = 0  # buckets created


Packet = tuple[bytes, IpMeta, Fraction]  # payload, IP metadata, reception time

COARSE_PER_S = 20  # see Node._deadline
COARSE_S = Fraction(1, COARSE_PER_S)

IFA_F_SECONDARY = 0x01  # linux/if_addr.h
IFA_F_TENTATIVE = 0x40


def primary_address(addrs: list[tuple[IPInterface, int]], family: int,
                    exclude: set[IPAddress]) -> IPAddress | None:
    """The address a VRRP speaker sends from: the first primary IPv4 address, or the IPv6
    link-local (RFC 9568 5.1.2.1), never one of our VIPs."""
    for iface, flags in addrs:
        ip = iface.ip
        if ip.version != family or ip in exclude:
            continue
        if family == 4 and not flags & IFA_F_SECONDARY:
            return ip
        if family == 6 and ip.is_link_local and not flags & IFA_F_TENTATIVE:
            return ip
    return None


class Node:
    def __init__(self, specs: Iterable[RouterSpec], mode: str,
                 commit_before_vips: bool = False, watch: Iterable[str] = (),
                 trackers: Iterable[TrackerSpec] = ()) -> None:
        self.mode = mode
        # all-active: interfaces with no router of their own whose loss drains every
        # router of the node (the VLANs the buckets' traffic crosses)
        self.watched = tuple(watch)
        # connection-state sync: a takeover commits the peers' flows before its VIPs go up
        self.commit_before_vips = commit_before_vips
        self._commit_asked = False
        self.sync_ready = not commit_before_vips
        self.slots: dict[Key, Slot] = {}
        self.links: dict[str, Link] = {}
        # the groups whose routers move together (vipd.core.policy), by name
        self.policies: dict[str, GroupPolicy] = {}
        self._members: dict[str, dict[Key, Slot]] = {}
        # tracking: the trackers, their states, who follows each, and the demotion counters
        # (by target: "node" or a group; they outlive a reload)
        self.trackers: dict[str, TrackerSpec] = {t.name: t for t in trackers}
        self.track_states: dict[str, TrackState] = {}
        self.demotions: dict[str, int] = {}
        self._followers: dict[str, dict[Key, Slot]] = {}
        self._iface_trackers: dict[str, list[str]] = {}
        self.stopping = False
        self.stats = Stats()
        self._actions: deque[NodeAction] = deque()
        self._buckets: dict[tuple[Fraction, bool], dict[int, Slot]] = {}
        # (float deadline, deadline, takeover): floats order the heap fast; the exact
        # deadline names the bucket
        self._heap: list[tuple[float, Fraction, bool]] = []
        self._grid: dict[int, Fraction] = {}  # coarse grid points in use, by tick
        self._by_vip: dict[IPAddress, Slot] = {}
        self._by_wire: dict[bytes, Slot] = {}
        self._released: dict[bytes, Slot] = {}  # our routers not serving, by wire id
        self._peer_views: dict[bytes, dict[int, bytes]] = {}  # wire id -> node -> view
        self.split_brains = 0
        # when a backup's Master_Down_Timer runs out while a peer says over the sync link
        # that it is master and reaches the VLAN: "takeover" (RFC 9568) or "hold"
        self.on_vlan_silent = "takeover"
        self._install(make_slot(s) for s in specs)
        for name in self.watched:
            self.links.setdefault(name, Link(name))
        self._index(Fraction(0))
        self.release_waits = 0  # buckets taken after waiting for the previous owner
        self.release_timeouts = 0  # ... of which the previous owner never said so

    # ------------------------------------------------------------ queries

    def pop_actions(self) -> Iterator[NodeAction]:
        """What to do, in order. Events fed while iterating add to the same queue."""
        q = self._actions
        while q:
            yield q.popleft()

    def next_timer(self) -> tuple[Fraction, bool] | None:
        """The next deadline, and whether it is a takeover (see `timer_is_takeover`)."""
        return self._head()

    def get_timer(self) -> Fraction | None:
        """The next deadline of any router (or retry), or None."""
        head = self._head()
        return head[0] if head else None

    def timer_is_takeover(self) -> bool:
        """The next deadline is some router's Master_Down_Timer: the driver wakes for it
        precisely, and reads pending adverts first."""
        head = self._head()
        return bool(head and head[1])

    @property
    def holding_vips(self) -> bool:
        """A released master still holds its VIPs for a successor (do not exit yet)."""
        return any(s.router.holding_vips for s in self._all_slots())

    def slot_of_vip(self, ip: IPAddress) -> Slot | None:
        """The (non-owner) router a VIP belongs to."""
        return self._by_vip.get(ip)

    def denied_vips(self) -> set[IPAddress]:
        """RFC 9568 Accept_Mode False: the VIPs a non-owner master must not accept traffic
        for (desired state of the nftables guard)."""
        return {v.ip for s in self.slots.values()
                if not s.router.config.accept_mode and not s.owner for v in s.vips}

    def interfaces(self) -> list[str]:
        return list(self.links)

    # ------------------------------------------------------------ links

    def set_addresses(self, ifname: str, addrs: list[tuple[IPInterface, int]]) -> None:
        """The interface's addresses with their IFA_F_* flags, as the kernel holds them.
        Our own VIPs are not our own addresses, and never an advert's source."""
        link = self.links.get(ifname)
        if link is None:
            return
        vips = {v.ip for s in link.slots.values() if not s.owner for v in s.vips}
        own = frozenset(a.ip for a, _ in addrs if a.ip not in vips)
        if own != link.own:
            link.own = own
            for receiver in link.receivers.values():
                receiver.forget()
        for fam in (4, 6):
            link.primary[fam] = primary_address(addrs, fam, vips)
        for slot in link.slots.values():
            slot.router.primary_address = link.primary[slot.router.config.family]

    def set_link(self, now: Fraction, ifname: str, up: bool) -> None:
        """Carrier or admin state of an interface changed (or was first learned)."""
        link = self.links.get(ifname)
        if link is None:
            return
        link.up = up
        for slot in link.slots.values():
            self._follow_link(now, slot)
        if ifname in self.watched and self.mode == "all-active":
            policy = self.policies.get(NODE)
            if policy is not None:
                was = policy.active
                policy.link(ifname, up)
                if policy.active != was:
                    self._drain_group(now, NODE, policy.active)
        for name in self._iface_trackers.get(ifname, ()):
            self.set_track(now, name, TrackState(ok=up))

    def set_vmac(self, now: Fraction, key: Key, ready: bool) -> None:
        """A router's virtual-MAC link was made (or vanished with its parent)."""
        slot = self.slots.get(key)
        if slot is not None:
            slot.vmac_ready = ready
            self._follow_link(now, slot)

    def _usable(self, slot: Slot) -> bool:
        link = self.links[slot.spec.interface]
        return link.up and (not slot.spec.virtual_mac or slot.vmac_ready) \
            and not slot.track_faults

    def _fault_cause(self, slot: Slot) -> str:
        if self.links[slot.spec.interface].up and slot.track_faults:
            return f"track {slot.track_faults[0]}"
        return "interface down"

    def _follow_link(self, now: Fraction, slot: Slot) -> None:
        if not slot.started:
            return
        usable = self._usable(slot)
        r = slot.router
        cause = "interface down" if usable else self._fault_cause(slot)
        if r.link_up != usable or (not usable and r.fault_cause != cause):
            # a tracker's fault on a working link: a master can still say goodbye
            goodbye = bool(slot.track_faults) and self.links[slot.spec.interface].up
            self._run(now, slot, r.set_link(now, usable, cause, can_send=goodbye))

    # ------------------------------------------------------------ tracking

    def set_track(self, now: Fraction, name: str, state: TrackState) -> None:
        """A tracker's state changed (an interface, a script's rise/fall, a file's number):
        the routers that follow it, and only they, are re-prioritized."""
        if self.track_states.get(name) == state:
            return
        self.track_states[name] = state
        for slot in list(self._followers.get(name, {}).values()):
            self._reprioritize(now, slot)

    def set_demotion(self, now: Fraction, target: str, count: int) -> None:
        """`vipctl demote`: the node's counter (every router) or a group's."""
        if count:
            self.demotions[target] = count
        else:
            self.demotions.pop(target, None)
        slots = self.slots if target == NODE else self._members.get(target, {})
        for slot in list(slots.values()):
            self._reprioritize(now, slot)

    def groups(self) -> list[str]:
        return sorted(self._members)

    def follower_count(self, tracker: str) -> int:
        return len(self._followers.get(tracker, ()))

    def _reprioritize(self, now: Fraction, slot: Slot) -> None:
        demotions = [(NODE, self.demotions.get(NODE, 0))]
        group = slot.group
        if group is not None and group != NODE:
            demotions.append((f"group {group}", self.demotions.get(group, 0)))
        eff = slot.effective = effective(slot.router.config.priority, slot.spec.track,
                                         self.trackers, self.track_states, tuple(demotions))
        r = slot.router
        if r.base_priority != eff.priority:
            self.stats.router_calls += 1
            r.set_priority(now, eff.priority)
            if self.commit_before_vips and slot.started and self.slots.get(slot.key) is slot:
                self._actions.append(self._view(slot, r.state.value))
        if eff.faults != slot.track_faults:
            slot.track_faults = eff.faults
            self._follow_link(now, slot)

    # ------------------------------------------------------------ routers

    def start(self, now: Fraction, keys: Iterable[Key] | None = None,
              cause: str = "startup") -> None:
        for key in (self.slots if keys is None else keys):
            slot = self.slots[key]
            slot.started = True
            if not self.sync_ready:
                slot.router.drains.add(SYNC_DRAIN)
            if not self._usable(slot):
                slot.router.link_up = False
                slot.router.fault_cause = self._fault_cause(slot)
            self._run(now, slot, slot.router.start(now, cause))

    def receive(self, ifname: str, family: int, packets: Iterable[Packet]) -> None:
        """Datagrams read from one interface's socket for one family, oldest first, each
        dated by its reception. Validate all, keep each sender's newest, then deliver
        (vipd.core.batch explains why in that order)."""
        link = self.links.get(ifname)
        if link is None:
            return
        slots = self.slots

        def lookup(vrid: int) -> tuple[Slot, ReceiverView] | None:
            s = slots.get((ifname, vrid, family))
            return (s, s.view) if s is not None else None

        def current(s: Slot) -> bool:
            return slots.get(s.key) is s

        check = link.receivers[family].check
        valid: list[tuple[Slot, Advert, AddressDiff | None, Fraction]] = []
        for payload, meta, at in packets:
            got = check(payload, meta, link.own, lookup, current)
            if isinstance(got, Dropped):
                target = got.target
                (target.drops if target is not None else link.drops[family])[got.reason] += 1
                continue
            valid.append((got[0], got[1], got[2], at))
        # most batches hold one advert per router: then no sender's address is hashed
        if len({id(v[0]) for v in valid}) == len(valid):
            kept = valid
        else:
            kept, superseded = newest_per_key(valid, key=lambda v: (v[0].key, v[1].src))
            link.drops[family][DropReason.SUPERSEDED] += superseded
        for slot, adv, diff, at in kept:
            self.stats.router_calls += 1
            if slot.router.heard_again(at, adv):
                continue  # a backup's Master_Down_Timer moved later: its timer bucket stays
            episodes = slot.router.counters.dual_master_episodes
            acts, dropped = slot.router.handle_advert(at, adv, diff)
            if slot.router.counters.dual_master_episodes != episodes:
                self._actions.append(Alarm(slot.key, "two masters heard"))
            if dropped is not None:
                slot.drops[dropped] += 1
            self._run(at, slot, acts)

    def handle_timer(self, now: Fraction) -> None:
        """Run every router whose deadline is at or before `now`."""
        heap = self._heap
        while heap and heap[0][1] <= now:
            _, at, takeover = heapq.heappop(heap)
            for slot in self._buckets.pop((at, takeover), {}).values():
                slot.armed = None
                self._fire(now, slot)

    def _fire(self, now: Fraction, slot: Slot) -> None:
        if self.slots.get(slot.key) is not slot and not slot.router.holding_vips:
            return  # replaced by a reload and done
        if slot.retry_at is not None and now >= slot.retry_at:
            slot.retry_at = None
            if slot.awaiting_release:  # the previous owner never said it let go
                if slot.router.state is State.MASTER:
                    self.release_timeouts += 1
                self.forget_release_wait(slot)
            elif slot.router.state is State.MASTER and not slot.installing:
                self._ask_install(slot, now)
        deadline = slot.router.get_timer()
        if deadline is None or deadline > now:
            self._schedule(slot, now)  # woken before its deadline (moved later, or coarse)
            return
        md = slot.router.master_down_timer
        if md is not None and md <= now and self.on_vlan_silent == "hold" \
                and self.peer_master_with_link(slot) is not None:
            # the master is alive and on the VLAN by its own word: the VLAN between us is
            # broken; becoming a second master would split it (reported, counted)
            slot.router.hold_takeover(now)
        self.stats.router_calls += 1
        self._run(now, slot, slot.router.handle_timer(now))

    # ------------------------------------------------------------ I/O outcomes

    def advert_sent(self, now: Fraction, key: Key, ok: bool) -> None:
        """Report a send when it failed, or when `io_pending(key)` says a success counts."""
        slot = self.slots.get(key)
        if slot is not None:
            self._run(now, slot, slot.router.report_io(now, ok, "send"))

    def io_pending(self, key: Key) -> bool:
        slot = self.slots.get(key)
        return slot is not None and slot.router.io_failures_pending

    def vips_applied(self, now: Fraction, key: Key, present: bool, ok: bool,
                     slot: Slot | None = None) -> None:
        """The outcome of a SetVips (or of a RepairVips that failed). `slot` names a router
        a reload replaced, whose removal was still under way."""
        slot = slot or self.slots.get(key)
        if slot is None:
            return
        if not present:
            if slot.released_view_due:  # a bucket given up: now the peers may take it
                slot.released_view_due = False
                self._actions.append(self._view(slot, slot.router.state.value))
            return  # a failed removal is logged by the executor; nothing to decide here
        slot.installing = False
        if not ok:
            slot.announce_after_install = False
            self._run(now, slot, slot.router.report_io(now, False, VIP_INSTALL))
            if slot.router.state is State.MASTER:  # try again, one interval later
                slot.retry_at = now + slot.router.advertisement_interval
                self._schedule(slot, now)
            return
        if slot.router.io_failures_pending:
            slot.router.report_io(now, True, VIP_INSTALL)
        if slot.announce_after_install:  # the order: VIPs installed, then announced
            slot.announce_after_install = False
            if slot.router.state is State.MASTER:
                self._actions.append(AnnounceVips(key))

    def flows_committed(self) -> None:
        """The commit asked by CommitFlows is done (or failed: the VIPs go up anyway, a
        takeover without state beats none)."""
        self._commit_asked = False

    def master_node_gone(self, now: Fraction, addresses: Iterable[IPAddress]) -> int:
        """The sync link says the node owning these (VLAN) addresses went silent: every
        backup following a master at one of them takes over after two missed adverts
        (VirtualRouter.master_node_gone). Returns how many routers were expedited."""
        gone = set(addresses)
        n = 0
        for slot in self.slots.values():
            r = slot.router
            if r.master_address in gone and r.master_node_gone(now):
                self._schedule(slot, now)
                n += 1
        return n

    def released(self) -> list[bytes]:
        """Wire ids of our routers that will not serve (FAULT or drained): what a peer's
        backups need not wait for."""
        return list(self._released)

    def peer_released(self, now: Fraction, ids: Iterable[bytes],
                      addresses: Iterable[IPAddress], immediate: bool) -> int:
        """A peer (its VLAN addresses given) says these routers of its are in FAULT: our
        backups following it there take over (VirtualRouter.master_released). O(ids)."""
        theirs = set(addresses)
        n = 0
        for wid in ids:
            slot = self._by_wire.get(wid)
            if slot is None or slot.router.master_address not in theirs:
                continue
            if slot.router.master_released(now, immediate):
                self._schedule(slot, now)
                n += 1
        return n

    def peer_view(self, now: Fraction, node_id: int, wid: bytes, view: bytes) -> None:
        """A peer's view of one virtual router (over the sync link). O(1)."""
        slot = self._by_wire.get(wid)
        if slot is None or len(view) < 3:
            return
        views = self._peer_views.setdefault(wid, {})
        views[node_id] = view
        if view[0] == MASTER_CODE:
            if slot.spec.bucket is None:
                self._check_split_brain(slot, now)
        else:
            self._release_heard(slot)

    def forget_peer_views(self, node_id: int) -> None:
        """A peer went silent on the sync link: what it said is no longer its word. A
        bucket waiting for that peer's release is taken now (its adverts stopped too, or
        the VRRP rules would not have made us master). O(routers), once per peer lost."""
        for wid, views in self._peer_views.items():
            if views.pop(node_id, None) is not None:
                slot = self._by_wire.get(wid)
                if slot is not None:
                    self._release_heard(slot)

    def _release_heard(self, slot: Slot) -> None:
        """A waiting bucket proceeds once no peer claims it any more."""
        if slot.awaiting_release and self.peer_master_with_link(slot) is None:
            self.forget_release_wait(slot)

    def forget_release_wait(self, slot: Slot) -> None:
        """The previous owner let go of the bucket (or is gone): own it now."""
        if not slot.awaiting_release:
            return
        slot.awaiting_release, slot.retry_at = False, None
        if slot.router.state is State.MASTER:
            self._actions.append(SetVips(slot.key, True))

    def peer_master_with_link(self, slot: Slot) -> int | None:
        """A peer that says over the sync link it is master of this router and can reach
        its VLAN (its node id), or None."""
        for node_id, view in self._peer_views.get(slot.wire_id, {}).items():
            if view[0] == MASTER_CODE and view[2]:
                return node_id
        return None

    def _check_split_brain(self, slot: Slot, now: Fraction | None = None) -> None:
        if slot.router.state is not State.MASTER:
            return
        other = self.peer_master_with_link(slot)
        if other is None:
            return
        at = now if now is not None else slot.router.master_heard_at or Fraction(0)
        episodes = slot.router.counters.dual_master_episodes
        slot.router.note_split_brain(at)
        self.split_brains += 1
        if slot.router.counters.dual_master_episodes != episodes:
            self._actions.append(Alarm(slot.key, "split brain (per the sync link)"))

    def own_addresses(self) -> list[IPAddress]:
        """This node's addresses on its VLANs (the primaries its adverts come from)."""
        return [a for link in self.links.values() for a in link.primary.values()
                if a is not None]

    def set_sync_ready(self, now: Fraction, ready: bool) -> None:
        """Until this node has the peers' connection state (its bulk sync is done), it
        stays out of every election, so it cannot win one in which it would lose flows
        (pfsync's idea). O(routers), once at start."""
        if ready == self.sync_ready:
            return
        self.sync_ready = ready
        for slot in self.slots.values():
            self.stats.router_calls += 1
            self._run(now, slot, slot.router.set_drain(now, SYNC_DRAIN, not ready))

    def vip_missing(self, key: Key) -> None:
        """One of the router's VIPs left the kernel (someone removed it)."""
        slot = self.slots.get(key)
        if slot is not None and not self.stopping and slot.router.state is State.MASTER:
            self._actions.append(RepairVips(key))

    def vips_repaired(self, key: Key, count: int) -> None:
        slot = self.slots.get(key)
        if slot is None or count == 0:
            return
        slot.vips_repaired += count
        if slot.router.state is State.MASTER:
            self._actions.append(AnnounceVips(key))

    def resynced(self) -> None:
        """The view of the kernel was rebuilt: every master checks its VIPs."""
        for slot in self.slots.values():
            if slot.router.state is State.MASTER:
                self._actions.append(RepairVips(slot.key))

    # ------------------------------------------------------------ commands

    def set_maintenance(self, now: Fraction, on: bool) -> None:
        for slot in self.slots.values():
            self._run(now, slot, slot.router.set_maintenance(now, on))

    def shutdown(self, now: Fraction) -> None:
        """Release mastership everywhere (priority 0); VIPs are held for a successor until
        each router's release time (`holding_vips`)."""
        self.stopping = True
        for slot in self.slots.values():
            self._run(now, slot, slot.router.shutdown(now))

    def plan_reload(self, specs: Iterable[RouterSpec], mode: str,
                    trackers: Iterable[TrackerSpec] | None = None) -> ReloadPlan:
        """The reload diff: routers whose configuration did not change keep their state and
        timers (a change of their group or trackers only re-prioritizes them); the others
        are replaced. Touches nothing."""
        new = {s.key: make_slot(s) for s in specs}
        kept = {k for k, old in self.slots.items()
                if (n := new.get(k)) is not None and n.spec == old.spec}
        return ReloadPlan(new, kept, mode, dict(self.trackers) if trackers is None
                          else {t.name: t for t in trackers})

    def retire(self, now: Fraction, plan: ReloadPlan) -> list[Slot]:
        """First half of a reload: shut down the routers the plan does not keep and release
        their VIPs now (the replacement starts afresh). Returns them; carry out their
        actions before `adopt`."""
        replaced: list[Slot] = []
        for key, old in self.slots.items():
            if key in plan.kept:
                continue
            replaced.append(old)
            self._run(now, old, old.router.shutdown(now, "reload"))
            self._run(now, old, old.router.release_now())
        return replaced

    def adopt(self, now: Fraction, plan: ReloadPlan) -> None:
        """Second half: the new set of routers is the node's. Added ones (`plan.added()`)
        are started with `start` once their links are ready."""
        for key in plan.kept:
            old = self.slots[key]
            old.spec = plan.slots[key].spec  # its group and trackers may have changed
            plan.slots[key] = old
        self.mode = plan.mode
        self.trackers = plan.trackers
        old_links, self.slots, self.links = self.links, {}, {}
        self._install(plan.slots.values(), old_links)
        self._released = {s.wire_id: s for s in self.slots.values()
                          if s.router.state is State.FAULT or s.router.drains}
        for name in self.watched:
            old_link = old_links.get(name)
            self.links.setdefault(name, old_link if old_link is not None else Link(name))
        self._index(now, old_links)

    # ------------------------------------------------------------ internals

    def _install(self, slots: Iterable[Slot], old_links: dict[str, Link] | None = None) -> None:
        for slot in slots:
            self.slots[slot.key] = slot
            name = slot.spec.interface
            link = self.links.get(name)
            if link is None:
                link = self.links[name] = (old_links or {}).get(name) or Link(name)
                link.slots = {}
            link.slots[slot.key] = slot
            slot.router.primary_address = link.primary[slot.router.config.family]
        self._by_vip = {v.ip: s for s in self.slots.values() if not s.owner for v in s.vips}
        self._by_wire = {s.wire_id: s for s in self.slots.values()}

    def _index(self, now: Fraction, old_links: dict[str, Link] | None = None) -> None:
        """Who follows which tracker, the groups and their policies, every router's
        effective priority: at start and after a reload (O(routers), never per event).
        A group whose drain state changes on the way drains or rejoins once."""
        was = {name: p.active for name, p in self.policies.items()}
        links_down = self.policies[NODE].links_down if NODE in self.policies else set()
        self._followers, self._members, self._iface_trackers = {}, {}, {}
        for t in self.trackers.values():
            if t.kind == "interface":
                self._iface_trackers.setdefault(t.interface, []).append(t.name)
                if t.interface not in self.links:
                    old = (old_links or {}).get(t.interface)
                    self.links[t.interface] = old if old is not None else Link(t.interface)
        for key, slot in self.slots.items():
            for ref in slot.spec.track:
                self._followers.setdefault(ref.tracker, {})[key] = slot
            # single-active and all-active: every router is in the node's group
            slot.group = NODE if self.mode in ("single-active", "all-active") \
                else slot.spec.group
            if slot.group is not None:
                self._members.setdefault(slot.group, {})[key] = slot
        self.policies = {name: GroupPolicy((k for k, s in members.items()
                                            if s.router.state is State.FAULT))
                         for name, members in self._members.items()}
        if NODE in self.policies:
            self.policies[NODE].links_down = links_down & set(self.watched)
        for name in list(self.track_states):
            if name not in self.trackers:
                del self.track_states[name]
        for slot in self.slots.values():
            self._reprioritize(now, slot)
        for name, policy in self.policies.items():
            if policy.active != was.get(name, False):
                self._drain_group(now, name, policy.active)

    def _all_slots(self) -> Iterator[Slot]:
        yield from self.slots.values()
        for bucket in self._buckets.values():  # replaced routers still releasing
            for s in bucket.values():
                if self.slots.get(s.key) is not s:
                    yield s

    def _run(self, now: Fraction, slot: Slot, acts: list[RouterAction]) -> None:
        """Turn one router's actions into node actions; policy follow-ups go on a work
        list handled here, in a loop."""
        work: list[tuple[Slot, list[RouterAction]]] = []
        self._translate(now, slot, acts, work)
        i = 0
        while i < len(work):
            s, a = work[i]
            i += 1
            self._translate(now, s, a, work)

    def _translate(self, now: Fraction, slot: Slot, acts: list[RouterAction],
                   work: list[tuple[Slot, list[RouterAction]]]) -> None:
        out = self._actions
        key = slot.key
        group = slot.group
        policy = self.policies.get(group) if group is not None else None
        group_before = policy is not None and policy.active
        transitioned = False
        current = self.slots.get(key) is slot
        for act in acts:
            if isinstance(act, SendAdvert):
                src = slot.router.primary_address  # the link's, kept by set_addresses
                if src is None:  # no address to send from: an I/O failure like any other
                    work.append((slot, slot.router.report_io(now, False, "send")))
                    continue
                # a master sends the same bytes every interval: encode once
                fields = (act.priority, act.interval_cs, src)
                cached = slot.advert
                # each unicast peer, or the multicast group (None)
                dsts: tuple[IPAddress | None, ...] = slot.spec.peers or (None,)
                if cached is None or cached[0] != fields:
                    cfg = slot.router.config
                    cached = slot.advert = (fields, tuple(
                        encode_advert(cfg, act, src, dst) for dst in dsts))
                for dst, payload in zip(dsts, cached[1], strict=True):
                    out.append(Send(key, payload, src, dst))
            elif isinstance(act, AddVips):
                self._ask_install(slot, now)
            elif isinstance(act, RemoveVips):
                if not slot.owner:  # never remove the owner's real address
                    slot.installing = False
                    slot.announce_after_install = False
                    if slot.awaiting_release:  # never took it: nothing to remove
                        slot.awaiting_release, slot.retry_at = False, None
                    out.append(SetVips(key, False))
            elif isinstance(act, Announce):
                if slot.installing:  # announced once the VIPs are in the kernel
                    slot.announce_after_install = True
                else:
                    out.append(AnnounceVips(key))
            elif isinstance(act, Transitioned):
                transitioned = True
                if current:
                    if policy is not None:
                        policy.note(key, act.old, act.new)
                    self._note_released(slot, act.old, act.new)
                out.append(Transition(key, act.old, act.new, act.cause))
        self._schedule(slot, now)
        if not transitioned or not current or self.stopping or policy is None:
            return
        assert group is not None
        if policy.active != group_before:
            self._drain_group(now, group, policy.active, work)
        elif slot.router.state is not State.FAULT and \
                (GROUP_FAULT in slot.router.drains) != policy.active:
            self.stats.router_calls += 1
            work.append((slot, slot.router.set_drain(now, GROUP_FAULT, policy.active)))

    def _note_released(self, slot: Slot, old: str, new: str) -> None:
        """Keep the set of our routers that will not serve (FAULT, or drained: a group
        fault, maintenance); when a master joins it, the peers are told at once. Our view
        of the router goes to the peers too, and a new master of ours is checked against
        theirs (split brain)."""
        if self.commit_before_vips:  # sync runs: the peers follow our views
            if slot.spec.bucket is not None and new != State.MASTER.value and (
                    old == State.MASTER.value or slot.released_view_due):
                # a bucket is given up when its rules are out of the kernel: the member
                # waiting for it (awaiting_release) must not own it a moment earlier (and
                # MASTER -> INIT -> BACKUP says nothing until then either)
                slot.released_view_due = True
            else:
                slot.released_view_due = False
                self._actions.append(self._view(slot, new))
            if new == State.MASTER.value and slot.spec.bucket is None:
                self._check_split_brain(slot)
        serving = new == State.MASTER.value or (new == State.BACKUP.value
                                                and not slot.router.drains)
        if serving:
            self._released.pop(slot.wire_id, None)
            return
        self._released[slot.wire_id] = slot
        if old == State.MASTER.value:
            self._actions.append(TellPeers())

    def _owner_alive(self, slot: Slot, now: Fraction) -> bool:
        """A peer says over the sync link that it owns the bucket, and a master was heard
        on the LAN within two of its advert intervals: a preemption (our Master_Down_Timer
        ran out because we discard a lower priority's adverts, which keep coming). A
        takeover from a dead or cut-off owner (silent for Master_Down_Interval, three
        intervals or more; its view is stale) does not wait."""
        if self.peer_master_with_link(slot) is None:
            return False
        return any(p.priority > 0 and now - p.last_heard < Fraction(2 * p.interval_cs, 100)
                   for p in slot.router.peers.values())

    def _view(self, slot: Slot, state: str) -> ViewChanged:
        r = slot.router
        return ViewChanged(slot.wire_id, bytes([STATE_CODES[state], r.priority,
                                                1 if r.link_up else 0]))

    def _ask_install(self, slot: Slot, now: Fraction) -> None:
        slot.installing = True
        if self.commit_before_vips and not self._commit_asked:
            self._commit_asked = True  # one commit serves every takeover queued behind it
            self._actions.append(CommitFlows())
        if slot.spec.bucket is not None and self._owner_alive(slot, now):
            # a preemption, or the owner lost a link: it is alive and still owns the
            # bucket; take it when it says (over the sync link) that it let go, or after
            # 3 intervals
            self.release_waits += 1
            slot.awaiting_release = True
            slot.retry_at = now + 3 * slot.router.advertisement_interval
            self._schedule(slot, now)
            return
        self._actions.append(SetVips(slot.key, True))

    def _drain_group(self, now: Fraction, group: str, on: bool,
                     work: list[tuple[Slot, list[RouterAction]]] | None = None) -> None:
        """The group's fault started or ended (vipd.core.policy): tell each of its routers,
        once."""
        for s in list(self._members.get(group, {}).values()):
            if s.router.state is not State.FAULT:
                self.stats.router_calls += 1
                acts = s.router.set_drain(now, GROUP_FAULT, on)
                if work is None:
                    self._run(now, s, acts)
                else:
                    work.append((s, acts))

    def _deadline(self, slot: Slot, now: Fraction) -> tuple[Fraction, bool] | None:
        """When to wake for the router, and whether that is a takeover to time exactly.
        A Master_Down_Timer whose point of the COARSE_S grid at or before it is still
        ahead is filed on that grid point: a backup's timer moves later at every advert,
        and the routers of one master then share a few wake-ups a second instead of one
        each (reception times differ by microseconds); when it comes near, it is filed
        exactly."""
        t = slot.router.get_timer()
        r = slot.retry_at
        if r is not None and (t is None or r < t):
            return (r, False)
        if t is None:
            return None
        md = slot.router.master_down_timer
        if md is None or not (t is md or t == md):
            return (t, False)
        # the grid point at or before t, in whole ticks (integer arithmetic: a router is
        # re-filed here once per Master_Down_Interval, a thousand times a second at 1000)
        tick = t.numerator * COARSE_PER_S // t.denominator
        if tick * now.denominator > now.numerator * COARSE_PER_S:  # grid point after now
            at = self._grid.get(tick)
            if at is None:
                if len(self._grid) > 1024:
                    self._grid.clear()
                at = self._grid[tick] = Fraction(tick, COARSE_PER_S)
            return (at, False)
        return (t, True)

    def _schedule(self, slot: Slot, now: Fraction) -> None:
        """File the router in the bucket of its next deadline; keep its bucket while the
        deadline only moves later (it is re-filed when the bucket comes due)."""
        due = self._deadline(slot, now)
        armed = slot.armed
        if armed is not None:
            if due is not None and armed[0] <= due[0]:
                return
            bucket = self._buckets.get(armed)
            if bucket is not None:
                bucket.pop(id(slot), None)
                if not bucket:
                    del self._buckets[armed]  # its heap entry is skipped when reached
        slot.armed = due
        if due is None:
            return
        bucket = self._buckets.get(due)
        if bucket is None:
            bucket = self._buckets[due] = {}
            heapq.heappush(self._heap, (float(due[0]), due[0], due[1]))
            self.stats.timer_buckets += 1
        bucket[id(slot)] = slot

    def _head(self) -> tuple[Fraction, bool] | None:
        heap, buckets = self._heap, self._buckets
        while heap:
            _, at, takeover = heap[0]
            if (at, takeover) in buckets:
                return (at, takeover)
            heapq.heappop(heap)  # an emptied bucket
        return None
