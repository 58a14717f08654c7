"""Issue 6 in the driver, through the fakes: each test names the defect it covers and
failed on 7ed180e. No root, no real time (the daemon's clock is driven)."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, ip_interface
from pathlib import Path

import pytest

from test_runtime import CONFIG, PEER, World, advert, fire, run, settle
from vipd.config import loads
from vipd.core.packet import VRRP_GROUP_V4, IpMeta
from vipd.io.lock import AlreadyRunning
from vipd.io.netlink_monitor import LinkEvent, Resync
from vipd.io.nft import DROP_TABLE, NftAcceptGuard
from vipd.io.rtnl import LinkInfo
from vipd.runtime import Daemon
from vipd.runtime.links import LINK_MONITOR

VIP = ip_interface("192.0.2.1/24")


def master(w: World, d: Daemon) -> None:
    fire(w, d)
    assert d.status()["instances"][0]["state"] == "MASTER"


# ---------------------------------------------------------------- defect 2 in status


def test_defect2_mismatching_peer_is_listed_and_degrades_status(tmp_path: Path) -> None:
    async def body(w: World, d: Daemon) -> None:
        w.deliver(d, advert(200, ("192.0.2.1", "192.0.2.9")))
        st = d.status()
        inst = st["instances"][0]
        assert inst["state"] == "BACKUP" and inst["master"] == str(PEER)  # relaxed: elected
        peer = inst["peers"][0]
        assert peer["addresses_differ"] == {"missing_there": [], "extra_there": ["192.0.2.9"]}
        assert inst["address_mismatch_peers"] == [str(PEER)]
        assert not st["healthy"]
        assert any("another address list" in p for p in st["problems"])

    run(tmp_path, body)


def test_defect2_strict_master_hearing_a_mismatching_master_is_a_dual_master(
        tmp_path: Path) -> None:
    w = World(tmp_path)
    w.cfg = loads(CONFIG.replace("SOCK", w.sock_path).replace(
        "vips: [192.0.2.1/24]}", "vips: [192.0.2.1/24], address_check: strict}"))

    async def body(w: World, d: Daemon) -> None:
        master(w, d)
        w.deliver(d, advert(200, ("192.0.2.1", "192.0.2.9")))  # would win, but dropped
        st = d.status()
        inst = st["instances"][0]
        assert inst["state"] == "MASTER" and inst["drops"] == {"address_mismatch": 1}
        assert inst["dual_master"] and inst["peers"][0]["priority"] == 200
        assert any("two masters" in p for p in st["problems"])

    run(tmp_path, body, w)


# ---------------------------------------------------------------- defect 7: garbage


def test_defect7_garbage_after_a_valid_advert_does_not_displace_it(tmp_path: Path) -> None:
    """A valid advert and then, in the same drained batch, bad-checksum copies from the
    same source: the valid one still re-arms Master_Down_Timer."""
    async def body(w: World, d: Daemon) -> None:
        slot = next(iter(d.slots.values()))
        good = advert(200)
        bad = bytearray(good)
        bad[7] ^= 0xFF
        sock = w.sockets["lanA", 4]
        for i in range(50):
            w.t += 0.05
            sock.inbox.append((good, IpMeta(4, PEER, VRRP_GROUP_V4, 255), 0.0))
            sock.inbox += [(bytes(bad), IpMeta(4, PEER, VRRP_GROUP_V4, 255), 0.0)] * 5
            d.read("lanA", 4)
            assert slot.router.master_down_timer is not None
            assert slot.router.master_down_timer > w.t, i
        st = d.status()
        assert st["instances"][0]["state"] == "BACKUP"
        assert st["instances"][0]["transitions"] == 1  # INIT -> BACKUP only
        assert st["interfaces"][0]["drops"]["IPv4"]["checksum"] == 250

    run(tmp_path, body)


# ---------------------------------------------------------------- defect 6: the kernel


def test_defect6_vip_removed_from_outside_is_restored_and_counted(tmp_path: Path) -> None:
    async def body(w: World, d: Daemon) -> None:
        master(w, d)
        await settle()
        inst = d.status()["instances"][0]
        assert inst["vips_in_kernel"] == ["192.0.2.1/24"] and d.status()["healthy"]
        w.rtnl.remove(7, VIP)  # `ip addr del` by someone else
        assert d.status()["instances"][0]["vips_in_kernel"] == []
        await settle()
        assert VIP in [a for a, _ in w.rtnl.addrs[7]]
        inst = d.status()["instances"][0]
        assert inst["vips_repaired"] == 1 and inst["vips_in_kernel"] == ["192.0.2.1/24"]
        assert len(w.announcer.rounds) == 2  # announced again after the repair

    run(tmp_path, body)


def test_defect6_status_reports_what_the_kernel_holds(tmp_path: Path) -> None:
    async def body(w: World, d: Daemon) -> None:
        # a VIP of ours appears on a backup (someone added it by hand)
        await w.rtnl.add_address(7, VIP)
        st = d.status()
        assert st["instances"][0]["state"] == "BACKUP" and not st["healthy"]
        assert "BACKUP but the kernel holds 192.0.2.1/24" in " ".join(st["problems"])
        w.rtnl.remove(7, VIP)
        assert d.status()["healthy"]
        # a master whose VIP cannot be put back says so
        master(w, d)
        await settle()
        w.rtnl.fail_adds = True
        w.rtnl.remove(7, VIP)
        await settle()
        st = d.status()
        assert "MASTER but the kernel lacks 192.0.2.1/24" in " ".join(st["problems"])

    run(tmp_path, body)


# ---------------------------------------------------------------- defect 10: the monitor


def test_defect10_monitor_that_dies_is_restarted_and_degrades_status(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.rtnl.watch_failures = 1

    async def body(w: World, d: Daemon) -> None:
        st = d.status()
        assert LINK_MONITOR in d.tasks_down and not st["healthy"]
        assert any(LINK_MONITOR in p for p in st["problems"])
        for _ in range(100):  # the supervisor backs off 0.1 s (loop time), then restarts
            await asyncio.sleep(0.01)
            if not d.tasks_down:
                break
        assert d.tasks_down == {} and d.task_restarts[LINK_MONITOR] == 1
        assert d.status()["healthy"]
        # and it works: a link going down is seen
        assert w.rtnl.callback is not None
        w.rtnl.links["lanA"] = LinkInfo(7, "lanA", False, "02:00:00:00:00:11")
        w.rtnl.callback(LinkEvent(7, "lanA", False, "02:00:00:00:00:11"))
        await settle(10)
        assert d.status()["instances"][0]["state"] == "FAULT"

    run(tmp_path, body, w)


def test_defect10_overrun_resyncs_links_and_addresses_from_a_dump(tmp_path: Path) -> None:
    async def body(w: World, d: Daemon) -> None:
        master(w, d)
        await settle()
        # events lost in an overrun: the link went down and the VIP was removed
        w.rtnl.links["lanA"] = LinkInfo(7, "lanA", False, "02:00:00:00:00:11")
        w.rtnl.addrs[7] = [(ip_interface("192.0.2.11/24"), 0)]
        assert w.rtnl.callback is not None
        w.rtnl.callback(Resync("netlink receive buffer overrun (ENOBUFS)"))
        await settle(10)
        inst = d.status()["instances"][0]
        assert inst["state"] == "FAULT" and inst["vips_in_kernel"] == []

    run(tmp_path, body)


# ---------------------------------------------------------------- defect 5: second daemon


def test_defect5_second_daemon_refuses_before_touching_anything(tmp_path: Path) -> None:
    async def body(w: World, d: Daemon) -> None:
        master(w, d)
        await settle()
        sock_inode = os.stat(w.sock_path).st_ino
        second = Daemon(w.cfg, rtnl=w.rtnl, open_socket=w.open_socket,
                        announcer=w.announcer, clock=lambda: w.t, accept_guard=w.guard,
                        lock=w.lock())
        with pytest.raises(AlreadyRunning, match=f"pid {os.getpid()}"):
            await second.start()
        await second.close()
        # same interface, another control socket: refused as well
        other = str(tmp_path / "other.sock")
        third = Daemon(w.cfg, rtnl=w.rtnl, open_socket=w.open_socket, announcer=w.announcer,
                       clock=lambda: w.t, accept_guard=w.guard, control_socket=other,
                       lock=w.lock(other))
        with pytest.raises(AlreadyRunning, match="interface lanA is already driven"):
            await third.start()
        await third.close()
        # nothing of the first was touched
        assert VIP in [a for a, _ in w.rtnl.addrs[7]]
        assert os.stat(w.sock_path).st_ino == sock_inode
        assert w.guard.denied == {IPv4Address("192.0.2.1")}
        assert d.status()["instances"][0]["state"] == "MASTER"

    run(tmp_path, body)


def test_defect5_stale_lock_from_kill_9_is_taken_over(tmp_path: Path) -> None:
    w = World(tmp_path)
    Path(w.sock_path + ".lock").write_text("999999\n")  # no process holds the flock
    os.symlink("/nonexistent", w.sock_path + ".x")  # unrelated clutter is left alone

    async def body(w: World, d: Daemon) -> None:
        assert Path(w.sock_path + ".lock").read_text() == f"{os.getpid()}\n"

    run(tmp_path, body, w)


@pytest.mark.parametrize("kind", ["file", "symlink", "directory"])
def test_defect5_control_path_that_is_not_a_socket_is_never_replaced(tmp_path: Path,
                                                                     kind: str) -> None:
    w = World(tmp_path)
    target = tmp_path / "precious"
    target.write_text("keep me")
    p = Path(w.sock_path)
    if kind == "file":
        p.write_text("not a socket")
    elif kind == "symlink":
        p.symlink_to(target)
    else:
        p.mkdir()

    async def main() -> None:
        with pytest.raises(OSError, match="not a socket: refusing"):
            await w.daemon()

    asyncio.run(main())
    assert target.read_text() == "keep me"
    assert os.path.lexists(p) and not stat.S_ISSOCK(os.lstat(p).st_mode)
    assert w.rtnl.addrs[7] == [(ip_interface("192.0.2.11/24"), 0)]


def test_defect5_socket_directory_gets_an_explicit_mode(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.sock_path = str(tmp_path / "run" / "vipd" / "vipd.sock")
    old = os.umask(0o077)
    try:
        run(tmp_path, lambda w, d: settle(), w)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "run" / "vipd").st_mode) == 0o755


# ---------------------------------------------------------------- defect 9: reload


RELOAD = CONFIG + """  - name: lan-b
    interface: lanB
    instances:
      - {vrid: 52, priority: 150, advert_interval: 100ms, vips: [198.51.100.1/24],
         virtual_mac: true}
