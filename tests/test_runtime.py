"""The driver with fake adapters and a driven clock: no root, no sockets, no waiting."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, ip_interface
from pathlib import Path
from typing import Any

from vipd.config import loads
from vipd.core.node import COARSE_S
from vipd.core.packet import (
    VRRP_GROUP_V4,
    ChecksumVariant,
    IpMeta,
    decode,
    encode_v3,
)
from vipd.io.announce import FakeAnnouncer
from vipd.io.lock import InstanceLock
from vipd.io.nft import FakeAcceptGuard
from vipd.io.rtnl import FakeRtnl, LinkInfo
from vipd.io.vrrp_socket import FakeVrrpTransport
from vipd.runtime import Daemon

CONFIG = """
node: {name: r1, control_socket: SOCK}
mode: per-vlan-active
vlans:
  - name: lan-a
    interface: lanA
    instances:
      - {vrid: 51, priority: 150, advert_interval: 100ms, vips: [192.0.2.1/24]}
"""
PEER = IPv4Address("192.0.2.12")
ME = IPv4Address("192.0.2.11")


class World:
    def __init__(self, tmp: Path) -> None:
        self.t = 1e9  # far beyond the loop clock: real timers never fire, fire() drives
        self.rtnl = FakeRtnl()
        self.rtnl.links["lanA"] = LinkInfo(7, "lanA", True, "02:00:00:00:00:11")
        self.rtnl.addrs[7] = [(ip_interface("192.0.2.11/24"), 0)]
        self.sockets: dict[tuple[str, int], FakeVrrpTransport] = {}
        self.announcer = FakeAnnouncer()
        self.guard = FakeAcceptGuard()
        self.sock_path = str(tmp / "vipd.sock")
        self.cfg = loads(CONFIG.replace("SOCK", self.sock_path))

    def open_socket(self, ifname: str, index: int, family: int) -> FakeVrrpTransport:
        s = self.sockets[ifname, family] = FakeVrrpTransport(ifname, family)
        return s

    def lock(self, path: str | None = None) -> InstanceLock:
        # claims are per network namespace: a prefix of this test's own keeps runs apart
        return InstanceLock(path or self.sock_path, claim_prefix=f"vipd-test{self.sock_path}/")

    async def daemon(self, **kw: Any) -> Daemon:
        args: dict[str, Any] = dict(rtnl=self.rtnl, open_socket=self.open_socket,
                                    announcer=self.announcer, clock=lambda: self.t,
                                    accept_guard=self.guard, lock=self.lock())
        args.update(kw)
        d = Daemon(self.cfg, **args)
        await d.start()
        await settle()  # the link monitor starts and does its first resync
        return d


    def deliver(self, d: Daemon, payload: bytes, src: IPv4Address = PEER, ttl: int = 255) -> None:
        sock = self.sockets["lanA", 4]
        sock.inbox.append((payload, IpMeta(4, src, VRRP_GROUP_V4, ttl), 0.0))
        d.read("lanA", 4)


async def settle(rounds: int = 5) -> None:
    """Let queued callbacks and tasks run (the fakes complete at once)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def advert(priority: int, addrs: tuple[str, ...] = ("192.0.2.1",), vrid: int = 51) -> bytes:
    return encode_v3(vrid=vrid, priority=priority, max_adver_int_cs=10,
                     addresses=[IPv4Address(a) for a in addrs], src=PEER)


def run(tmp: Path, body: Callable[[World, Daemon], Awaitable[None]],
        world: World | None = None, **daemon: Any) -> None:
    """Start a daemon in `world` (default: one VLAN; `daemon` adds Daemon arguments), run
    `body`, always close it."""
    async def main() -> None:
        w = world or World(tmp)
        d = await w.daemon(**daemon)
        try:
            await body(w, d)
        finally:
            await d.close()

    asyncio.run(main())


def fire(w: World, d: Daemon) -> None:
    """Jump the clock to the node's next deadline and run its timer. A Master_Down_Timer
    is first woken for on a coarse grid (vipd.core.node.COARSE_S): then its exact
    deadline, which that wake-up filed, is run as well."""
    deadline = d.node.get_timer()
    assert deadline is not None
    w.t = float(deadline) + 1e-6
    d.on_timer()
    nxt = d.node.next_timer()
    if nxt is not None and nxt[1] and nxt[0] - deadline <= COARSE_S:
        w.t = float(nxt[0]) + 1e-6
        d.on_timer()


