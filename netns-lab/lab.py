"""netns-lab: routers, switches and hosts in Linux network namespaces, from a YAML topology.

    python netns-lab/lab.py up [TOPOLOGY] [--prefix P]   build a lab, print its prefix
    python netns-lab/lab.py down PREFIX                   remove it (processes, namespaces)
    python netns-lab/lab.py exec PREFIX NODE CMD...       run a command inside a node
    python netns-lab/lab.py cut|restore PREFIX NODE       set a node's switch ports down/up
    python netns-lab/lab.py list                          labs this machine knows about

Shape: one switch namespace with a bridge per VLAN (this kernel has no 802.1Q
subinterfaces) and one for the sync link; every router has a port on every VLAN bridge
(interface named like the VLAN) and `sync0`; hosts have `eth0` on one VLAN. Router
addresses are network + id, the VIP is conventionally network + 1. Rules kept here: only
documentation prefixes, nothing added to the root namespace, a per-run prefix on every
namespace, processes ended by PID only, and everything removed afterwards, after a failure
too (the registry in /run/vipd-lab lets `down` clean a lab whose creator died).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
DEFAULT_TOPOLOGY = HERE / "topologies" / "pair.yaml"
REGISTRY = Path("/run/vipd-lab")
ALLOWED = [ipaddress.ip_network(n) for n in
           ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")]


class LabError(RuntimeError):
    pass


def _check_doc_range(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
    if not any(net.version == a.version and net.subnet_of(a) for a in ALLOWED):  # type: ignore[arg-type]
        raise LabError(f"{net} is outside the documentation ranges the lab may use")


@dataclass
class Topology:
    vlans: dict[str, dict[str, Any]]
    routers: dict[str, dict[str, Any]]
    hosts: dict[str, dict[str, Any]]
    sync: dict[str, Any] | None

    @classmethod
    def load(cls, path: str | Path = DEFAULT_TOPOLOGY) -> Topology:
        raw = yaml.safe_load(Path(path).read_text())
        topo = cls(raw.get("vlans", {}), raw.get("routers", {}), raw.get("hosts", {}),
                   raw.get("sync"))
        for spec in list(topo.vlans.values()) + ([topo.sync] if topo.sync else []):
            for fam in ("ipv4", "ipv6"):
                if fam in spec:
                    _check_doc_range(ipaddress.ip_network(spec[fam]))
        return topo

    def address(self, segment: str, fam: str, host_id: int) -> ipaddress.IPv4Interface | \
            ipaddress.IPv6Interface | None:
        spec = self.sync if segment == "sync" else self.vlans[segment]
        if not spec or fam not in spec:
            return None
        net = ipaddress.ip_network(spec[fam])
        return ipaddress.ip_interface(f"{net.network_address + host_id}/{net.prefixlen}")

    def vip(self, vlan: str, fam: str = "ipv4", offset: int = 1) -> Any:
        return self.address(vlan, fam, offset)


def run(argv: Sequence[str], check: bool = True, input: str | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(argv), capture_output=True, text=True, input=input,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {p.returncode}: {p.stderr.strip()}")
    return p


@dataclass
class Lab:
    topo: Topology
    prefix: str = field(default_factory=lambda: f"vl{secrets.token_hex(3)}")
    workdir: Path = field(init=False)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict, init=False)
    namespaces: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if len(self.prefix) > 10 or not self.prefix.isalnum():
            raise LabError("prefix must be 1-10 letters or digits")
        self.workdir = Path("/tmp") / f"vipd-lab-{self.prefix}"

    # ------------------------------------------------------------ names

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    @property
    def switch(self) -> str:
        return self.ns("sw")

    def port(self, node: str, seg: str) -> str:
        return f"{node}-{seg}"[:15]

    def ports_of(self, node: str) -> list[str]:
        if node in self.topo.routers:
            segs = list(self.topo.vlans) + (["sync"] if self.topo.sync else [])
        else:
            segs = [self.topo.hosts[node]["vlan"]]
        return [self.port(node, s) for s in segs]

    # ------------------------------------------------------------ build and tear down

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _register(self) -> None:
        if not self.namespaces:
            return
        REGISTRY.mkdir(parents=True, exist_ok=True)
        (REGISTRY / f"{self.prefix}.json").write_text(json.dumps({
            "namespaces": self.namespaces, "pids": sorted(self.procs),
            "workdir": str(self.workdir), "owner_pid": os.getpid()}))

    def _add_ns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        self._register()
        run(["ip", "-n", name, "link", "set", "lo", "up"])

    def sysctl(self, node_ns: str, *settings: str) -> None:
        run(["ip", "netns", "exec", node_ns, "sysctl", "-q", "-w", *settings])

    def up(self) -> Lab:
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        sw = self.switch
        self._add_ns(sw)
        self.sysctl(sw, "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        segs = list(self.topo.vlans) + (["sync"] if self.topo.sync else [])
        batch = []
        for seg in segs:
            br = f"br-{seg}"[:15]
            batch += [f"link add {br} type bridge stp_state 0 forward_delay 0 "
                      f"mcast_snooping 0", f"link set {br} up"]
        run(["ip", "-n", sw, "-batch", "-"], input="\n".join(batch) + "\n")
        for node in list(self.topo.routers) + list(self.topo.hosts):
            ns = self.ns(node)
            self._add_ns(ns)
            self.sysctl(ns, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
                        "net.ipv6.conf.default.dad_transmits=0")
        for rname, r in self.topo.routers.items():
            ns = self.ns(rname)
            self.sysctl(ns, "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
            for seg in segs:
                ifname = "sync0" if seg == "sync" else seg
                self._veth(ns, ifname, seg, self.port(rname, seg))
                for fam in ("ipv4", "ipv6"):
                    a = self.topo.address(seg, fam, int(r["id"]))
                    if a is not None:
                        run(["ip", "-n", ns, "addr", "add", str(a), "dev", ifname]
                            + (["nodad"] if fam == "ipv6" else []))
                run(["ip", "-n", ns, "link", "set", ifname, "up"])
        for hname, h in self.topo.hosts.items():
            ns = self.ns(hname)
            seg = h["vlan"]
            self._veth(ns, "eth0", seg, self.port(hname, seg))
            for fam in ("ipv4", "ipv6"):
                a = self.topo.address(seg, fam, int(h["id"]))
                if a is None:
                    continue
                run(["ip", "-n", ns, "addr", "add", str(a), "dev", "eth0"]
                    + (["nodad"] if fam == "ipv6" else []))
            run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            if "gateway" in h:
                for fam in ("ipv4", "ipv6"):
                    gw = self.topo.address(seg, fam, int(h["gateway"]))
                    if gw is not None:
                        run(["ip", "-n", ns, "-6" if fam == "ipv6" else "-4", "route", "add",
                             "default", "via", str(gw.ip), "dev", "eth0"])
        self._register()

    def recreate(self, router: str, seg: str) -> None:
        """Delete a router's interface on a segment and create it again (a new ifindex),
        with its address, as a driver reload or a hot-plugged NIC would."""
        ns, ifname = self.ns(router), seg
        run(["ip", "-n", ns, "link", "del", ifname])
        self._veth(ns, ifname, seg, self.port(router, seg))
        a = self.topo.address(seg, "ipv4", int(self.topo.routers[router]["id"]))
        if a is not None:
            run(["ip", "-n", ns, "addr", "add", str(a), "dev", ifname])
        run(["ip", "-n", ns, "link", "set", ifname, "up"])

    def _veth(self, ns: str, ifname: str, seg: str, port: str) -> None:
        run(["ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", port,
             "netns", self.switch])
        br = f"br-{seg}"[:15]
        run(["ip", "-n", self.switch, "link", "set", port, "master", br, "up"])

    def down(self) -> None:
        for pid, proc in list(self.procs.items()):
            self.stop_process(proc, timeout=3)
            self.procs.pop(pid, None)
        for ns in reversed(self.namespaces):
            _delete_ns(ns)
        entry = REGISTRY / f"{self.prefix}.json"
        with contextlib.suppress(FileNotFoundError, ValueError):
            if json.loads(entry.read_text()).get("owner_pid") == os.getpid():
                entry.unlink()
        self.namespaces.clear()
        if self.workdir.exists():
            subprocess.run(["rm", "-rf", str(self.workdir)], check=False)

    # ------------------------------------------------------------ processes

    def cmd(self, node: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(node), *argv]

    def run(self, node: str, argv: Sequence[str], check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return run(self.cmd(node, argv), check=check, timeout=timeout)

    def popen(self, node: str, argv: Sequence[str], log: str | None = None,
              **kw: Any) -> subprocess.Popen[bytes]:
        out: Any = subprocess.DEVNULL
        if log is not None:
            out = open(self.workdir / log, "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(self.cmd(node, argv), stdout=kw.pop("stdout", out),
                                stderr=kw.pop("stderr", subprocess.STDOUT if log else out),
                                **kw)
        self.procs[proc.pid] = proc
        self._register()
        return proc

    def stop_process(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
                     timeout: float = 5) -> int | None:
        """End a process we started, by its PID (SIGCONT first in case it is stopped)."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.procs.pop(proc.pid, None)
        return proc.returncode

    # ------------------------------------------------------------ faults

    def _batch(self, node: str, state: str, include_sync: bool,
               segments: Sequence[str] | None) -> str:
        """`ip -batch` lines setting a node's switch ports (or those of `segments`)."""
        if segments is not None:
            ports = [self.port(node, seg) for seg in segments]
        else:
            ports = [p for p in self.ports_of(node) if include_sync or not p.endswith("-sync")]
        return "".join(f"link set {p} {state}\n" for p in ports)

    def _ports(self, node: str, state: str, include_sync: bool,
               segments: Sequence[str] | None = None) -> None:
        run(["ip", "-n", self.switch, "-batch", "-"],
            input=self._batch(node, state, include_sync, segments))

    def prepare_cut(self, node: str, include_sync: bool = True,
                    segments: Sequence[str] | None = None) -> Callable[[], None]:
        """A cut ready to fire: `ip -batch` already running, so firing costs a pipe write
        instead of a process start (benchmarks time the fault to a fraction of a ms)."""
        lines = self._batch(node, "down", include_sync, segments)
        proc = subprocess.Popen(["ip", "-n", self.switch, "-batch", "-"],
                                stdin=subprocess.PIPE, text=True)

        def fire() -> None:
            assert proc.stdin is not None
            proc.stdin.write(lines)
            proc.stdin.close()
            if proc.wait(10) != 0:
                raise LabError(f"cutting {node} failed")

        return fire

    def cut(self, node: str, include_sync: bool = True,
            segments: Sequence[str] | None = None) -> None:
        """Cut a node off: all its switch-side ports (or those of `segments`) down in one
        batch."""
        self._ports(node, "down", include_sync, segments)

    def restore(self, node: str, include_sync: bool = True,
                segments: Sequence[str] | None = None) -> None:
        self._ports(node, "up", include_sync, segments)

    # ------------------------------------------------------------ observation

    def addresses(self, node: str, ifname: str | None = None) -> set[str]:
        """Addresses on one interface of a node, or on all of them."""
        out = self.run(node, ["ip", "-j", "addr", "show"]
                       + (["dev", ifname] if ifname else [])).stdout
        return {a["local"] for link in json.loads(out) for a in link.get("addr_info", [])}

    def mac(self, node: str, ifname: str) -> str:
        out = self.run(node, ["ip", "-j", "link", "show", "dev", ifname]).stdout
        return str(json.loads(out)[0]["address"])

    def fdb_port(self, mac: str) -> str | None:
        """The switch port a MAC was learned on."""
        out = self.run("sw", ["bridge", "-j", "fdb", "show"]).stdout
        for e in json.loads(out or "[]"):
            if e.get("mac") == mac and "ifname" in e and "master" in e:
                return str(e["ifname"])
        return None

    def neighbour(self, node: str, address: str) -> str | None:
        out = self.run(node, ["ip", "-j", "neigh", "show", address]).stdout
        for n in json.loads(out or "[]"):
            if n.get("lladdr") and "FAILED" not in n.get("state", []):
                return str(n["lladdr"])
        return None