"""


def add_lan_b(w: World) -> None:
    """The second VLAN's interface appears (or is there from the start)."""
    w.rtnl.links["lanB"] = LinkInfo(8, "lanB", True, "02:00:00:00:00:12")
    w.rtnl.addrs[8] = [(ip_interface("198.51.100.11/24"), 0)]


def write_reload(w: World, cfg_path: Path) -> None:
    """The new configuration: lan-a's priority changed, lan-b added with a virtual MAC."""
    cfg_path.write_text(RELOAD.replace("SOCK", w.sock_path).replace(
        "priority: 150, advert_interval: 100ms, vips: [192.0.2.1/24]",
        "priority: 160, advert_interval: 100ms, vips: [192.0.2.1/24]"))


def run_reloadable(tmp_path: Path, body: Callable[[World, Daemon], Awaitable[None]],
                   w: World, cfg_path: Path) -> None:
    """run() with a config file to reload and the virtual-MAC adapters faked."""
    from vipd.io.vmac import FakeSysctl

    cfg_path.write_text(CONFIG.replace("SOCK", w.sock_path))
    run(tmp_path, body, w, config_path=str(cfg_path), sysctl=FakeSysctl(),
        open_send_socket=w.open_socket, set_link_up=lambda name, up: None)


def test_defect9_reload_with_a_vmac_vlan_on_a_missing_interface_applies_whole(
        tmp_path: Path) -> None:
    cfg_path = tmp_path / "vipd.yaml"

    async def body(w: World, d: Daemon) -> None:
        master(w, d)
        await settle()
        write_reload(w, cfg_path)
        result = await d.reload()
        assert result == {"kept": 0, "replaced_or_removed": 1, "started": 2}
        st = {i["vlan"]: i for i in d.status()["instances"]}
        assert st["lan-a"]["priority"] == 160 and st["lan-a"]["state"] == "BACKUP"
        assert st["lan-b"]["state"] == "FAULT"  # waits for lanB, and says so
        assert not d.status()["healthy"]
        # lanB appears: its macvlan is made and the router joins
        add_lan_b(w)
        w.rtnl.set_link(w.rtnl.links["lanB"])
        await settle(10)
        assert "vmac8.52" in w.rtnl.links
        assert {i["vlan"]: i["state"] for i in d.status()["instances"]}["lan-b"] == "BACKUP"

    run_reloadable(tmp_path, body, World(tmp_path), cfg_path)


