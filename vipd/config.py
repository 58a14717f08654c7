"""vipd configuration: YAML in, typed frozen objects out, every error reported at once.

Each error names its path and value, e.g.
    vlans[1].instances[0].vips[2]: '192.0.2.300' is not an IP address
`load(path)` raises ConfigError carrying the whole list; nothing starts on a bad config.
Durations are written with a unit ("10ms", "1s", "1.5s") and stored in milliseconds.

The loader never traces back and never floods: files over MAX_CONFIG_BYTES, non-UTF-8
bytes, duplicate keys, nesting too deep for the parser, infinite or absurd durations are
refused with an error; values are shown shortened, at most MAX_ERRORS errors are listed,
and the errors do not repeat the file's path (the caller prints it once). libyaml's C
loader is used when present (a 100-VLAN file parses in milliseconds, not a quarter second).
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
import reprlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vipd.config_schema import DEFAULT_PROTOCOLS, NOTIFY_EVENTS, PROTOCOLS, SECTIONS
from vipd.core.cluster import MAX_BUCKETS, MAX_MEMBERS, bucket_priority
from vipd.core.node import RouterSpec
from vipd.core.packet import ChecksumVariant, IPAddress
from vipd.core.router import RouterConfig
from vipd.core.timing import ms_to_s
from vipd.core.track import NODE, TrackerSpec, TrackRef
from vipd.defaults import DEFAULT_CONTROL_SOCKET

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
T = TypeVar("T")

MAX_CONFIG_BYTES = 1 << 20
MAX_ERRORS = 50
MAX_DURATION_MS = 86_400_000  # one day: anything longer is a typo, not a timer


class Mode(enum.Enum):
    SINGLE_ACTIVE = "single-active"
    PER_VLAN_ACTIVE = "per-vlan-active"
    ALL_ACTIVE = "all-active"


class ConfigError(Exception):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class NodeConfig:
    name: str
    control_socket: str = DEFAULT_CONTROL_SOCKET
    control_socket_mode: int = 0o600
    # SCHED_RR priority for the daemon (0: the normal scheduler), as keepalived's
    # vrrp_rt_priority and conntrackd's Scheduler: timers and sync keep up under load
    realtime_priority: int = 0
    metrics: str = ""  # "host:port" for Prometheus scrapes (docs/metrics.md); "" = off


@dataclass(frozen=True)
class InstanceConfig:
    vrid: int
    priority: int
    advert_interval_cs: int
    version: int
    vips: tuple[IPInterface, ...]
    preempt: bool = True
    preempt_delay_ms: int = 0
    accept_mode: bool = False
    v2_compat: bool = False
    checksum: ChecksumVariant = ChecksumVariant.PSEUDO_HEADER
    virtual_mac: bool = False
    garp_count: int = 3
    garp_interval_ms: int = 100
    garp_refresh_ms: int = 0
    reannounce_on_lower: bool = True
    address_check: str = "relaxed"
    # RFC 9568 5.2.9: IPv6 adverts list the virtual router's link-local address first.
    # keepalived 2.2 lists only the configured (global) VIPs and drops adverts whose count
    # differs from its own, so against it this must be false.
    advertise_link_local: bool = True
    track: tuple[TrackRef, ...] = ()
    # keepalived's unicast_peer: adverts go to these instead of the multicast group, and
    # adverts from any other source are dropped (counted as unknown_peer)
    unicast_peers: tuple[IPAddress, ...] = ()

    def families(self) -> list[int]:
        return sorted({v.version for v in self.vips})

    def vips_of(self, family: int) -> tuple[IPInterface, ...]:
        return tuple(v for v in self.vips if v.version == family)


@dataclass(frozen=True)
class VlanConfig:
    name: str
    interface: str
    instances: tuple[InstanceConfig, ...]
    # all-active: the VLAN's shared VIPs and the multicast MAC that ARP answers with
    vips: tuple[IPInterface, ...] = ()
    multicast_mac: str = ""
    track: tuple[TrackRef, ...] = ()


@dataclass(frozen=True)
class GroupConfig:
    """per-vlan-active: VLANs whose routers move together (keepalived's sync groups)."""

    name: str
    vlans: tuple[str, ...]
    track: tuple[TrackRef, ...] = ()


@dataclass(frozen=True)
class ClusterConfig:
    """all-active: the members, the buckets and their election (vipd.core.cluster)."""

    members: tuple[str, ...]
    buckets: int = 16
    vrid_base: int = 240
    advert_interval_cs: int = 100
    election_vlan: str = ""  # the first VLAN's name when not given
    seed: bytes = b"vipd"
    queue: int = 7100  # NFQUEUE number for the first packet of each connection


@dataclass(frozen=True)
class SyncConfig:
    interface: str
    local: IPAddress
    peers: tuple[IPAddress, ...]
    port: int = 3780
    key_file: str = ""
    node_id: int = 0  # 0: derived from `local`
    alive_interval_ms: int = 500
    protocols: frozenset[int] = frozenset(PROTOCOLS[p] for p in DEFAULT_PROTOCOLS)
    ignore: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    zones: frozenset[int] | None = None  # conntrack zones to sync; None: all
    # a backup whose master is silent on a VLAN but alive on the sync link: "takeover"
    # (RFC 9568, and an alarm) or "hold" (stay backup, report the broken VLAN)
    on_vlan_silent: str = "takeover"

    @property
    def effective_node_id(self) -> int:
        """This node's id on the sync link: configured, or the low 32 bits of `local`."""
        return self.node_id or (int(self.local) & 0xFFFFFFFF) or 1


def load_sync_key(path: str) -> bytes:
    """The sync link's shared key: refused if others than the owner may read or write it,
    or shorter than 16 bytes. (The daemon and check-config both call this.)"""
    import os
    import stat

    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            key = f.read(4097).strip()
    except OSError as exc:
        raise ConfigError([f"sync.key_file: {path}: {exc.strerror}"]) from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError([f"sync.key_file: {path} can be read or written by others "
                           f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it"])
    if len(key) < 16 or len(key) > 4096:
        raise ConfigError([f"sync.key_file: {path}: the key must be 16 to 4096 bytes"])
    return key


@dataclass(frozen=True)
class NotifyConfig:
    """Commands run on transitions (argv lists; arguments and environment describe the
    router and the change), one at a time in order, each bounded by `timeout_ms`."""

    commands: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (event, argv)
    timeout_ms: int = 5000


@dataclass(frozen=True)
class Config:
    node: NodeConfig
    mode: Mode
    vlans: tuple[VlanConfig, ...]
    sync: SyncConfig | None = None
    source: str = field(default="", compare=False)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    cluster: ClusterConfig | None = None
    trackers: tuple[TrackerSpec, ...] = ()
    track: tuple[TrackRef, ...] = ()  # followed by every router of the node
    groups: tuple[GroupConfig, ...] = ()

    def group_of(self, vlan: str) -> str | None:
        """The group a VLAN's routers move with: the node (single-active, all-active), its
        named group (per-vlan-active), or none."""
        if self.mode is not Mode.PER_VLAN_ACTIVE:
            return NODE
        return next((g.name for g in self.groups if vlan in g.vlans), None)

    def track_of(self, vlan: VlanConfig | None, inst: InstanceConfig | None = None
                 ) -> tuple[TrackRef, ...]:
        """Every tracker a router follows: the node's, its group's, its VLAN's, its own."""
        refs = list(self.track)
        if vlan is not None:
            group = self.group_of(vlan.name)
            refs += [r for g in self.groups if g.name == group for r in g.track]
            refs += vlan.track
        if inst is not None:
            refs += inst.track
        return tuple(refs)


def virtual_mac(vrid: int, family: int) -> str:
    """RFC 9568 7.3: 00-00-5E-00-01-{VRID} (IPv4), 00-00-5E-00-02-{VRID} (IPv6)."""
    return f"00:00:5e:00:0{1 if family == 4 else 2}:{vrid:02x}"


def virtual_link_local(vrid: int) -> ipaddress.IPv6Interface:
    """A link-local address derived (EUI-64) from the IPv6 virtual MAC, used as the first
    address when the configuration names none (RFC 9568 5.2.9 needs one first)."""
    return ipaddress.IPv6Interface(f"fe80::200:5eff:fe00:2{vrid:02x}/64")


def router_configs(vlan: VlanConfig, inst: InstanceConfig) -> list[RouterConfig]:
    """One core RouterConfig per address family of the instance (RFC 9568: independent)."""
    out = []
    for family in inst.families():
        vips = inst.vips_of(family)
        addrs: list[IPAddress] = [v.ip for v in vips]
        if family == 6:
            lls = [a for a in addrs if a.is_link_local]
            rest = [a for a in addrs if not a.is_link_local]
            if not lls and inst.advertise_link_local:
                lls = [virtual_link_local(inst.vrid).ip]
            addrs = lls + rest
        out.append(RouterConfig(
            name=f"{vlan.name}/vrid {inst.vrid}/IPv{family}",
            vrid=inst.vrid,
            family=family,
            version=inst.version,
            priority=inst.priority,
            advert_interval_cs=inst.advert_interval_cs,
            addresses=tuple(addrs),
            preempt=inst.preempt,
            preempt_delay=ms_to_s(inst.preempt_delay_ms),
            accept_mode=inst.accept_mode,
            accept_v2=inst.v2_compat,
            checksum=inst.checksum if family == 4 else ChecksumVariant.IPV6,
            garp_count=inst.garp_count,
            garp_interval=ms_to_s(inst.garp_interval_ms),
            garp_refresh=ms_to_s(inst.garp_refresh_ms) if inst.garp_refresh_ms else None,
            reannounce_on_lower=inst.reannounce_on_lower,
            strict_addresses=inst.address_check == "strict",
        ))
    return out


def link_local_vips(inst: InstanceConfig) -> tuple[IPInterface, ...]:
    """The VIPs to install, with the derived link-local added for IPv6 when none is given
    and it is advertised (or a virtual MAC needs it as the source of its NAs)."""
    vips = list(inst.vips)
    if (6 in inst.families() and (inst.advertise_link_local or inst.virtual_mac)
            and not any(v.version == 6 and v.ip.is_link_local for v in vips)):
        vips.append(virtual_link_local(inst.vrid))
    return tuple(vips)


def default_multicast_mac(index: int) -> str:
    """A locally administered multicast MAC per VLAN (03:...): IGMP snooping leaves it
    alone (it is not 01:00:5e), so switches flood it to every port of the VLAN."""
    return f"03:00:5e:00:01:{index + 1:02x}"


def election_vlan(cfg: Config) -> VlanConfig:
    assert cfg.cluster is not None
    return next((v for v in cfg.vlans if v.name == cfg.cluster.election_vlan), cfg.vlans[0])


def cluster_specs(cfg: Config) -> list[RouterSpec]:
    """all-active: one virtual router per bucket on the election VLAN. They hold no VIPs
    (the VLANs' VIPs are on every member); being master of one means owning the bucket.
    The advert lists the election VLAN's first VIP (of the family elections run in)."""
    cl = cfg.cluster
    assert cl is not None
    vlan = election_vlan(cfg)
    first = min(vlan.vips, key=lambda v: v.version)
    specs = []
    for b in range(cl.buckets):
        rc = RouterConfig(
            name=f"bucket {b}", vrid=cl.vrid_base + b, family=first.version, version=3,
            priority=bucket_priority(cl.members, cfg.node.name, b),
            advert_interval_cs=cl.advert_interval_cs,
            addresses=((virtual_link_local(cl.vrid_base + b).ip, first.ip)
                       if first.version == 6 else (first.ip,)),
            preempt=True, accept_mode=True, garp_count=0)
        specs.append(RouterSpec(vlan.name, vlan.interface, rc, (), bucket=b, group=NODE,
                                track=cfg.track))
    return specs


def router_specs(cfg: Config) -> list[RouterSpec]:
    """Every virtual router of the configuration, as the node core takes them."""
    if cfg.cluster is not None:
        return cluster_specs(cfg)
    specs = []
    for vlan in cfg.vlans:
        for inst in vlan.instances:
            all_vips = link_local_vips(inst)
            for rc in router_configs(vlan, inst):
                vips = tuple(v for v in all_vips if v.version == rc.family)
                peers = tuple(a for a in inst.unicast_peers if a.version == rc.family)
                specs.append(RouterSpec(vlan.name, vlan.interface, rc, vips, inst.virtual_mac,
                                        peers=peers, group=cfg.group_of(vlan.name),
                                        track=cfg.track_of(vlan, inst)))
    return specs


# ---------------------------------------------------------------- parsing

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s)\s*$")


def parse_duration_ms(value: object) -> int:
    """'10ms', '1s', '1.5s' (or a bare number of seconds) to whole milliseconds."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int | float):
        ms = float(value) * 1000
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        ms = float(m.group(1)) * (1 if m.group(2) == "ms" else 1000)
    else:
        raise ValueError
    if not math.isfinite(ms) or ms < 0 or ms > MAX_DURATION_MS or ms != int(ms):
        raise ValueError
    return int(ms)


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = 4
_SHORT.maxlevel = 2


class _Parser:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def err(self, path: str, value: object, why: str) -> None:
        self.errors.append(f"{path or '(document)'}: {_SHORT.repr(value)} {why}")

    def opt(self, path: str, m: Mapping[str, Any], key: str, conv: Callable[[object], T],
            why: str, default: T) -> T:
        """An optional key: its converted value, or `default` when absent (or invalid, in
        which case an error is recorded). Never `value or default`: 0 and false are values."""
        got = self.get(path, m, key, conv, why, default)
        return default if got is None else got

    def mapping(self, path: str, value: object, known: set[str]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            self.err(path, value, "is not a mapping")
            return {}
        for key in value:
            if key not in known:
                self.errors.append(
                    f"{_join(path, _SHORT.repr(key) if not isinstance(key, str) else key[:60])}"
                    f": unknown key (known: {', '.join(sorted(known))})")
        return value

    def get(self, path: str, m: Mapping[str, Any], key: str, conv: Callable[[object], T],
            why: str, default: T | None = None, required: bool = False) -> T | None:
        if key not in m:
            if required:
                self.errors.append(f"{_join(path, key)}: is required")
            return default
        try:
            return conv(m[key])
        except (ValueError, TypeError):
            self.err(_join(path, key), m[key], why)
            return default


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _int_in(lo: int, hi: int) -> Callable[[object], int]:
    def conv(v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError
        return v
    return conv


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise ValueError
    return v


def _name(v: object) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,15}", v):
        raise ValueError
    return v


def _label(v: object) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v):
        raise ValueError
    return v


def _path(v: object) -> str:
    if not isinstance(v, str) or not v.startswith("/"):
        raise ValueError
    return v


def _ip(v: object) -> IPAddress:
    if not isinstance(v, str):
        raise ValueError
    return ipaddress.ip_address(v)


def _vip(v: object) -> IPInterface:
    if not isinstance(v, str):
        raise ValueError
    if "/" not in v:
        ipaddress.ip_address(v)  # a bad address says so before the missing prefix does
        raise ValueError
    iface = ipaddress.ip_interface(v)
    return iface


def _parse_instance(p: _Parser, path: str, raw: object) -> InstanceConfig | None:
    m = p.mapping(path, raw, SECTIONS["instance"].names())
    if not m:
        return None
    nerr = len(p.errors)
    vrid = p.get(path, m, "vrid", _int_in(1, 255), "is not a VRID (1..255)", required=True)
    prio = p.get(path, m, "priority", _int_in(1, 255), "is not a priority (1..255)", 100)
    version = p.get(path, m, "version", _int_in(2, 3), "is not a VRRP version (2 or 3)", 3)
    interval_ms = p.get(path, m, "advert_interval", parse_duration_ms,
                        "is not a duration (like 10ms or 1s)", 1000)
    interval_cs = 100
    if interval_ms is not None and version is not None:
        if version == 3 and (interval_ms % 10 or not 10 <= interval_ms <= 40950):
            p.err(f"{path}.advert_interval", m.get("advert_interval"),
                  "is not 10ms..40.95s in 10 ms steps (VRRPv3)")
        elif version == 2 and (interval_ms % 1000 or not 1000 <= interval_ms <= 255000):
            p.err(f"{path}.advert_interval", m.get("advert_interval"),
                  "is not whole seconds 1s..255s (VRRPv2)")
        interval_cs = interval_ms // 10
    vips: list[IPInterface] = []
    raw_vips = m.get("vips")
    if not isinstance(raw_vips, list) or not raw_vips:
        p.err(f"{path}.vips", raw_vips, "is not a non-empty list of address/prefix")
    else:
        for i, rv in enumerate(raw_vips):
            try:
                vips.append(_vip(rv))
            except (ValueError, TypeError):
                why = ("is not an IP address" if not isinstance(rv, str) or "/" in rv
                       or not _is_ip(rv) else "has no prefix length (like 192.0.2.1/24)")
                p.err(f"{path}.vips[{i}]", rv, why)
        seen: set[IPAddress] = set()
        for i, v in enumerate(vips):
            if v.ip in seen:
                p.err(f"{path}.vips[{i}]", str(v), "is listed twice")
            seen.add(v.ip)
        if version == 2 and any(v.version == 6 for v in vips):
            p.err(f"{path}.vips", [str(v) for v in vips if v.version == 6],
                  "are IPv6: VRRPv2 is IPv4 only (use version: 3)")
        for fam in (4, 6):
            if sum(1 for v in vips if v.version == fam) > 255:
                p.err(f"{path}.vips", f"IPv{fam}", "has more than 255 addresses")
    checksum = p.get(path, m, "checksum", _checksum, "is not rfc9568 or pseudo-header",
                     ChecksumVariant.PSEUDO_HEADER)
    garp = p.mapping(f"{path}.garp", m.get("garp", {}), SECTIONS["garp"].names())
    tf = "is not true or false"
    g = f"{path}.garp"
    inst = InstanceConfig(
        vrid=vrid or 1,  # (vrid and priority have no valid falsy value)
        priority=prio or 100,
        advert_interval_cs=interval_cs,
        version=version or 3,
        vips=tuple(vips),
        preempt=p.opt(path, m, "preempt", _bool, tf, True),
        preempt_delay_ms=p.opt(path, m, "preempt_delay", parse_duration_ms,
                               "is not a duration", 0),
        accept_mode=p.opt(path, m, "accept_mode", _bool, tf, False),
        v2_compat=p.opt(path, m, "v2_compat", _bool, tf, False),
        checksum=checksum or ChecksumVariant.PSEUDO_HEADER,
        virtual_mac=p.opt(path, m, "virtual_mac", _bool, tf, False),
        garp_count=p.opt(g, garp, "count", _int_in(0, 100), "is not a count (0..100)", 3),
        garp_interval_ms=p.opt(g, garp, "interval", parse_duration_ms, "is not a duration",
                               100),
        garp_refresh_ms=p.opt(g, garp, "refresh", parse_duration_ms, "is not a duration", 0),
        reannounce_on_lower=p.opt(path, m, "reannounce_on_lower", _bool, tf, True),
        address_check=p.opt(path, m, "address_check", _one_of("relaxed", "strict"),
                            "is not relaxed or strict", "relaxed"),
        advertise_link_local=p.opt(path, m, "advertise_link_local", _bool, tf, True),
        track=_track_refs(p, path, m, "instance"),
        unicast_peers=p.opt(path, m, "unicast_peers", _ip_list,
                            "is not a non-empty list of IP addresses", ()),
    )
    if inst.v2_compat and inst.version != 3:
        p.err(f"{path}.v2_compat", True, "only applies to version 3 instances")
    if inst.unicast_peers:
        for fam in inst.families():
            if not any(a.version == fam for a in inst.unicast_peers):
                p.err(f"{path}.unicast_peers", [str(a) for a in inst.unicast_peers],
                      f"has no IPv{fam} peer for the instance's IPv{fam} VIPs")
        if len(set(inst.unicast_peers)) != len(inst.unicast_peers):
            p.err(f"{path}.unicast_peers", [str(a) for a in inst.unicast_peers],
                  "lists an address twice")
    return inst if len(p.errors) == nerr else None


def _ip_list(v: object) -> tuple[IPAddress, ...]:
    if not isinstance(v, list) or not v:
        raise ValueError(v)
    return tuple(_ip(x) for x in v)


MAX_WEIGHT = 254


def _track_refs(p: _Parser, path: str, m: Mapping[str, Any], via: str) -> tuple[TrackRef, ...]:
    """`track: [name, {name: NAME, weight: N}, ...]`: the trackers followed here."""
    raw = m.get("track")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        p.err(_join(path, "track"), raw, "is not a list of tracker names")
        return ()
    refs: list[TrackRef] = []
    for i, r in enumerate(raw):
        at = f"{_join(path, 'track')}[{i}]"
        if isinstance(r, str) and r:
            refs.append(TrackRef(r, None, via))
            continue
        rm = p.mapping(at, r, SECTIONS["ref"].names())
        name = p.get(at, rm, "name", _label, "is not a tracker name", required=True)
        weight = p.get(at, rm, "weight", _int_in(-MAX_WEIGHT, MAX_WEIGHT),
                       f"is not a weight (-{MAX_WEIGHT}..{MAX_WEIGHT})")
        if name:
            refs.append(TrackRef(name, weight, via))
    return tuple(refs)


def _named(p: _Parser, key: str, raw: object, what: str
           ) -> Iterator[tuple[str, str, object]]:
    """The entries of a mapping of names (`trackers:`, `groups:`): (path, name, body),
    each name checked; what is not a mapping, or not a name, is an error."""
    if raw is None:
        return
    if not isinstance(raw, Mapping):
        p.err(key, raw, f"is not a mapping of {what} names")
        return
    for name, body in raw.items():
        path = f"{key}.{str(name)[:60]}"
        try:
            yield path, _label(name), body
        except (ValueError, TypeError):
            p.err(path, name, f"is not a {what} name")


def _parse_trackers(p: _Parser, raw: object) -> tuple[TrackerSpec, ...]:
    out: list[TrackerSpec] = []
    for path, name, body in _named(p, "trackers", raw, "tracker"):
        m = p.mapping(path, body, SECTIONS["tracker"].names())
        kinds = [k for k in ("interface", "script", "file") if k in m]
        if len(kinds) != 1:
            p.err(path, "...", "needs exactly one of interface, script or file")
            continue
        kind = kinds[0]
        weight = p.opt(path, m, "weight", _int_in(-MAX_WEIGHT, MAX_WEIGHT),
                       f"is not a weight (-{MAX_WEIGHT}..{MAX_WEIGHT})", 1 if kind == "file" else 0)
        interval = p.opt(path, m, "interval", parse_duration_ms, "is not a duration", 1000)
        timeout = p.opt(path, m, "timeout", parse_duration_ms, "is not a duration",
                        min(2000, interval))
        for key, v, lo in (("interval", interval, 100), ("timeout", timeout, 10)):
            if not lo <= v <= 3_600_000:
                p.err(_join(path, key), m.get(key), f"is not {lo} ms to 1 h")
        if kind != "script":
            for key in ("rise", "fall", "user", "timeout"):
                if key in m:
                    p.err(_join(path, key), m[key], "only applies to a script")
        if kind == "interface" and "interval" in m:
            p.err(_join(path, "interval"), m["interval"], "does not apply to an interface "
                  "(its state comes from netlink)")
        user = p.opt(path, m, "user", _user, "is not a user of this system", "")
        spec = TrackerSpec(
            name=name, kind=kind,
            interface=p.opt(path, m, "interface", _name, "is not an interface name", "")
            if kind == "interface" else "",
            argv=p.opt(path, m, "script", _argv, "is not a command (a list of strings, the "
                       "first an absolute path)", ()) if kind == "script" else (),
            path=p.opt(path, m, "file", _path, "is not an absolute path", "")
            if kind == "file" else "",
            interval_ms=interval, timeout_ms=timeout,
            rise=p.opt(path, m, "rise", _int_in(1, 100), "is not a count (1..100)", 1),
            fall=p.opt(path, m, "fall", _int_in(1, 100), "is not a count (1..100)", 1),
            user=user, weight=weight)
        out.append(spec)
    return tuple(out)


def _user(v: object) -> str:
    import pwd

    if not isinstance(v, str) or not v:
        raise ValueError(v)
    try:
        pwd.getpwnam(v)
    except KeyError:
        raise ValueError(v) from None
    return v


def _parse_groups(p: _Parser, raw: object, vlans: list[VlanConfig]) -> tuple[GroupConfig, ...]:
    names = {v.name for v in vlans}
    taken: dict[str, str] = {}
    out: list[GroupConfig] = []
    for path, name, body in _named(p, "groups", raw, "group"):
        if name == NODE:
            p.err(path, name, f"is reserved (\"{NODE}\" names every router of the node)")
        m = p.mapping(path, body, SECTIONS["group"].names())
        members = m.get("vlans")
        if not isinstance(members, list) or len(members) < 2 or not all(
                isinstance(x, str) for x in members):
            p.err(_join(path, "vlans"), members, "is not a list of two or more VLAN names")
            continue
        for v in members:
            if v not in names:
                p.err(_join(path, "vlans"), v, "is not one of the VLANs")
            elif v in taken:
                p.err(_join(path, "vlans"), v, f"is already in group {taken[v]}")
            else:
                taken[v] = name
        out.append(GroupConfig(name, tuple(members), _track_refs(p, path, m, f"group {name}")))
    return tuple(out)


def _check_tracking(p: _Parser, cfg_mode: Mode | None, trackers: tuple[TrackerSpec, ...],
                    node_refs: tuple[TrackRef, ...], groups: tuple[GroupConfig, ...],
                    vlans: list[VlanConfig]) -> None:
    """Every followed tracker exists; weights stay where they cannot split a group: in
    single-active only the node's list may carry weights (every VLAN moves together), in a
    named group only the group's, and in all-active none (the buckets' priorities are the
    cluster's ranking)."""
    specs = {t.name: t for t in trackers}
    grouped = {v for g in groups for v in g.vlans}

    def check(path: str, refs: tuple[TrackRef, ...], weights_ok: bool, why: str) -> None:
        for i, r in enumerate(refs):
            spec = specs.get(r.tracker)
            if spec is None:
                p.err(f"{path}[{i}]", r.tracker, "is not a tracker (see trackers:)")
                continue
            weight = spec.weight if r.weight is None else r.weight
            if weight and not weights_ok:
                p.err(f"{path}[{i}]", r.tracker, f"has weight {weight}: {why}")

    aa = cfg_mode is Mode.ALL_ACTIVE
    check("track", node_refs, not aa, "all-active ranks the buckets itself (weight 0: "
          "a fault drains every bucket)")
    for g in groups:
        check(f"groups.{g.name}.track", g.track, True, "")
    for i, v in enumerate(vlans):
        if cfg_mode is Mode.SINGLE_ACTIVE:
            why = "single-active moves every VLAN together: weight it in the top-level track"
        elif v.name in grouped:
            why = "the VLAN is in a group, whose members move together: weight it there"
        else:
            why = "all-active ranks the buckets itself"
        alone = cfg_mode is Mode.PER_VLAN_ACTIVE and v.name not in grouped
        check(f"vlans[{i}].track", v.track, alone, why)
        for j, inst in enumerate(v.instances):
            check(f"vlans[{i}].instances[{j}].track", inst.track, alone, why)


def _protocols(v: object) -> frozenset[int]:
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x in PROTOCOLS
                                                   for x in v):
        raise ValueError(v)
    return frozenset(PROTOCOLS[x] for x in v)


def _argv(v: object) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v) \
            or not v[0].startswith("/"):
        raise ValueError(v)
    return tuple(v)


