"""A simulated LAN segment in virtual time: N virtual routers, adverts through the real codec.

Delivery is instant and in order. Partitions are groups: a packet reaches only the nodes of
its sender's group. No sleeps, no clocks: `run_until` jumps from deadline to deadline.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from fractions import Fraction
from ipaddress import IPv4Address, IPv6Address

from vipd.core.actions import Action, AddVips, Announce, RemoveVips, SendAdvert
from vipd.core.advert import encode_advert, receiver_view
from vipd.core.packet import (
    VRRP_GROUP_V4,
    VRRP_GROUP_V6,
    DropReason,
    IPAddress,
    IpMeta,
)
from vipd.core.receive import Dropped, Receiver
from vipd.core.router import RouterConfig, State, VirtualRouter

VIP = IPv4Address("192.0.2.1")


def make_config(priority: int, *, version: int = 3, interval_cs: int = 100, vrid: int = 51,
                **kw: object) -> RouterConfig:
    base = RouterConfig(name=f"lan/vrid {vrid}/IPv4/p{priority}", vrid=vrid, family=4,
                        version=version, priority=priority, advert_interval_cs=interval_cs,
                        addresses=(VIP,))
    return replace(base, **kw)  # type: ignore[arg-type]


@dataclass
class Node:
    router: VirtualRouter
    address: IPAddress
    holds_vips: bool = False
    announces: int = 0
    sent: list[bytes] = field(default_factory=list)
    drops: dict[DropReason, int] = field(default_factory=dict)
    alive: bool = True
    receiver: Receiver[Node] = field(default_factory=Receiver)

    @property
    def state(self) -> State:
        return self.router.state


class Segment:
    def __init__(self) -> None:
        self.now = Fraction(0)
        self.nodes: list[Node] = []
        self.group: dict[int, int] = {}
        self._queue: deque[tuple[Node, bytes]] = deque()
        self.log: list[tuple[Fraction, str, str, str]] = []

    def add(self, config: RouterConfig, address: str | None = None) -> Node:
        addr: IPAddress
        if address is None:
            addr = IPv4Address(f"192.0.2.{10 + len(self.nodes)}")
        else:
            addr = IPv4Address(address) if ":" not in address else IPv6Address(address)
        node = Node(VirtualRouter(config, addr), addr)
        self.nodes.append(node)
        self.group[id(node)] = 0
        return node

    def start(self, node: Node) -> None:
        node.alive = True
        self._apply(node, node.router.start(self.now))
        self._drain()

    def stop(self, node: Node) -> None:
        """Graceful shutdown (priority 0 when master)."""
        self._apply(node, node.router.shutdown(self.now))
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
        ts = [t for n in self.nodes if n.alive and (t := n.router.get_timer()) is not None]
        return min(ts) if ts else None

    def run_until(self, end: Fraction, check: object = None) -> None:
        while True:
            t = self.next_deadline()
            if t is None or t > end:
                break
            self.now = t
            for n in self.nodes:
                timer = n.router.get_timer()
                if n.alive and timer is not None and timer <= self.now:
                    self._apply(n, n.router.handle_timer(self.now))
            self._drain()
            if callable(check):
                check(self)
        self.now = max(self.now, end)

    def run_for(self, seconds: Fraction | int, check: object = None) -> None:
        self.run_until(self.now + Fraction(seconds), check)

    # ---------------------------------------------------------------- internals

    def _apply(self, node: Node, actions: list[Action]) -> None:
        cfg = node.router.config
        for a in actions:
            if isinstance(a, SendAdvert):
                raw = encode_advert(cfg, a, node.address)
                node.sent.append(raw)
                self._queue.append((node, raw))
            elif isinstance(a, AddVips):
                node.holds_vips = True
            elif isinstance(a, RemoveVips):
                node.holds_vips = False
            elif isinstance(a, Announce):
                node.announces += 1
            else:
                self.log.append((self.now, str(node.address), a.old, a.new))

    def _drain(self) -> None:
        while self._queue:
            sender, raw = self._queue.popleft()
            for n in self.nodes:
                if n is sender or not n.alive or self.group[id(n)] != self.group[id(sender)]:
                    continue
                self._deliver(n, sender, raw)

    def _deliver(self, node: Node, sender: Node, raw: bytes) -> None:
        """The daemon's receive path (vipd.core.receive), then the router's."""
        family = sender.address.version
        meta = IpMeta(family, sender.address, VRRP_GROUP_V4 if family == 4 else VRRP_GROUP_V6,
                      255)
        cfg = node.router.config
        view = receiver_view(cfg)
        got = node.receiver.check(raw, meta, {node.address},
                                  lambda vrid: (node, view) if vrid == cfg.vrid else None,
                                  lambda n: True)
        if isinstance(got, Dropped):
            node.drops[got.reason] = node.drops.get(got.reason, 0) + 1
            return
        _node, adv, diff = got
        acts, dropped = node.router.handle_advert(self.now, adv, diff)
        if dropped is not None:
            node.drops[dropped] = node.drops.get(dropped, 0) + 1
        self._apply(node, acts)