def test_defect9_reload_that_fails_half_way_is_refused_and_the_old_config_runs(
        tmp_path: Path) -> None:
    from vipd.config import ConfigError

    cfg_path = tmp_path / "vipd.yaml"

    async def body(w: World, d: Daemon) -> None:
        master(w, d)
        await settle()
        slot = next(iter(d.slots.values()))
        timer = slot.router.get_timer()

        async def no_macvlan(parent: int, name: str, mac: str) -> LinkInfo:
            raise OSError(errno.EOPNOTSUPP, "macvlan: Operation not supported")

        w.rtnl.create_macvlan = no_macvlan  # type: ignore[method-assign]
        write_reload(w, cfg_path)
        with pytest.raises(ConfigError, match="cannot create macvlan"):
            await d.reload()
        assert next(iter(d.slots.values())) is slot and len(d.slots) == 1
        assert slot.router.state.value == "MASTER" and slot.router.get_timer() == timer
        assert slot.router.config.priority == 150 and d.reloads == 0
        assert VIP in [a for a, _ in w.rtnl.addrs[7]] and d.status()["healthy"]
        assert "lanB" not in d.links.ifaces

    w = World(tmp_path)
    add_lan_b(w)
    run_reloadable(tmp_path, body, w, cfg_path)


# ---------------------------------------------------------------- defect 11: nftables


