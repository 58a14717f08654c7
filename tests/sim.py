"""A simulated LAN segment in virtual time: N vipd node cores (vipd.core.node), one router
each, adverts through the real codec and the daemon's own receive path.

Delivery is instant and in order. Partitions are groups: a packet reaches only the nodes of
its sender's group. No sleeps, no clocks: `run_until` jumps from deadline to deadline.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field, replace
from fractions import Fraction
from ipaddress import IPv4Address, IPv6Address, ip_interface

from vipd.core.node import AnnounceVips, RouterSpec, Send, SetVips, Slot, Transition
from vipd.core.node import Node as NodeCore
from vipd.core.packet import (
    VRRP_GROUP_V4,
    VRRP_GROUP_V6,
    DropReason,
    IPAddress,
    IpMeta,
)
from vipd.core.router import RouterConfig, State, VirtualRouter
from vipd.core.track import TrackerSpec, TrackRef, TrackState

VIP = IPv4Address("192.0.2.1")


def make_config(priority: int, *, version: int = 3, interval_cs: int = 100, vrid: int = 51,
                **kw: object) -> RouterConfig:
    base = RouterConfig(name=f"lan/vrid {vrid}/IPv4/p{priority}", vrid=vrid, family=4,
                        version=version, priority=priority, advert_interval_cs=interval_cs,
                        addresses=(VIP,))
    return replace(base, **kw)  # type: ignore[arg-type]


LAN = "lan"


@dataclass
class Node:
    """One vipd on the segment: the daemon's node core (vipd.core.node) with one router."""

    core: NodeCore
    address: IPAddress
    holds_vips: bool = False
    announces: int = 0
    sent: list[bytes] = field(default_factory=list)
    alive: bool = True

    @property
    def slot(self) -> Slot:
        return next(iter(self.core.slots.values()))

    @property
    def router(self) -> VirtualRouter:
        return self.slot.router

    @property
    def state(self) -> State:
        return self.router.state

    @property
    def drops(self) -> dict[DropReason, int]:
        """Every drop reason counted for this node, on its router or its interface."""
        out = Counter(self.slot.drops)
        for c in self.core.links[LAN].drops.values():
            out.update(c)
        return dict(out)


class Segment:
    def __init__(self) -> None:
        self.now = Fraction(0)
        self.nodes: list[Node] = []
        self.group: dict[int, int] = {}
        self._queue: deque[tuple[Node, bytes, IPAddress | None]] = deque()
        self.log: list[tuple[Fraction, str, str, str]] = []

    def add(self, config: RouterConfig, address: str | None = None, *,
            peers: tuple[IPAddress, ...] = (), trackers: tuple[TrackerSpec, ...] = (),
            track: tuple[TrackRef, ...] = ()) -> Node:
        """A node with one router; `peers`: unicast peers; `trackers`/`track`: what it
        follows (set their states with `track`)."""
        addr: IPAddress
        if address is None:
            addr = IPv4Address(f"192.0.2.{10 + len(self.nodes)}")
        else:
            addr = IPv4Address(address) if ":" not in address else IPv6Address(address)
        vip = ip_interface(f"{config.addresses[0]}/{24 if config.family == 4 else 64}")
        core = NodeCore([RouterSpec(LAN, LAN, config, (vip,), peers=peers, track=track)],
                        "per-vlan-active", trackers=trackers)
        prefix = 24 if addr.version == 4 else 64
        core.set_addresses(LAN, [(ip_interface(f"{addr}/{prefix}"), 0)])
        core.set_link(self.now, LAN, True)
        node = Node(core, addr)
        self.nodes.append(node)
        self.group[id(node)] = 0
        return node

    def start(self, node: Node) -> None:
        node.alive = True
        node.core.start(self.now, [node.slot.key])
        self._apply(node)
        self._drain()

    def stop(self, node: Node) -> None:
        """Graceful shutdown (priority 0 when master)."""
        node.core.shutdown(self.now)
        self._apply(node)
        self._drain()

    def maintenance(self, node: Node, on: bool) -> None:
        node.core.set_maintenance(self.now, on)
        self._apply(node)
        self._drain()

    def track(self, node: Node, name: str, state: TrackState) -> None:
        node.core.set_track(self.now, name, state)
        self._apply(node)
        self._drain()

    def set_link(self, node: Node, up: bool) -> None:
        node.core.set_link(self.now, LAN, up)
        self._apply(node)
        self._drain()

    def crash(self, node: Node) -> None:
        """The node vanishes: no priority 0, its timers never fire again."""
        node.alive = False

    def partition(self, *groups: list[Node]) -> None:
        for gi, g in enumerate(groups):
            for n in g:
                self.group[id(n)] = gi

    def heal(self) -> None:
        for n in self.nodes:
            self.group[id(n)] = 0

    def masters(self) -> list[Node]:
        return [n for n in self.nodes if n.alive and n.state is State.MASTER]

    def next_deadline(self) -> Fraction | None:
        ts = [t for n in self.nodes if n.alive and (t := n.core.get_timer()) is not None]
        return min(ts) if ts else None

    def run_until(self, end: Fraction, check: object = None) -> None:
        while True:
            t = self.next_deadline()
            if t is None or t > end:
                break
            self.now = t
            for n in self.nodes:
                timer = n.core.get_timer()
                if n.alive and timer is not None and timer <= self.now:
                    n.core.handle_timer(self.now)
                    self._apply(n)
            self._drain()
            if callable(check):
                check(self)
        self.now = max(self.now, end)

    def run_for(self, seconds: Fraction | int, check: object = None) -> None:
        self.run_until(self.now + Fraction(seconds), check)

    # ---------------------------------------------------------------- internals

    def _apply(self, node: Node) -> None:
        """Carry out the node's actions as a perfect kernel would: VIP changes succeed at
        once and are reported back, which may queue more actions (handled in this loop)."""
        for a in node.core.pop_actions():
            if isinstance(a, Send):
                node.sent.append(a.payload)
                self._queue.append((node, a.payload, a.dst))
            elif isinstance(a, SetVips):
                node.holds_vips = a.present
                node.core.vips_applied(self.now, a.key, a.present, True)
            elif isinstance(a, AnnounceVips):
                node.announces += 1
            elif isinstance(a, Transition):
                self.log.append((self.now, str(node.address), a.old, a.new))

    def _drain(self) -> None:
        while self._queue:
            sender, raw, dst = self._queue.popleft()
            for n in self.nodes:
                if n is sender or not n.alive or self.group[id(n)] != self.group[id(sender)]:
                    continue
                if dst is not None and n.address != dst:
                    continue  # unicast: only its destination hears it
                self._deliver(n, sender, raw, dst)

    def _deliver(self, node: Node, sender: Node, raw: bytes,
                 dst: IPAddress | None = None) -> None:
        """Through the daemon's receive path: the node core's `receive`."""
        family = sender.address.version
        group = VRRP_GROUP_V4 if family == 4 else VRRP_GROUP_V6
        meta = IpMeta(family, sender.address, dst or group, 255)
        node.core.receive(LAN, family, [(raw, meta, self.now)])
        self._apply(node)
