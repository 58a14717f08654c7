"""Run VRRP speakers (vipd, or keepalived as the baseline) on a lab's routers.

Both get the same topology, VRIDs, priorities and timers, so a benchmark compares like with
like. vipd's control socket and logs live in the lab's workdir.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from lab import Lab, LabError, run, wait_for

VRID_BASE = 50


@dataclass
class Speaker:
    router: str
    proc: subprocess.Popen[bytes]
    kind: str
    config: Path
    socket: Path | None = None


def vipd_config(lab: Lab, router: str, priority: int, interval_ms: int,
                families: tuple[str, ...] = ("ipv4",), preempt: bool = True,
                garp_count: int = 3, virtual_mac: bool = False,
                mode: str = "per-vlan-active", version: int = 3,
                accept_mode: bool | None = None,
                advertise_link_local: bool = True) -> dict[str, Any]:
    vlans = []
    for i, vlan in enumerate(lab.topo.vlans):
        vips = [str(lab.topo.vip(vlan, fam)) for fam in families
                if lab.topo.vip(vlan, fam) is not None]
        vlans.append({"name": vlan, "interface": vlan, "instances": [{
            "vrid": VRID_BASE + 1 + i, "priority": priority,
            "advert_interval": f"{interval_ms}ms", "version": version, "preempt": preempt,
            "garp": {"count": garp_count, "interval": "100ms"}, "vips": vips,
            **({"virtual_mac": True} if virtual_mac else {}),
            **({} if accept_mode is None else {"accept_mode": accept_mode}),
            **({} if advertise_link_local else {"advertise_link_local": False})}]})
    return {"node": {"name": router, "control_socket": str(lab.workdir / f"{router}.sock")},
            "mode": mode, "vlans": vlans}


def start_vipd(lab: Lab, router: str, config: dict[str, Any],
               env: dict[str, str] | None = None, control_socket: Path | None = None) -> Speaker:
    """Start vipd on a router; `control_socket` overrides the config's path."""
    path = lab.workdir / f"{router}.yaml"
    path.write_text(yaml.safe_dump(config))
    sock = control_socket or Path(config["node"]["control_socket"])
    extra = ["--control-socket", str(control_socket)] if control_socket else []
    proc = lab.popen(router, [sys.executable, "-m", "vipd", "-c", str(path), *extra],
                     log=f"{router}.vipd.log", env={**os.environ, **(env or {})})
    wait_for(lambda: sock.exists() or proc.poll() is not None, 10, what=f"{router} vipd up")
    if proc.poll() is not None:
        raise LabError(f"vipd on {router} exited {proc.returncode}: "
                       + (lab.workdir / f"{router}.vipd.log").read_text()[-2000:])
    return Speaker(router, proc, "vipd", path, sock)


def start_pair(lab: Lab, interval_ms: int, **config: Any) -> tuple[Speaker, Speaker]:
    """vipd on r1 (priority 200) and r2 (100), with `config` for vipd_config; returns once
    r1 holds both VLANs' VIPs and r2 is backup."""
    r1 = start_vipd(lab, "r1", vipd_config(lab, "r1", 200, interval_ms, **config))
    r2 = start_vipd(lab, "r2", vipd_config(lab, "r2", 100, interval_ms, **config))
    wait_for(lambda: holder(lab, "lanA") == ["r1"] and holder(lab, "lanB") == ["r1"], 10,
             what="r1 elected")
    wait_for(lambda: set(states(lab, r2)) == {"BACKUP"}, 5, what="r2 backup")
    return r1, r2


def rewrite_config(speaker: Speaker, config: dict[str, Any]) -> None:
    speaker.config.write_text(yaml.safe_dump(config))


def vipctl(lab: Lab, speaker: Speaker, *args: str) -> subprocess.CompletedProcess[str]:
    assert speaker.socket is not None
    return subprocess.run([sys.executable, "-m", "vipd.vipctl", "-s", str(speaker.socket),
                           *args], capture_output=True, text=True, timeout=10)