def test_startup_backup_then_master_with_vips_advert_and_garp(tmp_path: Path) -> None:
    async def body(w: World, d: Daemon) -> None:
        st = d.status()["instances"][0]
        assert st["state"] == "BACKUP" and st["primary_address"] == "192.0.2.11"
        # accept_mode false (the RFC default): the VIP is in the deny set from the start
        assert w.guard.denied == {IPv4Address("192.0.2.1")}
        assert d.status()["accept_mode_enforced"] is True
        assert w.announcer.prepared == ["lanA"]
        fire(w, d)
        await asyncio.sleep(0)  # let the queued VIP install run
        await asyncio.sleep(0)
        assert d.status()["instances"][0]["state"] == "MASTER"
        assert ip_interface("192.0.2.1/24") in [a for a, _ in w.rtnl.addrs[7]]
        payload, src = w.sockets["lanA", 4].sent[0]
        adv = decode(payload, IpMeta(4, src, VRRP_GROUP_V4, 255))
        assert (src, adv.priority, adv.checksum_variant) == (ME, 150,
                                                             ChecksumVariant.PSEUDO_HEADER)
        assert w.announcer.rounds == [("lanA", (IPv4Address("192.0.2.1"),))]

    run(tmp_path, body)


def test_receive_path_counts_every_drop_reason(tmp_path: Path) -> None:
    async def body(w: World, d: Daemon) -> None:
        w.deliver(d, advert(200), ttl=64)
        w.deliver(d, advert(200), src=ME)  # our own address: looped back
        w.deliver(d, advert(200, vrid=99))
        w.deliver(d, b"\x31\x33")
        w.deliver(d, advert(200))
        st = d.status()
        iface = st["interfaces"][0]["drops"]["IPv4"]
        assert iface == {"ttl": 1, "own_packet": 1, "unknown_vrid": 1, "length": 1}
        inst = st["instances"][0]
        assert inst["drops"] == {}
        assert inst["adverts_received"] == 1 and inst["master"] == str(PEER)

    run(tmp_path, body)


