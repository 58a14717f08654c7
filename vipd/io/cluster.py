"""All-active data plane: the kernel side of bucket ownership (vipd.core.cluster says what
it should be).

What it sets up, per member:
- the VLANs' multicast MACs accepted by their interfaces (SIOCADDMULTI, as `ip maddr add`);
- `table arp vipd_cluster_arp`: every ARP packet this node sends with a VIP as sender
  carries the VLAN's multicast MAC as sender hardware address, so hosts send frames for
  the VIP to that MAC and the switch floods them to every member. The kernel answers the
  ARP requests itself; nftables rewrites the answer. `table ip6 vipd_cluster_nd` does the
  same for IPv6 neighbour advertisements of a VIP (and solicitations sent from one), with
  the ICMPv6 checksum kept right through the message's reserved bits (nd_compensation).
  These tables outlive vipd on purpose:
  if vipd dies, hosts keep the multicast MAC and this node forwards nothing (below), so the
  survivors' takeover of its buckets is not undercut by a node answering alone;
- `table inet vipd_cluster` (nftables `flags owner`: the kernel removes it when vipd's
  nft session ends, so a dead vipd owns nothing): frames to a cluster MAC are accepted as
  addressed to this host (`meta pkttype set host`, or the kernel would not route them)
  only when their connection's ct mark names a bucket in the set `owned`; the rest is
  dropped. Per-bucket counters (named counters through a map) feed `vipctl status`.
  Ownership changes are one `flush set` + `add element` line: one nftables transaction;
- the first packet of each connection (conntrack NEW, not multicast) goes to NFQUEUE
  (iptables: this kernel's nft has no `queue` statement; no `--queue-bypass`: without
  vipd a member takes no new connection); vipd hashes it (vipd.core.cluster.packet_bucket)
  and gives it back with the bucket in its mark, which the nft chain copies into the ct
  mark. A reply reaching a member that has no entry for the connection hashes the same.

The nft session is one long-lived `nft -i` process fed lines: no process per change.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vipd.core.cluster import MARK_CLASSIFIED, MARK_MASK, mark_of, packet_bucket
from vipd.io.hold import delete_all, nfqueue_unavailable

log = logging.getLogger("vipd.cluster")

TABLE = "vipd_cluster"
ARP_TABLE = "vipd_cluster_arp"
ND_TABLE = "vipd_cluster_nd"
COMMENT = "vipd all-active classifier"
SIOCADDMULTI, SIOCDELMULTI = 0x8931, 0x8932
PRIORITY = -140  # after conntrack (-200) and iptables' mangle (-150)


@dataclass(frozen=True)
class ClusterVlan:
    interface: str
    mac: str
    vips: tuple[str, ...]  # addresses without prefix length (IPv4 and IPv6)
    own_mac: str = ""  # the interface's own MAC (what the kernel's ND messages carry)

    @property
    def vips4(self) -> list[str]:
        return [v for v in self.vips if ":" not in v]

    @property
    def vips6(self) -> list[str]:
        return [v for v in self.vips if ":" in v]


def _ones_sum(*words: int) -> int:
    total = 0
    for w in words:
        total += w
        total = (total & 0xFFFF) + (total >> 16)
    return total


def nd_compensation(old_mac: str, new_mac: str) -> int:
    """The 16-bit value that, written into the reserved bits of a neighbour solicitation or
    advertisement (bytes 6-7 of the ICMPv6 message, zero as sent, ignored by receivers:
    RFC 4861 4.3, 4.4), keeps its checksum right when the link-layer address option's MAC
    changes from old_mac to new_mac. nftables rewrites the MAC in the kernel's ND messages
    but does not fix ICMPv6 checksums of raw payload writes; this keeps the sum equal."""
    o = bytes.fromhex(old_mac.replace(":", ""))
    n = bytes.fromhex(new_mac.replace(":", ""))
    ow = [int.from_bytes(o[i:i + 2], "big") for i in (0, 2, 4)]
    nw = [int.from_bytes(n[i:i + 2], "big") for i in (0, 2, 4)]
    return _ones_sum(*ow, *(0xFFFF - w for w in nw)) & 0xFFFF


class ClusterPlane(Protocol):
    async def start(self, vlans: list[ClusterVlan], buckets: int) -> None: ...
    async def own(self, buckets: set[int]) -> None: ...
    async def counters(self) -> dict[str, int]: ...
    async def stop(self) -> None: ...


class NftError(Exception):
    pass


class NftSession:
    """One `nft -i` process. `run(lines)` sends the lines (each one transaction) followed
    by a listing of a marker set, and reads the merged output up to the end of that
    listing: whatever came before it is an error message of those lines."""

    MARKER = f"list set inet {TABLE} marker"

    def __init__(self, nft: str) -> None:
        self.nft = nft
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            self.nft, "-i", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)

    async def run(self, lines: Iterable[str], timeout: float = 5.0) -> str:
        """Run the lines; the output of the last listing among them. Raises NftError."""
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise NftError("nft session not open")
        async with self._lock:
            text = "".join(f"{line}\n" for line in lines) + self.MARKER + "\n"
            proc.stdin.write(text.encode())
            await proc.stdin.drain()
            # one top-level block per listing asked for, and the marker's last
            expected = sum(1 for line in lines if line.startswith("list ")) + 1
            out: list[str] = []
            starts: list[int] = []
            while expected:
                try:
                    raw = await asyncio.wait_for(proc.stdout.readline(), timeout)
                except TimeoutError as exc:
                    raise NftError("nft session did not answer: " + "".join(out)[-500:]) \
                        from exc
                if not raw:
                    raise NftError("nft session ended: " + "".join(out)[-500:])
                line = raw.decode(errors="replace")
                if line.startswith("table "):
                    starts.append(len(out))
                elif line.rstrip("\n") == "}":
                    expected -= 1
                out.append(line)
            before = "".join(out[:starts[-1]]) if starts else "".join(out)
            if any(x.startswith("Error") for x in before.splitlines()):
                raise NftError(before.strip()[-1000:])
            return before

    async def close(self) -> None:
        proc = self._proc
        self._proc = None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(Exception):
                proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 2)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def _maddr(ifname: str, mac: str, add: bool) -> None:
    req = struct.pack("16sH6s8x", ifname.encode(), 0, bytes.fromhex(mac.replace(":", "")))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCADDMULTI if add else SIOCDELMULTI, req)


def _iptables(cmd: str, ifname: str, queue: int, family: int = 4) -> list[str]:
    tool, mcast = ("iptables", "224.0.0.0/4") if family == 4 else ("ip6tables", "ff00::/8")
    return [tool, "-w", "-t", "mangle", cmd, "PREROUTING", "-i", ifname,
            "-m", "pkttype", "--pkt-type", "multicast", "!", "-d", mcast,
            "-m", "conntrack", "--ctstate", "NEW",
            "-m", "connmark", "--mark", f"0/{MARK_CLASSIFIED:#x}",
            "-m", "comment", "--comment", COMMENT, "-j", "NFQUEUE", "--queue-num", str(queue)]


def ruleset_lines(vlans: list[ClusterVlan], buckets: int) -> list[str]:
    """The nft lines that build both tables (idempotent: stale ones are replaced)."""
    macs = ", ".join(sorted({v.mac for v in vlans}))
    ifaces = ", ".join(f'"{v.interface}"' for v in vlans)
    counters = ", ".join(f'{mark_of(b):#x} : "b{b}"' for b in range(buckets))
    lines = [f"add table arp {ARP_TABLE}", f"delete table arp {ARP_TABLE}",
             f"add table arp {ARP_TABLE}",
             f"add chain arp {ARP_TABLE} out {{ type filter hook output priority 0; }}"]
    for v in vlans:
        if v.vips4:
            lines.append(f'add rule arp {ARP_TABLE} out oifname "{v.interface}" arp saddr ip '
                         f'{{ {", ".join(v.vips4)} }} arp saddr ether set {v.mac}')
    # IPv6: the kernel's neighbour advertisements for a VIP (target address at bytes 8-23,
    # its link-layer option at 24: type 2, length 1, the MAC) and its solicitations sent
    # from a VIP (source link-layer option: type 1) carry the multicast MAC instead
    lines += [f"add table ip6 {ND_TABLE}", f"delete table ip6 {ND_TABLE}",
              f"add table ip6 {ND_TABLE}",
              f"add chain ip6 {ND_TABLE} out {{ type filter hook output priority 0; }}"]
    for v in vlans:
        if not v.vips6 or not v.own_mac:
            continue
        own = "0x" + v.own_mac.replace(":", "")
        new = "0x" + v.mac.replace(":", "")
        fix = f"{nd_compensation(v.own_mac, v.mac):#06x}"
        for vip in v.vips6:
            target = f"0x{int(ipaddress.IPv6Address(vip)):032x}"
            lines.append(
                f'add rule ip6 {ND_TABLE} out oifname "{v.interface}" icmpv6 type '
                f"nd-neighbor-advert @th,64,128 {target} @th,192,16 0x0201 @th,208,48 {own} "
                f"@th,48,16 0x0 @th,208,48 set {new} @th,48,16 set {fix}")
            lines.append(
                f'add rule ip6 {ND_TABLE} out oifname "{v.interface}" ip6 saddr {vip} '
                f"icmpv6 type nd-neighbor-solicit @th,192,16 0x0101 @th,208,48 {own} "
                f"@th,48,16 0x0 @th,208,48 set {new} @th,48,16 set {fix}")
    lines += [
        f"add table inet {TABLE} {{ flags owner; }}",
        f"add set inet {TABLE} owned {{ type mark; }}",
        *(f'add counter inet {TABLE} b{b}' for b in range(buckets)),
        f"add counter inet {TABLE} accepted",
        f"add chain inet {TABLE} pre {{ type filter hook prerouting priority {PRIORITY}; }}",
        f"add rule inet {TABLE} pre iifname != {{ {ifaces} }} return",
        f"add rule inet {TABLE} pre ether daddr != {{ {macs} }} return",
        # neighbour discovery to the VIP (unreachability probes sent to the multicast
        # MAC): every member answers, as for ARP
        f"add rule inet {TABLE} pre icmpv6 type {{ nd-neighbor-solicit, "
        "nd-neighbor-advert } meta pkttype set host accept",
        # classified by vipd (NFQUEUE verdict): keep the bucket with the connection
        f"add rule inet {TABLE} pre ct mark and {MARK_CLASSIFIED:#x} == 0 "
        f"ct mark set meta mark and {MARK_MASK:#x}",
        f"add rule inet {TABLE} pre counter name ct mark and {MARK_MASK:#x} "
        f"map {{ {counters} }}",
        f"add rule inet {TABLE} pre ct mark and {MARK_MASK:#x} @owned "
        "counter name accepted meta pkttype set host accept",
        f"add rule inet {TABLE} pre counter drop",
    ]
    return lines


class LinuxClusterPlane:
    def __init__(self, queue: int, buckets: int, seed: bytes) -> None:
        self.queue_num, self.buckets, self.seed = queue, buckets, seed
        self.nft = shutil.which("nft")
        self._session: NftSession | None = None
        self._vlans: list[ClusterVlan] = []
        self._queue: Any = None
        self._fd = -1
        self.classified = 0
        self.unavailable = "nft is not installed" if self.nft is None \
            else nfqueue_unavailable()

    async def start(self, vlans: list[ClusterVlan], buckets: int) -> None:
        if self.unavailable is not None:
            raise OSError(f"all-active mode cannot run: {self.unavailable}")
        assert self.nft is not None
        self._vlans = vlans
        for v in vlans:
            _maddr(v.interface, v.mac, True)
        self._session = NftSession(self.nft)
        await self._session.open()
        try:
            await self._session.run([f"add table inet {TABLE} {{ flags owner; }}",
                                     f"add set inet {TABLE} marker {{ type mark; }}"])
            await self._session.run(ruleset_lines(vlans, buckets))
        except NftError as exc:
            raise OSError(f"all-active rules refused by nft: {exc}") from exc
        self._start_queue()
        for v in vlans:
            for fam in (4, 6):
                delete_all(_iptables("-D", v.interface, self.queue_num, fam))  # a dead run's
                _run_checked(_iptables("-A", v.interface, self.queue_num, fam))

    def _start_queue(self) -> None:
        from netfilterqueue import NetfilterQueue

        q = NetfilterQueue()
        q.bind(self.queue_num, self._classify, max_len=65536)
        self._queue = q
        self._fd = q.get_fd()
        asyncio.get_running_loop().add_reader(self._fd, q.run, False)

    def _classify(self, pkt: Any) -> None:
        """The first packet of a connection: its bucket goes in its mark (the nft chain
        copies it to the ct mark and decides by the owned set)."""
        b = packet_bucket(pkt.get_payload(), self.buckets, self.seed)
        if b is not None:
            pkt.set_mark(mark_of(b))
            self.classified += 1
        pkt.accept()

    async def own(self, buckets: set[int]) -> None:
        assert self._session is not None
        elements = ", ".join(f"{mark_of(b):#x}" for b in sorted(buckets))
        line = f"flush set inet {TABLE} owned"
        if elements:
            line += f"; add element inet {TABLE} owned {{ {elements} }}"
        try:
            await self._session.run([line])
        except NftError as exc:
            raise OSError(str(exc)) from exc

    async def counters(self) -> dict[str, int]:
        """Packets per bucket (key: the bucket number) for frames to the cluster MACs, and
        "accepted": those this member owned and took."""
        if self._session is None:
            return {}
        out = await self._session.run([f"list counters table inet {TABLE}"])
        got: dict[str, int] = {}
        name = None
        for line in out.splitlines():
            w = line.split()
            if len(w) >= 2 and w[0] == "counter":
                name = w[1]
            elif len(w) >= 2 and w[0] == "packets" and name is not None:
                got[name[1:] if name[0] == "b" and name[1:].isdigit() else name] = int(w[1])
                name = None
        return got

    async def stop(self) -> None:
        for v in self._vlans:
            for fam in (4, 6):
                delete_all(_iptables("-D", v.interface, self.queue_num, fam))
        if self._queue is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
            with contextlib.suppress(Exception):
                self._queue.unbind()
            self._queue = None
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.run([f"delete table arp {ARP_TABLE}",
                                         f"delete table ip6 {ND_TABLE}"])
            await self._session.close()  # the owner table goes with the session
            self._session = None
        for v in self._vlans:
            with contextlib.suppress(OSError):
                _maddr(v.interface, v.mac, False)


def _run_checked(argv: list[str]) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=5)
    if p.returncode != 0:
        raise OSError(f"{' '.join(argv[:6])}...: {p.stderr.strip()}")


@dataclass
class FakeClusterPlane:
    """In-memory stand-in: what was asked, in order."""

    owned: set[int] = field(default_factory=set)
    history: list[set[int]] = field(default_factory=list)
    started: list[ClusterVlan] = field(default_factory=list)
    fail: bool = False
    packets: dict[str, int] = field(default_factory=dict)

    async def start(self, vlans: list[ClusterVlan], buckets: int) -> None:
        self.started = list(vlans)

    async def own(self, buckets: set[int]) -> None:
        if self.fail:
            raise OSError("nft refused")
        self.owned = set(buckets)
        self.history.append(set(buckets))

    async def counters(self) -> dict[str, int]:
        return dict(self.packets)

    async def stop(self) -> None:
        self.owned = set()