def status(lab: Lab, speaker: Speaker) -> dict[str, Any]:
    p = vipctl(lab, speaker, "status", "--json")
    # 0 healthy, 1 degraded, 2 critical (with the status) or unreachable (without)
    if p.returncode not in (0, 1, 2) or not p.stdout.strip():
        raise LabError(f"vipctl status: exit {p.returncode}: {p.stderr}")
    result: dict[str, Any] = json.loads(p.stdout)
    return result


def states(lab: Lab, speaker: Speaker) -> list[str]:
    return [i["state"] for i in status(lab, speaker)["instances"]]


def keepalived_available() -> bool:
    return shutil.which("keepalived") is not None


def keepalived_config(lab: Lab, router: str, priority: int, interval_ms: int,
                      preempt: bool = True, garp_count: int = 3, family: str = "ipv4",
                      version: int = 3, use_vmac: bool = False,
                      notify_master: str | None = None, sync_group: bool = False,
                      unicast: bool = False) -> str:
    """One instance per VLAN; with `sync_group` (or `notify_master`) they form one sync
    group (all VLANs move together, as vipd's single-active), which runs `notify_master`
    on becoming master. `unicast`: adverts go to the other routers' VLAN addresses
    (unicast_src_ip / unicast_peer) instead of the multicast group."""
    lines = ["global_defs {", f"  router_id {router}", f"  vrrp_version {version}",
             "  vrrp_garp_master_delay 0", f"  vrrp_garp_master_repeat {garp_count}",
             "  vrrp_garp_interval 0.1", "  enable_script_security", "  script_user root",
             "}"]
    if notify_master or sync_group:
        lines += ["vrrp_sync_group G {", "  group {", *[f"    {v}" for v in lab.topo.vlans],
                  "  }", *([f"  notify_master \"{notify_master}\""] if notify_master else []),
                  "}"]
    for i, vlan in enumerate(lab.topo.vlans):
        vip = lab.topo.vip(vlan, family)
        lines += [f"vrrp_instance {vlan} {{", "  state BACKUP", f"  interface {vlan}",
                  f"  virtual_router_id {VRID_BASE + 1 + i}", f"  priority {priority}",
                  f"  advert_int {interval_ms / 1000:g}",
                  *([] if preempt else ["  nopreempt"]),
                  *(["  use_vmac"] if use_vmac else []),
                  *(unicast_lines(lab, router, vlan, family) if unicast else []),
                  "  virtual_ipaddress {", f"    {vip} dev {vlan}", "  }", "}"]
    return "\n".join(lines) + "\n"


def unicast_peers(lab: Lab, router: str, vlan: str, family: str = "ipv4") -> list[str]:
    """The other routers' addresses on a VLAN: a router's unicast peers there."""
    return [str(lab.topo.address(vlan, family, int(r["id"])).ip)  # type: ignore[union-attr]
            for name, r in lab.topo.routers.items() if name != router]


def unicast_lines(lab: Lab, router: str, vlan: str, family: str = "ipv4") -> list[str]:
    me = lab.topo.address(vlan, family, int(lab.topo.routers[router]["id"]))
    assert me is not None
    return [f"  unicast_src_ip {me.ip}", "  unicast_peer {",
            *[f"    {a}" for a in unicast_peers(lab, router, vlan, family)], "  }"]


def start_keepalived(lab: Lab, router: str, priority: int, interval_ms: int,
                     **config: Any) -> Speaker:
    tag = f"{router}-{time.monotonic_ns()}"
    conf = lab.workdir / f"{tag}.keepalived.conf"
    conf.write_text(keepalived_config(lab, router, priority, interval_ms, **config))
    argv = ["keepalived", "-n", "-l", "-D", "-f", str(conf),
            "-p", str(lab.workdir / f"{tag}.pid"), "-r", str(lab.workdir / f"{tag}.vrrp.pid"),
            "-c", str(lab.workdir / f"{tag}.checker.pid"), "--vrrp"]
    proc = lab.popen(router, argv, log=f"{router}.keepalived.log")
    time.sleep(0.05)
    if proc.poll() is not None:
        raise LabError(f"keepalived on {router} exited {proc.returncode}")
    return Speaker(router, proc, "keepalived", conf)