def test_defect11_first_apply_removes_a_stale_table_even_with_nothing_to_deny(
        tmp_path: Path) -> None:
    log = tmp_path / "nft.log"
    fake = tmp_path / "nft"
    fake.write_text(f"#!/bin/sh\ncat >> {log}\necho --- >> {log}\n")
    fake.chmod(0o755)

    async def main() -> None:
        guard = NftAcceptGuard(str(fake))
        assert await guard.apply(set()) is True
        assert log.read_text() == DROP_TABLE + "---\n"
        assert await guard.apply(set()) is True  # reconciled once: no more runs
        assert log.read_text().count("---") == 1

    asyncio.run(main())


# ---------------------------------------------------------------- issue 7.5, found here


def test_recreated_interface_releases_its_old_sockets(tmp_path: Path) -> None:
    async def body(w: World, d: Daemon) -> None:
        assert w.announcer.open_links == {7}
        for index in (17, 27, 37):  # deleted and created again, with a new index each time
            w.rtnl.set_link(LinkInfo(index, "lanA", True, "02:00:00:00:00:11"))
            await settle()
        assert w.announcer.open_links == {37}
        assert set(d.links.kernel_addrs) == {37}

    w = World(tmp_path)
    for index in (17, 27, 37):
        w.rtnl.addrs[index] = [(ip_interface("192.0.2.11/24"), 0)]
    run(tmp_path, body, w)


def test_vipctl_text_view_shows_differences_kernel_vips_and_notes(tmp_path: Path) -> None:
    from vipd.vipctl import render

    async def body(w: World, d: Daemon) -> None:
        w.deliver(d, advert(200, ("192.0.2.1", "192.0.2.9")))
        text = render(d.status())
        assert "DEGRADED" in text and "another address list" in text
        assert "addresses differ" in text and "extra there: 192.0.2.9" in text
        assert "VIPs in kernel" in text and "accepted, noted" in text

    run(tmp_path, body)