def _zones(v: object) -> frozenset[int]:
    if not isinstance(v, list) or not v or not all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 65535 for x in v):
        raise ValueError(v)
    return frozenset(v)


def _networks(v: object) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(v)
    return tuple(ipaddress.ip_network(x, strict=False) for x in v)


def _is_ip(v: str) -> bool:
    try:
        ipaddress.ip_address(v)
        return True
    except ValueError:
        return False


def _one_of(*choices: str) -> Callable[[object], str]:
    def conv(v: object) -> str:
        if v not in choices:
            raise ValueError
        return str(v)
    return conv


def _checksum(v: object) -> ChecksumVariant:
    """The IPv4 VRRPv3 checksum variant to send (both are always accepted)."""
    if v not in ("rfc9568", "pseudo-header"):
        raise ValueError
    return ChecksumVariant(v)


def parse(data: object, source: str = "") -> Config:
    """Validate a parsed YAML document into a Config, or raise ConfigError with all errors."""
    p = _Parser()
    top = p.mapping("", data, SECTIONS["top"].names())
    node_raw = p.mapping("node", top.get("node", {}), SECTIONS["node"].names())
    node = NodeConfig(
        name=p.get("node", node_raw, "name", _label, "is not a node name", "vipd",
                   required=True) or "vipd",
        control_socket=p.opt("node", node_raw, "control_socket", _path,
                             "is not an absolute path", DEFAULT_CONTROL_SOCKET),
        control_socket_mode=p.opt("node", node_raw, "control_socket_mode", _int_in(0, 0o777),
                                  "is not a file mode (0..0o777)", 0o600),
        realtime_priority=p.opt("node", node_raw, "realtime_priority", _int_in(0, 99),
                                "is not a SCHED_RR priority (0..99)", 0),
        metrics=p.opt("node", node_raw, "metrics", _listen, "is not host:port "
                      "(127.0.0.1:9765, [::1]:9765 or :9765)", ""),
    )
    # Required: a missing mode used to mean single-active, the mode that drains every
    # VLAN of the node on one fault; that must be a choice, not a default.
    mode = p.get("", top, "mode", lambda v: Mode(v),
                 "is not single-active, per-vlan-active or all-active", required=True)
    all_active = mode is Mode.ALL_ACTIVE
    vlans: list[VlanConfig] = []
    raw_vlans = top.get("vlans")
    if not isinstance(raw_vlans, list) or not raw_vlans:
        p.err("vlans", raw_vlans, "is not a non-empty list")
        raw_vlans = []
    for i, rv in enumerate(raw_vlans):
        path = f"vlans[{i}]"
        m = p.mapping(path, rv, SECTIONS["vlan"].names(
            "all-active" if all_active else "per-vlan-active"))
        if not m:
            continue
        name = p.get(path, m, "name", _label, "is not a VLAN name", required=True)
        ifname = p.get(path, m, "interface", _name, "is not an interface name", required=True)
        track = _track_refs(p, path, m, f"vlan {name}")
        insts: list[InstanceConfig] = []
        raw_insts = m.get("instances")
        if all_active:
            # every member holds the VLAN's VIPs: no instance, no VRID of its own
            if raw_insts is not None:
                p.err(f"{path}.instances", "...", "are not used in all-active mode (list the "
                      "VLAN's vips; buckets are elected in the cluster section)")
            vips = p.get(path, m, "vips", _vip_list, "is not a non-empty list of "
                         "addresses with prefix length", required=True) or ()
            mac = p.opt(path, m, "multicast_mac", _multicast_mac, "is not a multicast MAC "
                        "address (first octet odd)", default_multicast_mac(i))
            if name and ifname and vips:
                vlans.append(VlanConfig(name, ifname, (), tuple(vips), mac, track))
            continue
        if not isinstance(raw_insts, list) or not raw_insts:
            p.err(f"{path}.instances", raw_insts, "is not a non-empty list")
            raw_insts = []
        seen: dict[tuple[int, int], int] = {}
        for j, ri in enumerate(raw_insts):
            inst = _parse_instance(p, f"{path}.instances[{j}]", ri)
            if inst is None:
                continue
            for fam in inst.families():
                if (inst.vrid, fam) in seen:
                    p.err(f"{path}.instances[{j}].vrid", inst.vrid,
                          f"is already used for IPv{fam} by instances[{seen[inst.vrid, fam]}]")
                seen[inst.vrid, fam] = j
            insts.append(inst)
        if name and ifname:
            vlans.append(VlanConfig(name, ifname, tuple(insts), track=track))
    for attr in ("name", "interface"):
        values = [getattr(v, attr) for v in vlans]
        for i, v in enumerate(values):
            if v in values[:i]:
                p.err(f"vlans[{i}].{attr}", v, "is used by another VLAN")
    sync = None
    if "sync" in top:
        sm = p.mapping("sync", top["sync"], SECTIONS["sync"].names())
        s_if = p.get("sync", sm, "interface", _name, "is not an interface name", required=True)
        s_local = p.get("sync", sm, "local", _ip, "is not an IP address", required=True)
        peers: list[IPAddress] = []
        raw_peers = sm.get("peers")
        if not isinstance(raw_peers, list) or not raw_peers:
            p.err("sync.peers", raw_peers, "is not a non-empty list of addresses")
            raw_peers = []
        for i, rp in enumerate(raw_peers):
            try:
                peers.append(_ip(rp))
            except (ValueError, TypeError):
                p.err(f"sync.peers[{i}]", rp, "is not an IP address")
        port = p.opt("sync", sm, "port", _int_in(1, 65535), "is not a UDP port", 3780)
        key_file = p.get("sync", sm, "key_file", _path, "is not a file path", required=True)
        node_id = p.opt("sync", sm, "node_id", _int_in(1, 2**32 - 1),
                        "is not a node id (1 to 4294967295)", 0)
        alive_ms = p.opt("sync", sm, "alive_interval", parse_duration_ms,
                         "is not a duration", 500)
        if not 1 <= alive_ms <= 10_000:
            p.err("sync.alive_interval", sm.get("alive_interval"), "is not 1 ms to 10 s")
        protocols = p.opt("sync", sm, "protocols", _protocols,
                          f"is not a list of protocols ({', '.join(PROTOCOLS)})",
                          frozenset({6, 17, 1, 58, 132}))
        no_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
        ignore = p.opt("sync", sm, "ignore", _networks,
                       "is not a list of addresses or prefixes", no_networks)
        zones = p.opt("sync", sm, "zones", _zones, "is not a list of conntrack zones "
                      "(0 to 65535)", None)
        on_silent = p.opt("sync", sm, "on_vlan_silent", _one_of("takeover", "hold"),
                          "is not takeover or hold", "takeover")
        if s_local in peers:
            p.err("sync.peers", [str(x) for x in peers], "lists this node's own address")
        if s_if and s_local and key_file:
            sync = SyncConfig(s_if, s_local, tuple(peers), port, key_file, node_id, alive_ms,
                              protocols, ignore, zones, on_silent)
    cluster = None
    if all_active:
        cluster = _parse_cluster(p, top.get("cluster"), node.name, vlans)
        if sync is None:
            p.err("sync", None, "is required in all-active mode (connection state follows "
                  "the buckets)")
    elif "cluster" in top:
        p.err("cluster", "...", "is only used in all-active mode")
    notify = NotifyConfig()
    if "notify" in top:
        nm = p.mapping("notify", top["notify"], SECTIONS["notify"].names())
        cmds = []
        for ev in NOTIFY_EVENTS:
            if ev in nm:
                argv = p.get("notify", nm, ev, _argv, "is not a command (a list of strings, "
                             "the first an absolute path)")
                if argv:
                    cmds.append((ev, argv))
        timeout = p.opt("notify", nm, "timeout", parse_duration_ms, "is not a duration", 5000)
        notify = NotifyConfig(tuple(cmds), timeout)
    trackers = _parse_trackers(p, top.get("trackers"))
    node_track = _track_refs(p, "", top, NODE)
    groups: tuple[GroupConfig, ...] = ()
    if "groups" in top:
        if mode is not Mode.PER_VLAN_ACTIVE:
            p.err("groups", "...", "are for per-vlan-active (single-active and all-active "
                  "already move every VLAN together)")
        else:
            groups = _parse_groups(p, top["groups"], vlans)
    _check_tracking(p, mode, trackers, node_track, groups, vlans)
    if p.errors:
        raise ConfigError(_bounded(p.errors))
    return Config(node, mode or Mode.SINGLE_ACTIVE, tuple(vlans), sync, source, notify,
                  cluster, trackers, node_track, groups)