def test_leftover_vips_removed_at_start(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.rtnl.addrs[7].append((ip_interface("192.0.2.1/24"), 1))

    async def body(w: World, d: Daemon) -> None:
        assert [str(a) for a, _ in w.rtnl.addrs[7]] == ["192.0.2.11/24"]

    run(tmp_path, body, w)


def test_failed_sends_give_up_mastership(tmp_path: Path) -> None:
    async def body(w: World, d: Daemon) -> None:
        fire(w, d)
        assert d.status()["instances"][0]["state"] == "MASTER"
        w.sockets["lanA", 4].fail_sends = True
        states = []
        for _ in range(10):  # advert timers, with announcement rounds in between
            fire(w, d)
            st = d.status()["instances"][0]
            states.append((st["io_failures"], st["state"]))
            if st["state"] == "FAULT":
                break
        assert states[-1] == (3, "FAULT") and (2, "MASTER") in states
        assert st["last_transition"]["cause"] == "3 send failures"
        assert not d.status()["healthy"]

    run(tmp_path, body)


def test_link_down_is_fault_and_up_rejoins(tmp_path: Path) -> None:
    async def body(w: World, d: Daemon) -> None:
        w.rtnl.set_link(LinkInfo(7, "lanA", False, "02:00:00:00:00:11"))
        await asyncio.sleep(0)
        assert d.status()["instances"][0]["state"] == "FAULT"
        w.rtnl.set_link(LinkInfo(7, "lanA", True, "02:00:00:00:00:11"))
        for _ in range(5):
            await asyncio.sleep(0)
        assert d.status()["instances"][0]["state"] == "BACKUP"

    run(tmp_path, body)


def _ask(path: str, lines: list[bytes]) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(b"".join(lines))
        buf = b""
        while buf.count(b"\n") < len(lines):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return [json.loads(x) for x in buf.splitlines()]


def test_control_socket_replies_and_errors(tmp_path: Path) -> None:
    async def body(w: World, d: Daemon) -> None:
        import os

        assert os.stat(w.sock_path).st_mode & 0o777 == 0o600
        replies = await asyncio.get_running_loop().run_in_executor(None, _ask, w.sock_path, [
            b'{"command": "status"}\n', b"nonsense\n", b'["status"]\n',
            b'{"command": "maintenance", "on": "yes"}\n', b'{"command": "launch"}\n',
            b'{"command": "maintenance", "on": true}\n'])
        assert replies[0]["ok"] and replies[0]["status"]["node"] == "r1"
        assert [r.get("error", {}).get("code") for r in replies[1:5]] == [
            "bad_json", "bad_request", "bad_request", "unknown_command"]
        assert replies[5] == {"ok": True, "maintenance": True}
        assert d.status()["instances"][0]["maintenance"] is True

    run(tmp_path, body)


def test_virtual_mac_macvlan_sysctls_and_master_actions(tmp_path: Path) -> None:
    from vipd.io.vmac import FakeSysctl

    async def main() -> None:
        w = World(tmp_path)
        w.cfg = loads(CONFIG.replace("SOCK", w.sock_path).replace(
            "vips: [192.0.2.1/24]}", "vips: [192.0.2.1/24], virtual_mac: true}"))
        sysctl = FakeSysctl()
        links: list[tuple[str, bool]] = []
        sent: dict[str, FakeVrrpTransport] = {}

        def send_socket(name: str, index: int, family: int) -> FakeVrrpTransport:
            sent[name] = FakeVrrpTransport(name, family)
            return sent[name]

        d = await w.daemon(sysctl=sysctl, open_send_socket=send_socket,
                           set_link_up=lambda name, up: links.append((name, up)))
        try:
            vm = w.rtnl.links["vmac7.51"]
            assert vm.mac == "00:00:5e:00:01:33"
            assert sysctl.values == {
                "net/ipv4/conf/lanA/arp_ignore": "1",
                "net/ipv4/conf/lanA/arp_announce": "2",  # defect 6.4
                "net/ipv4/conf/vmac7.51/arp_ignore": "1",
                "net/ipv4/conf/vmac7.51/arp_announce": "2",
                "net/ipv6/conf/vmac7.51/disable_ipv6": "1"}
            assert links == []  # down while not master
            fire(w, d)
            for _ in range(3):
                await asyncio.sleep(0)
            assert links == [("vmac7.51", True)]
            assert [str(a) for a, _ in w.rtnl.addrs[vm.index]] == ["192.0.2.1/24"]
            assert w.sockets["lanA", 4].sent == [] and len(sent["vmac7.51"].sent) == 1
            assert w.announcer.rounds == [("vmac7.51", (IPv4Address("192.0.2.1"),))]
            # a higher priority master: VIPs off the macvlan, then the macvlan down
            w.deliver(d, advert(200))
            for _ in range(3):
                await asyncio.sleep(0)
            assert w.rtnl.addrs[vm.index] == [] and links[-1] == ("vmac7.51", False)
        finally:
            await d.close()
        assert "vmac7.51" not in w.rtnl.links  # removed at exit

    asyncio.run(main())


TWO_VLANS = """
node: {name: r1, control_socket: SOCK}
mode: MODE
vlans:
  - name: lan-a
    interface: lanA
    instances: [{vrid: 51, priority: 150, advert_interval: 100ms, vips: [192.0.2.1/24]}]
  - name: lan-b
    interface: lanB
    instances: [{vrid: 52, priority: 150, advert_interval: 100ms, vips: [198.51.100.1/24]}]
"""


def _two_vlan_world(tmp: Path, mode: str) -> World:
    w = World(tmp)
    w.rtnl.links["lanB"] = LinkInfo(8, "lanB", True, "02:00:00:00:00:12")
    w.rtnl.addrs[8] = [(ip_interface("198.51.100.11/24"), 0)]
    w.cfg = loads(TWO_VLANS.replace("SOCK", w.sock_path).replace("MODE", mode))
    return w


def _master_all(w: World, d: Daemon) -> None:
    for slot in d.slots.values():
        deadline = slot.router.get_timer()
        assert deadline is not None
        w.t = max(w.t, float(deadline) + 1e-6)
    d.on_timer()


def test_single_active_group_fault_drains_the_other_vlans(tmp_path: Path) -> None:
    async def body(w: World, d: Daemon) -> None:
        _master_all(w, d)
        assert [i["state"] for i in d.status()["instances"]] == ["MASTER", "MASTER"]
        w.rtnl.set_link(LinkInfo(7, "lanA", False, "02:00:00:00:00:11"))
        await asyncio.sleep(0)
        st = {i["vlan"]: i for i in d.status()["instances"]}
        assert st["lan-a"]["state"] == "FAULT"
        assert (st["lan-b"]["state"], st["lan-b"]["drains"],
                st["lan-b"]["priority_zero_sent"]) == ("BACKUP", ["group fault"], 1)
        w.rtnl.set_link(LinkInfo(7, "lanA", True, "02:00:00:00:00:11"))
        for _ in range(5):
            await asyncio.sleep(0)
        st = {i["vlan"]: i for i in d.status()["instances"]}
        assert [(s["state"], s["drains"]) for s in st.values()] == [
            ("BACKUP", []), ("BACKUP", [])]

    run(tmp_path, body, _two_vlan_world(tmp_path, "single-active"))


def test_per_vlan_active_leaves_the_other_vlans_alone(tmp_path: Path) -> None:
    async def body(w: World, d: Daemon) -> None:
        _master_all(w, d)
        w.rtnl.set_link(LinkInfo(7, "lanA", False, "02:00:00:00:00:11"))
        await asyncio.sleep(0)
        assert [i["state"] for i in d.status()["instances"]] == ["FAULT", "MASTER"]

    run(tmp_path, body, _two_vlan_world(tmp_path, "per-vlan-active"))


def test_timers_run_from_kernel_reception_time(tmp_path: Path) -> None:
    from fractions import Fraction

    async def body(w: World, d: Daemon) -> None:
        sock = w.sockets["lanA", 4]
        sock.inbox.append((advert(200), IpMeta(4, PEER, VRRP_GROUP_V4, 255), 0.004))
        d.read("lanA", 4)
        slot = next(iter(d.slots.values()))
        # Master_Down_Interval counted from when the kernel got the advert, 4 ms ago
        # (reception times are whole nanoseconds)
        assert slot.router.master_down_timer == (Fraction(int(w.t * 1e9) - 4_000_000, 10**9)
                                                 + slot.router.master_down_interval)

    run(tmp_path, body)


def test_packet_age_from_scm_timestamp() -> None:
    import struct
    import time

    from vipd.io.vrrp_socket import SO_TIMESTAMPNS, packet_age

    ns = time.time_ns() - 3_000_000
    cmsg = [(socket.SOL_SOCKET, SO_TIMESTAMPNS, struct.pack("=qq", ns // 10**9, ns % 10**9))]
    assert 0.003 <= packet_age(cmsg) < 0.5
    future = time.time_ns() + 10**9
    jumped = [(socket.SOL_SOCKET, SO_TIMESTAMPNS,
               struct.pack("=qq", future // 10**9, future % 10**9))]
    assert packet_age(jumped) == 0.0  # a wall clock jump is not trusted
    assert packet_age([]) == 0.0


def test_interface_missing_at_start_then_appearing(tmp_path: Path) -> None:
    w = World(tmp_path)
    del w.rtnl.links["lanA"]

    async def body(w: World, d: Daemon) -> None:
        st = d.status()["instances"][0]
        assert (st["state"], st["last_transition"]["cause"]) == ("FAULT", "interface down")
        assert not d.status()["healthy"]
        w.rtnl.links["lanA"] = LinkInfo(7, "lanA", True, "02:00:00:00:00:11")
        w.rtnl.set_link(w.rtnl.links["lanA"])
        for _ in range(5):
            await asyncio.sleep(0)
        st = d.status()["instances"][0]
        assert st["state"] == "BACKUP" and st["primary_address"] == "192.0.2.11"
        assert ("lanA", 4) in w.sockets

    run(tmp_path, body, w)


def test_failing_vip_installs_give_up_mastership_despite_working_sends(tmp_path: Path) -> None:
    async def body(w: World, d: Daemon) -> None:
        w.rtnl.fail_adds = True
        fire(w, d)  # master: the advert goes out, the VIP install fails
        for _ in range(3):
            await asyncio.sleep(0)
        st = d.status()["instances"][0]
        assert st["state"] == "MASTER" and st["io_failures"] == 1
        sent = len(w.sockets["lanA", 4].sent)
        for _ in range(6):  # the retries (one interval apart) fail as well; the adverts
            fire(w, d)  # in between succeed and must not reset the count
            for _ in range(3):
                await asyncio.sleep(0)
            if d.status()["instances"][0]["state"] != "MASTER":
                break
        assert len(w.sockets["lanA", 4].sent) > sent
        st = d.status()["instances"][0]
        assert st["state"] == "FAULT"
        assert st["last_transition"]["cause"] == "3 VIP install failures"

    run(tmp_path, body)