def test_vipctl_summary_is_one_line_per_router_and_replies_in_words(tmp_path: Path) -> None:
    from vipd.status import SCHEMA_VERSION
    from vipd.vipctl import in_words, render_summary

    async def body(w: World, d: Daemon) -> None:
        st = d.status()
        assert st["schema_version"] == SCHEMA_VERSION == 1
        lines = render_summary(st).splitlines()
        assert len(lines) == 2 + len(st["instances"]) + len(st["problems"])
        for i, line in zip(st["instances"], lines[2:], strict=False):
            assert line.split()[:4] == [i["interface"], str(i["vrid"]), i["family"][2:],
                                        i["state"]]
        assert in_words("maintenance", {"maintenance": True}).startswith("maintenance on")
        assert in_words("reload", {"reload": {"kept": 3, "replaced_or_removed": 1,
                                              "started": 1}}) == (
            "reloaded: 3 virtual routers kept as they were, 1 replaced or removed, 1 started")

    run(tmp_path, body)


def test_defect10_failed_resync_degrades_status_and_is_retried(tmp_path: Path) -> None:
    async def body(w: World, d: Daemon) -> None:
        real = w.rtnl.link
        calls = {"n": 0}

        async def flaky(name: str) -> LinkInfo | None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError(errno.EBUSY, "Device or resource busy")
            return await real(name)

        w.rtnl.link = flaky  # type: ignore[method-assign]
        assert w.rtnl.callback is not None
        w.rtnl.callback(Resync("netlink receive buffer overrun (ENOBUFS)"))
        await settle()
        assert "link and address resync" in d.tasks_down and not d.status()["healthy"]
        for _ in range(150):  # retried one second (loop time) later
            await asyncio.sleep(0.01)
            if not d.tasks_down:
                break
        assert d.tasks_down == {} and d.status()["healthy"] and calls["n"] >= 2

    run(tmp_path, body)


def test_a_takeover_due_during_a_deferred_read_hears_the_waiting_advert_first(
        tmp_path: Path) -> None:
    """Reads are deferred by RX_COALESCE_S to batch bursts; a Master_Down_Timer expiring
    in that window must not take over while the master's advert waits in the socket."""
    async def body(w: World, d: Daemon) -> None:
        slot = next(iter(d.slots.values()))
        w.deliver(d, advert(200))  # a master is heard
        iface = d.links.ifaces["lanA"]
        # received (kernel time) 2 ms ago, before the deadline below; not read yet
        w.sockets["lanA", 4].inbox.append((advert(200), IpMeta(4, PEER, VRRP_GROUP_V4, 255),
                                           0.002))
        iface.deferred[4] = asyncio.get_running_loop().call_later(60, lambda: None)
        deadline = slot.router.master_down_timer
        assert deadline is not None
        w.t = float(deadline) + 1e-6
        d.on_timer()
        assert slot.router.state.value == "BACKUP"
        assert slot.router.counters.adverts_received == 2 and not iface.deferred

    run(tmp_path, body)


def test_each_virtual_mac_is_made_once_at_start(tmp_path: Path) -> None:
    from vipd.io.vmac import FakeSysctl

    w = World(tmp_path)
    w.cfg = loads(CONFIG.replace("SOCK", w.sock_path).replace(
        "vips: [192.0.2.1/24]}", "vips: [192.0.2.1/24], virtual_mac: true}"))
    made: list[str] = []
    real = w.rtnl.create_macvlan

    async def counting(parent: int, name: str, mac: str) -> LinkInfo:
        made.append(name)
        return await real(parent, name, mac)

    w.rtnl.create_macvlan = counting  # type: ignore[method-assign]
    sent: list[object] = []

    def send_socket(name: str, index: int, family: int) -> object:
        sent.append(name)
        return w.open_socket(name, index, family)

    async def body(w: World, d: Daemon) -> None:
        assert made == ["vmac7.51"] and sent == ["vmac7.51"]

    run(tmp_path, body, w, sysctl=FakeSysctl(), open_send_socket=send_socket,
        set_link_up=lambda n, u: None)
