"""Issue 8: the work of one transition does not grow with the number of routers of the
node. Counted, not timed: calls into the routers and timer handles created."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from ipaddress import ip_interface
from pathlib import Path

import pytest

from vipd.config import loads
from vipd.core.router import VirtualRouter
from vipd.io.announce import FakeAnnouncer
from vipd.io.control_client import STATUS_REQUEST, expand_status
from vipd.io.lock import InstanceLock
from vipd.io.nft import FakeAcceptGuard
from vipd.io.rtnl import FakeRtnl, LinkInfo
from vipd.io.vrrp_socket import FakeVrrpTransport
from vipd.runtime import Daemon


def config(sock: str, mode: str, per_vlan: int) -> str:
    """4 VLANs x per_vlan routers; the very first router has the higher priority, so its
    Master_Down_Timer runs out first and alone."""
    vlans = []
    for v in range(4):
        insts = ", ".join(
            f"{{vrid: {i + 1}, priority: {200 if v == i == 0 else 100}, advert_interval: 1s, "
            f"vips: [198.51.100.{i % 250 + 1}/24]}}" if v == 0 else
            f"{{vrid: {i + 1}, priority: 100, advert_interval: 1s, "
            f"vips: ['2001:db8:{v}::{i + 1:x}/64']}}" for i in range(per_vlan))
        vlans.append(f"  - {{name: v{v}, interface: lan{v}, instances: [{insts}]}}")
    return (f"node: {{name: r1, control_socket: {sock}}}\nmode: {mode}\nvlans:\n"
            + "\n".join(vlans))


def fake_links() -> FakeRtnl:
    rtnl = FakeRtnl()
    for v in range(4):
        rtnl.links[f"lan{v}"] = LinkInfo(10 + v, f"lan{v}", True, "02:00:00:00:00:11")
        rtnl.addrs[10 + v] = [(ip_interface("192.0.2.250/24"), 0),
                              (ip_interface(f"fe80::{v + 1}/64"), 0)]
    return rtnl


def daemon(tmp: Path, name: str, mode: str, per_vlan: int, rtnl: FakeRtnl,
           clock: dict[str, float], announcer: FakeAnnouncer | None = None) -> Daemon:
    sock = str(tmp / f"{name}.sock")
    return Daemon(loads(config(sock, mode, per_vlan)), rtnl=rtnl,
                  open_socket=lambda n, i, f: FakeVrrpTransport(n, f),
                  announcer=announcer or FakeAnnouncer(), accept_guard=FakeAcceptGuard(),
                  lock=InstanceLock(sock, claim_prefix=f"vipd-test{sock}/"),
                  clock=lambda: clock["t"])


def one_transition_cost(tmp: Path, mode: str, per_vlan: int) -> dict[str, int]:
    """Start a node of 4 x per_vlan routers, then count what ONE router's takeover costs,
    and what one link going down costs on top of it."""
    counts = {"set_drain": 0, "call_at": 0, "handle_timer": 0}

    async def main() -> dict[str, int]:
        rtnl = fake_links()
        clock = {"t": 1e9}
        d = daemon(tmp, f"{mode}-{per_vlan}", mode, per_vlan, rtnl, clock)
        await d.start()
        for _ in range(5):  # the link monitor starts
            await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        real_call_at = loop.call_at
        real_drain = VirtualRouter.set_drain
        real_timer = VirtualRouter.handle_timer

        def call_at(*a: object, **k: object) -> asyncio.TimerHandle:
            counts["call_at"] += 1
            return real_call_at(*a, **k)  # type: ignore[arg-type]

        def set_drain(self: VirtualRouter, *a: object) -> object:
            counts["set_drain"] += 1
            return real_drain(self, *a)  # type: ignore[arg-type]

        def handle_timer(self: VirtualRouter, *a: object) -> object:
            counts["handle_timer"] += 1
            return real_timer(self, *a)  # type: ignore[arg-type]

        loop.call_at = call_at  # type: ignore[method-assign]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(VirtualRouter, "set_drain", set_drain)
            mp.setattr(VirtualRouter, "handle_timer", handle_timer)
            slot = d.slots["lan0", 1, 4]
            deadline = d.node.get_timer()  # the coarse wake-up before its takeover
            assert deadline is not None and not d.node.timer_is_takeover()
            clock["t"] = float(deadline) + 1e-6
            d.on_timer()
            deadline = d.node.get_timer()  # now filed exactly
            assert deadline is not None and deadline == slot.router.master_down_timer
            calls = d.node.stats.router_calls
            clock["t"] = float(deadline) + 1e-6
            d.on_timer()  # BACKUP -> MASTER for one router
            assert slot.router.state.value == "MASTER"
            first = dict(counts, router_calls=d.node.stats.router_calls - calls)
            before = counts["set_drain"]
            rtnl.set_link(LinkInfo(10, "lan0", False, "02:00:00:00:00:11"))  # a VLAN fails
            await asyncio.sleep(0)
            counts["link_down_set_drain"] = counts["set_drain"] - before
            assert {s.router.state.value for s in d.slots.values()
                    if s.spec.interface == "lan0"} == {"FAULT"}
        loop.call_at = real_call_at  # type: ignore[method-assign]
        await d.close()
        return {**first, "link_down_set_drain": counts["link_down_set_drain"]}

    return asyncio.run(main())


@pytest.mark.parametrize("mode", ["per-vlan-active", "single-active"])
def test_one_transition_costs_the_same_at_8_and_1000_routers(tmp_path: Path,
                                                             mode: str) -> None:
    small = one_transition_cost(tmp_path, mode, 2)
    large = one_transition_cost(tmp_path, mode, 250)
    one = {k: v for k, v in large.items() if k != "link_down_set_drain"}
    assert one == {k: v for k, v in small.items() if k != "link_down_set_drain"}
    assert one["set_drain"] == 0 and one["handle_timer"] == 1 and one["call_at"] <= 2
    assert one["router_calls"] == 1
    # a whole VLAN failing: each other router is told at most once (it was once per
    # router per transition on 7ed180e: 250 x 1000 calls)
    if mode == "single-active":
        assert large["link_down_set_drain"] == 1000 - 1  # the group drain, once
        assert small["link_down_set_drain"] == 8 - 1
    else:
        assert large["link_down_set_drain"] == small["link_down_set_drain"] == 0


def test_a_thousand_takeovers_install_in_one_batch_then_announce(tmp_path: Path) -> None:
    async def main() -> None:
        rtnl = fake_links()
        clock = {"t": 1e9}
        announcer = FakeAnnouncer()
        d = daemon(tmp_path, "b", "per-vlan-active", 250, rtnl, clock, announcer)
        await d.start()
        for _ in range(5):
            await asyncio.sleep(0)
        clock["t"] = max(float(s.router.get_timer() or 0) for s in d.slots.values()) + 1e-6
        d.on_timer()  # every router's Master_Down_Timer, in one turn
        assert announcer.rounds == []  # nothing announced before its VIPs are in
        for _ in range(5):
            await asyncio.sleep(0)
        assert rtnl.batches == [1750]  # one round trip for all (IPv6: + the link-local)
        await d.executor.drain()  # the announcements, sent from their thread
        assert len(announcer.rounds) == 1000
        assert d.executor.announce_thread.offloaded == 1  # all 1000 in one job
        assert sum(len(a) for a in rtnl.addrs.values()) == 1750 + 8
        await d.close()

    asyncio.run(main())


def test_status_of_a_thousand_routers_goes_to_vipctl_as_a_table(tmp_path: Path) -> None:
    """`vipctl status` at 1000 routers: the instances travel as one table (field names
    once, not 1000 times) and come back as the status model, unchanged."""
    async def main() -> None:
        d = daemon(tmp_path, "c", "per-vlan-active", 250, fake_links(), {"t": 1e9})
        await d.start()
        for _ in range(5):
            await asyncio.sleep(0)
        objects = await d.commands.handle({"command": "status"})
        table = await d.commands.handle(dict(STATUS_REQUEST))
        await d.close()
        encoded = [json.dumps(r, separators=(",", ":")).encode() for r in (objects, table)]
        assert len(encoded[1]) < 400 * 1000 < len(encoded[0])
        expanded = expand_status(json.loads(encoded[1]))["status"]
        assert len(expanded["instances"]) == 1000
        assert expanded == json.loads(encoded[0])["status"]

    asyncio.run(main())


def test_vipctl_imports_nothing_of_the_daemon() -> None:
    """Every `vipctl status` pays for its imports: the status model, the configuration
    loader, asyncio and typing stay out (a subprocess: a fresh interpreter's modules)."""
    code = "import sys, vipd.vipctl; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    heavy = {"asyncio", "typing", "yaml", "pyroute2", "fractions", "ipaddress",
             "vipd.config", "vipd.status", "vipd.core", "vipd.runtime"}
    assert heavy.isdisjoint(out), heavy.intersection(out)


def test_vipctl_reads_a_daemon_that_answers_with_objects() -> None:
    """A daemon from before the table form ignores `"instances": "table"` (a rolling
    upgrade): its reply, and any error, pass through expand_status unchanged."""
    old = {"ok": True, "status": {"instances": [{"name": "v0/vrid 1/IPv4"}]}}
    assert expand_status(json.loads(json.dumps(old))) == old
    err = {"ok": False, "error": {"code": "busy", "message": "x"}}
    assert expand_status(dict(err)) == err