def _listen(v: object) -> str:
    from vipd.io.metrics_http import parse_listen

    if not isinstance(v, str):
        raise ValueError(v)
    if v:  # "" is off, as leaving the key out
        parse_listen(v)
    return v


def _vip_list(v: object) -> tuple[IPInterface, ...]:
    if not isinstance(v, list) or not v:
        raise ValueError(v)
    return tuple(_vip(x) for x in v)


def _multicast_mac(v: object) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", v):
        raise ValueError(v)
    if not int(v[:2], 16) & 1:
        raise ValueError(v)
    return v.lower()


def _parse_cluster(p: _Parser, raw: object, me: str,
                   vlans: list[VlanConfig]) -> ClusterConfig | None:
    if raw is None:
        p.err("cluster", None, "is required in all-active mode (members at least)")
        return None
    cm = p.mapping("cluster", raw, SECTIONS["cluster"].names())
    members = cm.get("members")
    if (not isinstance(members, list) or not 2 <= len(members) <= MAX_MEMBERS
            or not all(isinstance(x, str) and x for x in members)
            or len(set(members)) != len(members)):
        p.err("cluster.members", members, f"is not a list of 2 to {MAX_MEMBERS} distinct "
              "node names")
        return None
    if me not in members:
        p.err("cluster.members", members, f"does not list this node ({me})")
    buckets = p.opt("cluster", cm, "buckets", _int_in(2, MAX_BUCKETS),
                    f"is not a bucket count (2 to {MAX_BUCKETS})", 16)
    base = p.opt("cluster", cm, "vrid_base", _int_in(1, 255), "is not a VRID", 256 - buckets)
    if base + buckets - 1 > 255:
        p.err("cluster.vrid_base", base, f"leaves no room for {buckets} buckets (VRIDs "
              f"{base} to {base + buckets - 1})")
    interval = p.opt("cluster", cm, "advert_interval", parse_duration_ms, "is not a duration",
                     1000)
    if not 10 <= interval <= 40_950 or interval % 10:
        p.err("cluster.advert_interval", cm.get("advert_interval"),
              "is not 10 ms to 40.95 s in whole centiseconds")
    names = [v.name for v in vlans]
    ev = p.opt("cluster", cm, "election_vlan", _label, "is not a VLAN name",
               names[0] if names else "")
    if names and ev not in names:
        p.err("cluster.election_vlan", ev, "is not one of the VLANs")
    seed = p.opt("cluster", cm, "seed", lambda v: str(v).encode() if isinstance(
        v, (str, int)) and not isinstance(v, bool) else _fail(v), "is not a string or integer",
        b"vipd")
    queue = p.opt("cluster", cm, "queue", _int_in(0, 65535), "is not an NFQUEUE number", 7100)
    return ClusterConfig(tuple(members), buckets, base, interval // 10, ev, seed[:64], queue)


def _fail(v: object) -> bytes:
    raise ValueError(v)


def _bounded(errors: list[str]) -> list[str]:
    if len(errors) <= MAX_ERRORS:
        return errors
    return errors[:MAX_ERRORS] + [f"... and {len(errors) - MAX_ERRORS} more errors"]


_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[misc]
    """Safe loading (C parser when available) that refuses duplicate keys: YAML keeps the
    last silently, which hides a typo'd second `priority:`."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a plain value", key_node.start_mark
                ) from None
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_SHORT.repr(key)} (first on line {first})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


_PATH_PART = re.compile(r"\[\d+\]|[^.\[]+")


def yaml_lines(text: str) -> dict[str, int]:
    """Each path of the document (`vlans[1].instances[0].vips[2]`) and its line: a
    mapping's keys at the key, list items at the item."""
    out: dict[str, int] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                sub = _join(path, str(k.value))
                out[sub] = k.start_mark.line + 1
                walk(v, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                sub = f"{path}[{i}]"
                out[sub] = v.start_mark.line + 1
                walk(v, sub)

    try:
        walk(yaml.compose(text, Loader=_BaseLoader), "")
    except (yaml.YAMLError, RecursionError):
        return {}
    return out


def with_lines(text: str, errors: list[str]) -> list[str]:
    """The errors with the YAML line of their path (the deepest part of it that the file
    has): `vlans[1].instances[0].vips[2] (line 14): '192.0.2.300' is not an IP address`."""
    lines = yaml_lines(text)
    if not lines:
        return errors
    out = []
    for e in errors:
        path, sep, rest = e.partition(": ")
        parts = _PATH_PART.findall(path) if sep and not path.startswith("(") else []
        line = None
        while parts:
            key = "".join(p if p.startswith("[") else f".{p}" for p in parts).lstrip(".")
            line = lines.get(key)
            if line is not None:
                break
            parts.pop()
        out.append(f"{path} (line {line}): {rest}" if line is not None else e)
    return out


def loads(text: str, source: str = "<string>") -> Config:
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError([f"(document): over {MAX_CONFIG_BYTES} bytes: refused"])
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        raise ConfigError([f"(document): not valid YAML: {str(exc)[:500]}"]) from exc
    except RecursionError:
        raise ConfigError(["(document): nested too deeply"]) from None
    try:
        return parse(data, source)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError(["(document): nested too deeply"]) from None
    except Exception as exc:  # defensive: a parser bug must be an error, not a traceback
        raise ConfigError([f"(document): cannot be read ({type(exc).__name__})"]) from exc


def load(path: str | Path) -> Config:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"(file): {exc.strerror}"]) from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([f"(file): over {MAX_CONFIG_BYTES} bytes: refused"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"(file): not UTF-8 (byte {exc.start})"]) from None
    try:
        return loads(text, str(path))
    except ConfigError as exc:  # a file the operator edits: name the lines too
        raise ConfigError(with_lines(text, exc.errors)) from None