def has_vip(lab: Lab, router: str, vlan: str, fam: str = "ipv4") -> bool:
    """The VLAN's VIP is on the router (on the VLAN interface or its virtual MAC macvlan)."""
    vip = lab.topo.vip(vlan, fam)
    return str(vip.ip) in lab.addresses(router)


def holder(lab: Lab, vlan: str, fam: str = "ipv4") -> list[str]:
    return [r for r in lab.topo.routers if has_vip(lab, r, vlan, fam)]


class Probe:
    """The 1 ms probe running in a host namespace; `finish()` stops it and returns figures."""

    def __init__(self, lab: Lab, host: str, target: str, interval_ms: float = 1.0,
                 duration_s: float = 60.0) -> None:
        here = Path(__file__).resolve().parent
        self.lab = lab
        self.proc = lab.popen(host, [sys.executable, str(here / "probe.py"), target,
                                     "--interval-ms", str(interval_ms),
                                     "--duration-s", str(duration_s)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def finish(self) -> dict[str, Any]:
        import os
        import signal

        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=10)
        self.lab.procs.pop(self.proc.pid, None)
        result: dict[str, Any] = json.loads(out)
        return result


class AdvertWatch:
    """Sees VRRP adverts on a host's segment (AF_PACKET socket made in the host's
    namespace), so a benchmark can make its fault at a known phase of the advert cycle."""

    def __init__(self, lab: Lab, host: str, ifname: str = "eth0") -> None:
        import socket

        from lab import socket_in

        self.sock = socket_in(lab.ns(host), socket.AF_PACKET, socket.SOCK_DGRAM,
                              socket.htons(0x0800))
        self.sock.bind((ifname, 0x0800))
        self.sock.settimeout(0.05)

    def wait_advert(self, src: str, timeout: float) -> float:
        """Block until an advert from `src` arrives; return its arrival (monotonic)."""
        import ipaddress

        want = ipaddress.IPv4Address(src).packed
        deadline = time.monotonic() + timeout
        # drop what queued up before: the phase must be taken from a fresh advert
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while self.sock.recv(2048):
                pass
        self.sock.settimeout(0.05)
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(2048)
            except TimeoutError:
                continue
            if len(data) >= 20 and data[9] == 112 and data[12:16] == want:
                return time.monotonic()
        raise TimeoutError(f"no advert from {src} in {timeout} s")

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------- connection-state sync

FIREWALL = """
table inet vipdfw {
  chain filter_forward {
    type filter hook forward priority 0; policy drop;
    ct state invalid counter drop
    ct state established,related accept
    iifname "lanA" ct state new accept
  }
}
"""


def stateful_firewall(lab: Lab, router: str) -> None:
    """A strict stateful firewall on a router: only connections opened from lanA pass, a
    packet of a connection the kernel does not know is invalid and dropped (TCP loose
    pickup off), as on the firewalls conntrackd users run."""
    run(lab.cmd(router, ["nft", "-f", "-"]), input=FIREWALL)
    lab.sysctl(lab.ns(router), "net.netfilter.nf_conntrack_tcp_loose=0",
               "net.netfilter.nf_conntrack_udp_timeout=600",
               "net.netfilter.nf_conntrack_udp_timeout_stream=600")


def sync_key(lab: Lab) -> Path:
    key = lab.workdir / "sync.key"
    if not key.exists():
        key.write_bytes(os.urandom(32).hex().encode())
        key.chmod(0o600)
    return key


def sync_section(lab: Lab, router: str, alive_ms: int = 20) -> dict[str, Any]:
    """The sync: section for a router of the pair topology (203.0.113.0/24, sync0)."""
    assert lab.topo.sync is not None
    me = int(lab.topo.routers[router]["id"])
    addr = lab.topo.address("sync", "ipv4", me)
    peers = [str(lab.topo.address("sync", "ipv4", int(r["id"])).ip)  # type: ignore[union-attr]
             for name, r in lab.topo.routers.items() if name != router]
    assert addr is not None
    return {"interface": "sync0", "local": str(addr.ip), "peers": peers,
            "key_file": str(sync_key(lab)), "alive_interval": f"{alive_ms}ms"}


def sync_status(lab: Lab, speaker: Speaker) -> dict[str, Any]:
    out = vipctl(lab, speaker, "sync", "--json")
    if out.returncode not in (0, 1):
        raise LabError(f"vipctl sync on {speaker.router}: {out.stderr}")
    return dict(json.loads(out.stdout))


TRIO = Path(__file__).resolve().parent / "topologies" / "trio.yaml"


def cluster_config(lab: Lab, router: str, interval_ms: int = 100,
                   buckets: int = 16) -> dict[str, Any]:
    """An all-active configuration for a router of the trio topology: every VLAN's VIP
    (network + 1) shared, buckets elected on lanA, sync over sync0."""
    vlans = [{"name": v, "interface": v,
              "vips": [str(lab.topo.vip(v, fam)) for fam in ("ipv4", "ipv6")
                       if lab.topo.vip(v, fam) is not None]}
             for v in lab.topo.vlans]
    return {"node": {"name": router, "control_socket": str(lab.workdir / f"{router}.sock")},
            "mode": "all-active",
            "cluster": {"members": sorted(lab.topo.routers), "buckets": buckets,
                        "advert_interval": f"{interval_ms}ms", "seed": "lab"},
            "vlans": vlans, "sync": sync_section(lab, router)}


def cluster_status(lab: Lab, speaker: Speaker) -> dict[str, Any]:
    return dict(status(lab, speaker)["cluster"])


TCPFLOWS = Path(__file__).resolve().parent / "tcpflows.py"


def flow_server(lab: Lab, host: str = "server") -> None:
    """tcpflows.py's echo server (TCP and UDP, IPv4 and IPv6) on a host."""
    lab.popen(host, [sys.executable, str(TCPFLOWS), "serve"], log="tcp-server.log")
    time.sleep(0.3)


def flow_client(lab: Lab, host: str, server: str, flows: int, seconds: float = 120,
                udp: bool = False) -> subprocess.Popen[bytes]:
    """tcpflows.py's client: `flows` long-lived connections to `server`; `flow_result`
    stops it and returns what it saw."""
    return lab.popen(host, [sys.executable, str(TCPFLOWS), "run", server, "--flows",
                            str(flows), "--seconds", str(seconds),
                            *(["--udp"] if udp else [])], stdout=subprocess.PIPE)


def flow_result(lab: Lab, proc: subprocess.Popen[bytes], timeout: float = 30) -> dict[str, Any]:
    os.kill(proc.pid, signal.SIGTERM)
    out = json.loads(proc.communicate(timeout=timeout)[0] or b"{}")
    lab.procs.pop(proc.pid, None)
    return dict(out)


def flow_bucket_of(lab: Lab, host: str, proto: int, port: int, server: str, server_port: int,
                   buckets: int, seed: bytes) -> int:
    """The all-active bucket of a host's flow, hashed as the members hash it."""
    from ipaddress import ip_address

    from vipd.core.cluster import flow_bucket

    spec = lab.topo.hosts[host]
    caddr = lab.topo.address(spec["vlan"], "ipv4", int(spec["id"]))
    assert caddr is not None
    return flow_bucket(proto, caddr.ip.packed, port, ip_address(server).packed, server_port,
                       buckets, seed)
