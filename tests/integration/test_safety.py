"""Issue 6 on a real kernel: no silent dual master, no black hole. Each test names the
defect it covers and failed on 7ed180e. Waits poll observable state with deadlines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lab import Lab, wait_for
from scenario import (
    Speaker,
    holder,
    rewrite_config,
    start_pair,
    start_vipd,
    states,
    status,
    vipctl,
    vipd_config,
)

INTERVAL_MS = 100


def pair(lab: Lab, **config: object) -> tuple[Speaker, Speaker]:
    return start_pair(lab, INTERVAL_MS, **config)


def steady(what: str, check: object, seconds: float) -> None:
    """`check()` holds at every poll for `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert check(), what  # type: ignore[operator]
        time.sleep(0.02)


# ---------------------------------------------------------------- defect 2


def test_defect2_rolling_vip_change_one_master_and_loud(lab: Lab) -> None:
    cfg1 = vipd_config(lab, "r1", 200, INTERVAL_MS)
    cfg1["vlans"][0]["instances"][0]["vips"].append("192.0.2.2/24")  # step one of a change
    start_vipd(lab, "r1", cfg1)
    r2 = start_vipd(lab, "r2", vipd_config(lab, "r2", 100, INTERVAL_MS))
    wait_for(lambda: holder(lab, "lanA") == ["r1"], 10, what="r1 elected")
    wait_for(lambda: set(states(lab, r2)) == {"BACKUP"}, 5, what="r2 backup")
    steady("one master for the VIP", lambda: holder(lab, "lanA") == ["r1"], 1.0)
    s2 = status(lab, r2)
    a = s2["instances"][0]
    assert a["master"] == "192.0.2.11" and a["address_mismatch_peers"] == ["192.0.2.11"]
    assert a["peers"][0]["addresses_differ"] == {"missing_there": [],
                                                 "extra_there": ["192.0.2.2"]}
    assert not s2["healthy"] and vipctl(lab, r2, "status").returncode == 1
    log = (lab.workdir / "r2.vipd.log").read_text()
    assert log.count("advertises [192.0.2.1, 192.0.2.2], ours [192.0.2.1]") == 1  # limited


# ---------------------------------------------------------------- defect 3 and 4


def test_defect3_virtual_mac_restore_and_preemption_vipd_pair(lab: Lab) -> None:
    """Both nodes send from the same virtual MAC while master: each must still hear the
    other. r2 (100) alone until MASTER, then r1 (200) starts and must preempt; then a
    partition (both master) and its heal must end with one master again."""
    fams = ("ipv4", "ipv6")
    r2 = start_vipd(lab, "r2", vipd_config(lab, "r2", 100, INTERVAL_MS, fams,
                                           virtual_mac=True))
    wait_for(lambda: holder(lab, "lanA") == ["r2"] and holder(lab, "lanA", "ipv6") == ["r2"],
             10, what="r2 master alone")
    start_vipd(lab, "r1", vipd_config(lab, "r1", 200, INTERVAL_MS, fams,
                                           virtual_mac=True))
    for fam in ("ipv4", "ipv6"):
        wait_for(lambda fam=fam: holder(lab, "lanA", fam) == ["r1"]  # type: ignore[misc]
                 and holder(lab, "lanB", fam) == ["r1"], 5, what=f"r1 preempts ({fam})")
    wait_for(lambda: set(states(lab, r2)) == {"BACKUP"}, 3, what="r2 backup")
    ifindex = lab.run("r1", ["cat", "/sys/class/net/lanA/ifindex"]).stdout.strip()
    detail = lab.run("r1", ["ip", "-d", "link", "show", f"vmac{ifindex}.51"]).stdout
    assert "macvlan mode bridge" in detail
    lab.cut("r1")  # a partition: r2 takes over while r1 keeps running alone
    wait_for(lambda: set(states(lab, r2)) == {"MASTER"}, 5, what="r2 takes over")
    lab.restore("r1")
    for fam in ("ipv4", "ipv6"):
        wait_for(lambda fam=fam: holder(lab, "lanA", fam) == ["r1"]  # type: ignore[misc]
                 and holder(lab, "lanB", fam) == ["r1"], 5, what=f"one master ({fam})")
    wait_for(lambda: set(states(lab, r2)) == {"BACKUP"}, 3, what="r2 backup again")
    steady("one master after the heal", lambda: holder(lab, "lanA") == ["r1"], 1.0)


def test_defect4_vmac_with_accept_mode_never_flips_the_clients_entry(lab: Lab) -> None:
    vmac = "00:00:5e:00:01:33"
    r1 = start_vipd(lab, "r1", vipd_config(lab, "r1", 200, INTERVAL_MS, virtual_mac=True,
                                           accept_mode=True))
    wait_for(lambda: holder(lab, "lanA") == ["r1"], 10, what="r1 master")
    assert lab.run("r1", ["sysctl", "-n", "net.ipv4.conf.lanA.arp_announce"]).stdout.strip() \
        == "2"
    lab.run("client", ["ping", "-c", "1", "-W", "1", "192.0.2.1"])  # accept_mode: answered
    assert lab.neighbour("client", "192.0.2.1") == vmac
    # r1 now sends from the VIP to a host it has no neighbour entry for: its ARP request
    # must not carry the VIP with the parent's MAC
    lab.run("r1", ["ip", "neigh", "flush", "all"])
    lab.run("r1", ["ping", "-c", "1", "-W", "1", "-I", "192.0.2.1", "192.0.2.100"],
            check=False)
    steady("the client's entry for the VIP stays the virtual MAC",
           lambda: lab.neighbour("client", "192.0.2.1") == vmac, 0.5)
    assert status(lab, r1)["healthy"]


# ---------------------------------------------------------------- defect 5


def test_defect5_second_vipd_started_by_mistake_refuses_and_harms_nothing(lab: Lab) -> None:
    r1, r2 = pair(lab)
    table = lab.run("r1", ["nft", "list", "table", "inet", "vipd_accept"], check=False)
    for extra in ([], ["--control-socket", str(lab.workdir / "other.sock")]):
        t0 = time.monotonic()
        p = subprocess.run(lab.cmd("r1", [sys.executable, "-m", "vipd", "-c", str(r1.config),
                                          *extra]),
                           capture_output=True, text=True, timeout=20)
        assert p.returncode == 1 and time.monotonic() - t0 < 10
        assert ("holds" in p.stderr and "refusing to start" in p.stderr) or \
            "already driven by another vipd" in p.stderr, p.stderr
    # the first one is untouched: VIPs, socket, nftables table, mastership
    assert holder(lab, "lanA") == ["r1"] and holder(lab, "lanB") == ["r1"]
    s1 = status(lab, r1)
    assert s1["healthy"] and {i["state"] for i in s1["instances"]} == {"MASTER"}
    after = lab.run("r1", ["nft", "list", "table", "inet", "vipd_accept"], check=False)
    assert after.returncode == table.returncode and after.stdout == table.stdout
    steady("r2 stays backup", lambda: set(states(lab, r2)) == {"BACKUP"}, 0.5)
    # kill -9 leaves its lock behind; a new start takes it over
    os.kill(r1.proc.pid, signal.SIGKILL)
    r1.proc.wait(5)
    r1b = start_vipd(lab, "r1", vipd_config(lab, "r1", 200, INTERVAL_MS))
    wait_for(lambda: set(states(lab, r1b)) == {"MASTER"}, 5, what="restarted r1 master")


def test_defect5_regular_file_at_the_socket_path_is_never_deleted(lab: Lab) -> None:
    cfg = vipd_config(lab, "r1", 200, INTERVAL_MS)
    path = Path(cfg["node"]["control_socket"])
    path.write_text("precious")
    cfg_path = lab.workdir / "r1.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(cfg))
    p = subprocess.run(lab.cmd("r1", [sys.executable, "-m", "vipd", "-c", str(cfg_path)]),
                       capture_output=True, text=True, timeout=20)
    assert p.returncode == 1 and "not a socket: refusing" in p.stderr, p.stderr
    assert path.read_text() == "precious"


# ---------------------------------------------------------------- defect 6


def test_defect6_vip_removed_from_outside_is_put_back(lab: Lab) -> None:
    r1, r2 = pair(lab)
    lab.run("r1", ["ip", "addr", "del", "192.0.2.1/24", "dev", "lanA"])
    wait_for(lambda: holder(lab, "lanA") == ["r1"], 3, what="VIP restored")
    inst = status(lab, r1)["instances"][0]
    assert inst["vips_repaired"] == 1 and inst["vips_in_kernel"] == ["192.0.2.1/24"]
    assert "removed from outside while MASTER: restored" in \
        (lab.workdir / "r1.vipd.log").read_text()
    # a VIP of ours on a backup is reported, not hidden
    lab.run("r2", ["ip", "addr", "add", "198.51.100.1/24", "dev", "lanB"])
    wait_for(lambda: not status(lab, r2)["healthy"], 3, what="r2 degraded")
    assert any("BACKUP but the kernel holds 198.51.100.1/24" in p
               for p in status(lab, r2)["problems"])


# ---------------------------------------------------------------- defect 7


def test_defect7_garbage_claiming_the_masters_address_causes_no_takeover(lab: Lab) -> None:
    r1, r2 = pair(lab)
    flood = Path(__file__).resolve().parents[2] / "netns-lab" / "flood.py"
    p = lab.run("client", [sys.executable, str(flood), "--kind", "garbage", "--src",
                           "192.0.2.11", "--rate", "2000", "--seconds", "5"], timeout=60)
    assert int(p.stdout) >= 5000
    s2 = status(lab, r2)
    assert [i["became_master"] for i in s2["instances"]] == [0, 0]
    assert s2["interfaces"][0]["drops"]["IPv4"]["checksum"] >= 5000
    assert holder(lab, "lanA") == ["r1"]


# ---------------------------------------------------------------- defect 8


def test_defect8_node_in_maintenance_stays_drained_through_link_flaps(lab: Lab) -> None:
    r1, r2 = pair(lab)
    assert vipctl(lab, r1, "maintenance", "on").returncode == 0
    wait_for(lambda: holder(lab, "lanA") == ["r2"], 3, what="drained to r2")
    for _ in range(5):
        lab.run("r1", ["ip", "link", "set", "lanA", "down"])
        lab.run("r1", ["ip", "link", "set", "lanA", "up"])
        steady("the drained node never takes the VIP back",
               lambda: holder(lab, "lanA") == ["r2"], 0.6)
    assert [i["became_master"] for i in status(lab, r1)["instances"]] == [1, 1]


# ---------------------------------------------------------------- defect 9


def test_defect9_reload_with_a_vmac_vlan_on_a_missing_interface_applies_whole(
        lab: Lab) -> None:
    r1, r2 = pair(lab)
    cfg = vipd_config(lab, "r1", 200, INTERVAL_MS)
    for vlan in cfg["vlans"]:
        vlan["instances"][0]["priority"] = 210
    cfg["vlans"].append({"name": "lanC", "interface": "lanC", "instances": [{
        "vrid": 60, "priority": 200, "advert_interval": "100ms", "virtual_mac": True,
        "vips": ["203.0.113.1/24"]}]})
    rewrite_config(r1, cfg)
    p = vipctl(lab, r1, "reload")
    assert p.returncode == 0, p.stderr
    wait_for(lambda: {i["vlan"]: i["state"] for i in status(lab, r1)["instances"]}["lanA"]
             == "MASTER", 3, what="the replaced lanA router master again")
    s1 = {i["vlan"]: i for i in status(lab, r1)["instances"]}
    assert s1["lanA"]["priority"] == 210 and s1["lanC"]["state"] == "FAULT"
    assert vipctl(lab, r1, "status").returncode == 1  # degraded, and says why
    assert holder(lab, "lanA") == ["r1"]
    # the interface appears: its macvlan is made and its router runs
    lab.run("r1", ["ip", "link", "add", "lanC", "type", "veth", "peer", "name", "lanCp"])
    lab.run("r1", ["ip", "addr", "add", "203.0.113.11/24", "dev", "lanC"])
    lab.run("r1", ["ip", "link", "set", "lanCp", "up"])
    lab.run("r1", ["ip", "link", "set", "lanC", "up"])
    wait_for(lambda: {i["vlan"]: i["state"] for i in status(lab, r1)["instances"]}["lanC"]
             == "MASTER", 5, what="lanC router running")
    assert "203.0.113.1" in lab.addresses("r1")


# ---------------------------------------------------------------- defect 10


def test_defect10_a_route_flood_does_not_blind_link_monitoring(lab: Lab) -> None:
    r1, r2 = pair(lab)
    batch = "".join(f"route add 2001:db8:ff::{i:x}/128 dev lanA\n" for i in range(60000))
    subprocess.run(lab.cmd("r1", ["ip", "-6", "-batch", "-"]), input=batch, text=True,
                   check=True, timeout=120)
    s1 = status(lab, r1)
    assert s1["healthy"] and s1["task_restarts"] == {}
    lab.cut("r1")
    wait_for(lambda: set(states(lab, r1)) == {"FAULT"}, 3, what="r1 sees its links down")
    wait_for(lambda: holder(lab, "lanA") == ["r2"], 3, what="VIP only on r2")


MONITOR = r'''
import asyncio, subprocess, sys
from vipd.io.netlink_monitor import AddrEvent, LinkEvent, Resync, watch
events = []
def on(ev):
    events.append(ev)
    if ev == Resync("monitor started") and len(events) == 1:
        # block the loop while the kernel queues thousands of address events
        lines = "".join(f"addr add 2001:db8:fe::{i:x}/128 dev flood0 nodad\n"
                        for i in range(int(sys.argv[1])))
        subprocess.run(["ip", "-batch", "-"], input=lines, text=True, check=True)
        subprocess.run(["ip", "link", "set", "flood0", "down"], check=True)
async def main():
    task = asyncio.ensure_future(watch(on, rcvbuf=int(sys.argv[2])))
    for _ in range(200):
        await asyncio.sleep(0.02)
        if any(isinstance(e, LinkEvent) and e.name == "flood0" and not e.up
               for e in events[1:]) or any(isinstance(e, Resync) for e in events[1:]):
            break
    await asyncio.sleep(0.2)
    task.cancel()
    resyncs = [e.reason for e in events[1:] if isinstance(e, Resync)]
    addrs = sum(isinstance(e, AddrEvent) for e in events)
    print(len(resyncs), addrs, resyncs[:1])
asyncio.run(main())
'''


def test_defect10_monitor_overrun_is_reported_as_a_resync(lab: Lab) -> None:
    """The real codec against the kernel: a tiny buffer and a blocked loop force ENOBUFS;
    the monitor reports it (the daemon then dumps again) and keeps running."""
    lab.run("r1", ["ip", "link", "add", "flood0", "type", "veth", "peer", "name", "flood1"])
    lab.run("r1", ["ip", "link", "set", "flood0", "up"])
    script = lab.workdir / "monitor.py"
    script.write_text(MONITOR)
    p = lab.run("r1", [sys.executable, str(script), "3000", "16384"], timeout=60)
    resyncs, addrs, first = p.stdout.split(maxsplit=2)
    assert int(resyncs) >= 1 and "ENOBUFS" in first, p.stdout
    assert int(addrs) < 3000  # events were lost: that is what the resync is for


# ---------------------------------------------------------------- defect 11


def test_defect11_stale_nft_table_from_kill_9_is_removed_at_start(lab: Lab) -> None:
    r1 = start_vipd(lab, "r1", vipd_config(lab, "r1", 200, INTERVAL_MS))  # accept_mode false
    wait_for(lambda: holder(lab, "lanA") == ["r1"], 10, what="r1 master")
    if not status(lab, r1)["accept_mode_enforced"]:
        import pytest

        pytest.skip("nftables is not usable here")
    assert lab.run("client", ["ping", "-c", "1", "-W", "1", "192.0.2.1"],
                   check=False).returncode != 0
    os.kill(r1.proc.pid, signal.SIGKILL)
    r1.proc.wait(5)
    r1b = start_vipd(lab, "r1", vipd_config(lab, "r1", 200, INTERVAL_MS, accept_mode=True))
    wait_for(lambda: holder(lab, "lanA") == ["r1"] and set(states(lab, r1b)) == {"MASTER"},
             10, what="r1 master again")
    assert "vipd_accept" not in lab.run("r1", ["nft", "list", "tables"]).stdout
    lab.run("client", ["ping", "-c", "1", "-W", "1", "192.0.2.1"])  # answered now