def socket_in(ns: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket created inside namespace `ns` (it stays there); this thread returns home.

    Python 3.11 has no os.setns, so libc's setns(2) is called through ctypes."""
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newnet = 0x40000000
    with open("/proc/self/ns/net") as home, open(f"/run/netns/{ns}") as target:
        if libc.setns(target.fileno(), clone_newnet) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        try:
            return socket.socket(family, kind, proto)
        finally:
            if libc.setns(home.fileno(), clone_newnet) != 0:
                raise OSError(ctypes.get_errno(), "setns back home")


def cleanup_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt so `with Lab(...)` still tears down
    (a background job's SIGINT is ignored, and Python dies on SIGTERM without cleanup)."""
    def handler(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, handler)


def _delete_ns(ns: str) -> None:
    # Kill what still runs inside (only processes in OUR namespace, by PID), then delete.
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    for pid in pids.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.02,
             what: str = "condition") -> Any:
    """Poll until predicate() is truthy; return its value or raise after the deadline."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the thing polled may not exist yet
            last_exc = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached in {timeout} s"
                               + (f" (last error: {last_exc})" if last_exc else ""))
        time.sleep(interval)


def cleanup_registered(prefix: str) -> None:
    """Remove a lab by prefix: from its registry entry, or else by namespace names."""
    path = REGISTRY / f"{prefix}.json"
    if not path.exists():
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        for line in listed.stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(f"{prefix}-"):
                _delete_ns(name)
        return
    data = json.loads(path.read_text())
    for pid in data.get("pids", []):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
    for ns in reversed(data.get("namespaces", [])):
        _delete_ns(ns)
    subprocess.run(["rm", "-rf", data.get("workdir", "/nonexistent")], check=False)
    path.unlink()


def run_dir(prefix: str, router: str) -> Path:
    """A lab router's own directory for vipd: its config copy, control socket, log, pid
    (so two routers' default paths never collide)."""
    return Path("/tmp") / f"vipd-lab-{prefix}" / router


def start_user_vipd(prefix: str, router: str, config: str) -> Path:
    """Run vipd with the user's configuration on a lab router, in the background. The
    control socket (unless the file names one) goes to the router's run directory; the
    PID is added to the lab's registry so `down` ends it. Returns the socket path."""
    path = REGISTRY / f"{prefix}.json"
    if not path.exists():
        raise LabError(f"no lab {prefix} (netns-lab/lab.py list)")
    rd = run_dir(prefix, router)
    rd.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(Path(config).read_text())
    if not isinstance(cfg, dict):
        raise LabError(f"{config}: not a vipd configuration")
    node = cfg.setdefault("node", {})
    node.setdefault("control_socket", str(rd / "vipd.sock"))
    copy = rd / "vipd.yaml"
    copy.write_text(yaml.safe_dump(cfg, sort_keys=False))
    sock = Path(node["control_socket"])
    log = open(rd / "vipd.log", "ab")  # noqa: SIM115 - handed to the daemon
    proc = subprocess.Popen(["ip", "netns", "exec", f"{prefix}-{router}", sys.executable,
                             "-m", "vipd", "-c", str(copy)], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    data = json.loads(path.read_text())
    data["pids"] = sorted({*data.get("pids", []), proc.pid})
    path.write_text(json.dumps(data))
    (rd / "vipd.pid").write_text(f"{proc.pid}\n")
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: sock.exists() or proc.poll() is not None, 15,
                 what=f"vipd on {router}")
    if proc.poll() is not None or not sock.exists():
        raise LabError(f"vipd on {router} did not start: "
                       + (rd / "vipd.log").read_text(errors="replace")[-1500:])
    return sock


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="netns-lab")
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up")
    u.add_argument("topology", nargs="?", default=str(DEFAULT_TOPOLOGY))
    u.add_argument("--prefix")
    d = sub.add_parser("down")
    d.add_argument("prefix")
    e = sub.add_parser("exec")
    e.add_argument("prefix")
    e.add_argument("node")
    e.add_argument("argv", nargs=argparse.REMAINDER)
    for name in ("cut", "restore"):
        c = sub.add_parser(name)
        c.add_argument("prefix")
        c.add_argument("node")
        c.add_argument("topology", nargs="?", default=str(DEFAULT_TOPOLOGY))
    sub.add_parser("list")
    v = sub.add_parser("vipd", help="run vipd on a router with your configuration")
    v.add_argument("prefix")
    v.add_argument("node")
    v.add_argument("config")
    c = sub.add_parser("vipctl", help="vipctl against the vipd of a router")
    c.add_argument("prefix")
    c.add_argument("node")
    c.add_argument("argv", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.cmd == "vipd":
        try:
            sock = start_user_vipd(args.prefix, args.node, args.config)
        except (LabError, OSError, yaml.YAMLError) as exc:
            print(f"lab: {exc}", file=sys.stderr)
            return 1
        print(f"vipd runs on {args.node}: socket {sock}, log {sock.parent / 'vipd.log'}")
        return 0
    if args.cmd == "vipctl":
        cfg = yaml.safe_load((run_dir(args.prefix, args.node) / "vipd.yaml").read_text())
        return subprocess.call([sys.executable, "-m", "vipd.vipctl", "-s",
                                cfg["node"]["control_socket"], *args.argv],
                               env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    if args.cmd == "up":
        lab = Lab(Topology.load(args.topology), **({"prefix": args.prefix} if args.prefix
                                                  else {}))
        lab.up()
        print(lab.prefix)
        return 0
    if args.cmd == "down":
        cleanup_registered(args.prefix)
        return 0
    if args.cmd == "exec":
        return subprocess.call(["ip", "netns", "exec", f"{args.prefix}-{args.node}",
                                *args.argv])
    if args.cmd in ("cut", "restore"):
        lab = Lab(Topology.load(args.topology), prefix=args.prefix)
        getattr(lab, args.cmd)(args.node)
        return 0
    for p in sorted(REGISTRY.glob("*.json")) if REGISTRY.exists() else []:
        print(p.stem, json.loads(p.read_text())["namespaces"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
