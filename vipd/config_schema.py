"""The configuration's keys, in one table: the parser (vipd.config) takes each section's
known keys from here, so a key that is not documented is refused as unknown, and
docs/config.md is generated from it (`python -m vipd.config_schema > docs/config.md`).

Each key carries a valid and an invalid example: tests/test_config_schema.py puts each
into a minimal configuration and checks that the parser accepts the one and refuses the
other at that key's path (so every documented key is really read and checked), and that
writing a documented default gives the same configuration as leaving the key out.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import yaml

from vipd.core.cluster import MAX_BUCKETS, MAX_MEMBERS

REQUIRED = "required"
ANY_MODE: tuple[str, ...] = ()


@dataclass(frozen=True)
class Derived:
    """A default that depends on other keys, described in words."""

    text: str


@dataclass(frozen=True)
class Key:
    name: str
    type: str
    doc: str
    default: object = REQUIRED  # a YAML value, REQUIRED, or Derived(...)
    example: object = None  # a value the parser accepts here
    bad: object = None  # a value it refuses here
    modes: tuple[str, ...] = ANY_MODE  # where the key applies (empty: every mode)
    section: str = ""  # the key is a section of its own (documented there)


@dataclass(frozen=True)
class Section:
    path: str  # how errors name it: "node", "vlans[]", "trackers.NAME", ...
    title: str
    doc: str
    keys: tuple[Key, ...]

    def names(self, mode: str | None = None) -> set[str]:
        """The keys known here (in a mode: only those that apply to it)."""
        return {k.name for k in self.keys if mode is None or not k.modes or mode in k.modes}


VRRP_MODES = ("single-active", "per-vlan-active")
DURATION = "duration"
BOOL = "true or false"
NOTIFY_EVENTS = ("master", "backup", "fault", "stop", "alarm")
PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58, "sctp": 132, "dccp": 33,
             "udplite": 136, "gre": 47}
DEFAULT_PROTOCOLS = ("tcp", "udp", "icmp", "ipv6-icmp", "sctp")
TRACK_LIST = "list of tracker references"

TYPES = {
    DURATION: "a number with a unit: `10ms`, `1s`, `1.5s` (a bare number is seconds); "
              "whole milliseconds, at most one day.",
    "name": "letters, digits and `_ . -`, 1 to 64 characters.",
    "interface": "a Linux interface name (1 to 15 characters).",
    "address/prefix": "an IPv4 or IPv6 address with its prefix length: `192.0.2.1/24`, "
                      "`2001:db8:1::1/64`.",
    "argv": "a command as a list of strings, no shell: `[/usr/local/bin/check, --fast]`; "
            "the first is an absolute path.",
    TRACK_LIST: "tracker names (`[uplink]`) or `{name: NAME, weight: N}` mappings: the "
                "trackers followed here; see [track entries](#track-entries).",
}

SECTIONS: dict[str, Section] = {}


def _section(key: str, path: str, title: str, doc: str, *keys: Key) -> None:
    SECTIONS[key] = Section(path, title, doc, keys)


_section(
    "top", "", "The document",
    "A YAML mapping. Unknown keys are refused everywhere, duplicate keys too, and every "
    "error is reported at once with its path and line. `vipd check-config FILE` checks a "
    "file without starting anything.",
    Key("node", "mapping", "This node.", REQUIRED, {"name": "r2"}, 5, section="node"),
    Key("mode", "`single-active`, `per-vlan-active` or `all-active`",
        "single-active: every VLAN moves together (one FAULT drains the node); "
        "per-vlan-active: each VLAN (or named group) elects its own master; all-active: "
        "every member holds the VIPs and a flow hash shares the work. Required: there is no "
        "safe default.", REQUIRED, "single-active", "active-active"),
    Key("vlans", "list", "The VLAN interfaces and their virtual routers (at least one).",
        REQUIRED, [{"name": "c", "interface": "lanC",
                    "instances": [{"vrid": 9, "vips": ["203.0.113.1/24"]}]}], [],
        section="vlan"),
    Key("trackers", "mapping of tracker names", "Checks that move priorities or put "
        "routers in FAULT (keepalived's track_interface, vrrp_script, track_file).",
        {}, {"up": {"interface": "up0"}}, 5, section="tracker"),
    Key("track", TRACK_LIST, "Trackers every router of the node follows. Weights are "
        "allowed here except in all-active.", [], ["t"], ["no-such-tracker"]),
    Key("groups", "mapping of group names", "per-vlan-active: VLANs that move together "
        "(keepalived's vrrp_sync_group): a FAULT of one member drains the others.",
        {}, {"g": {"vlans": ["a", "b"]}}, {"g": {"vlans": ["a"]}},
        modes=("per-vlan-active",), section="group"),
    Key("sync", "mapping", "Connection-state sync and the second channel between the "
        "nodes, over a dedicated link. Required in all-active.", None,
        {"interface": "sync0", "local": "203.0.113.1", "peers": ["203.0.113.2"],
         "key_file": "/etc/vipd/sync.key"}, 5, section="sync"),
    Key("cluster", "mapping", "all-active: the members and the buckets they share.",
        REQUIRED, {"members": ["r1", "r3"]}, {"members": ["r1"]}, modes=("all-active",),
        section="cluster"),
    Key("notify", "mapping", "Commands run on transitions.", {},
        {"master": ["/bin/true"]}, 5, section="notify"),
)

_section(
    "node", "node", "node",
    "This node: its name and how it is reached.",
    Key("name", "name", "The node's name: in logs, status, metrics, and all-active's "
        "member list.", REQUIRED, "r9", "not a name"),
    Key("control_socket", "absolute path", "Where `vipctl` reaches the daemon. The "
        "demotion counter is kept beside it (`<socket>.demote`).", "/run/vipd/vipd.sock",
        "/tmp/v.sock", "relative.sock"),
    Key("control_socket_mode", "file mode", "The control socket's permissions: YAML octal "
        "(`0660`) or decimal. Anyone who can connect can change the node's state.",
        0o600, 0o660, 0o1000),
    Key("realtime_priority", "0 to 99", "SCHED_RR priority for the daemon (0: the normal "
        "scheduler). Like keepalived's vrrp_rt_priority: timers and sync keep up under "
        "load.", 0, 50, 100),
    Key("metrics", "host:port", "Serve Prometheus metrics here (`127.0.0.1:9765`, "
        "`[::1]:9765`, `:9765`); empty: off. Names in docs/metrics.md.", "",
        "127.0.0.1:9765", "9765"),
)

_section(
    "vlan", "vlans[]", "vlans[]",
    "One VLAN interface. In single-active and per-vlan-active it carries VRRP instances; in "
    "all-active it carries the VIPs every member holds.",
    Key("name", "name", "The VLAN's name (status, groups, election_vlan).", REQUIRED, "c",
        "a b"),
    Key("interface", "interface", "The Linux interface (a VLAN subinterface, a bridge, a "
        "port).", REQUIRED, "lanZ", "an interface name too long"),
    Key("instances", "list", "The virtual routers on this VLAN (at least one).", REQUIRED,
        [{"vrid": 9, "vips": ["192.0.2.5/24"]}], [], modes=VRRP_MODES, section="instance"),
    Key("vips", "list of address/prefix", "all-active: the VLAN's shared VIPs.", REQUIRED,
        ["192.0.2.7/24"], ["192.0.2.7"], modes=("all-active",)),
    Key("multicast_mac", "MAC address", "all-active: the multicast MAC (first octet odd) "
        "that ARP and NA answer with, so the switch floods each frame to every member.",
        Derived("`03:00:5e:00:01:NN`, NN the VLAN's position from 01"),
        "03:00:5e:00:01:99", "02:00:5e:00:01:99", modes=("all-active",)),
    Key("track", TRACK_LIST, "Trackers this VLAN's routers follow. Weights only in "
        "per-vlan-active, and not for a VLAN in a group (weight the group).", [], ["t"], 5),
)

_section(
    "instance", "vlans[].instances[]", "vlans[].instances[]",
    "A VRRP instance: one virtual router per address family of its VIPs (RFC 9568 runs "
    "IPv4 and IPv6 independently, with the same VRID).",
    Key("vrid", "1 to 255", "The virtual router ID. Unique per VLAN and family.", REQUIRED,
        7, 256),
    Key("priority", "1 to 255", "Higher wins. 255 is the address owner: it holds the VIPs "
        "as its own addresses, and trackers never move it.", 100, 200, 0),
    Key("vips", "list of address/prefix", "The virtual addresses, IPv4 and/or IPv6, at "
        "most 255 per family.", REQUIRED, ["192.0.2.9/24"], ["192.0.2.9"]),
    Key("advert_interval", DURATION, "Advertisement interval: 10 ms to 40.95 s in 10 ms "
        "steps (VRRPv3), whole seconds 1 to 255 s (VRRPv2). Master_Down_Interval is three "
        "of them plus Skew_Time.", "1s", "100ms", "5ms"),
    Key("version", "2 or 3", "VRRP version. 2 (RFC 3768) is IPv4 only, for old peers.", 3,
        2, 4),
    Key("preempt", BOOL, "Take over from a lower-priority master.", True, False, "yes"),
    Key("preempt_delay", DURATION, "Wait this long after start before preempting.", "0s",
        "30s", "soon"),
    Key("accept_mode", BOOL, "Accept packets to the VIPs that this node does not own "
        "(RFC 9568 Accept_Mode). When false vipd drops them with nftables.", False, True,
        "no"),
    Key("v2_compat", BOOL, "VRRPv3 only: also accept VRRPv2 adverts (RFC 5798 section "
        "8.4), for a rolling upgrade from v2.", False, True, 1),
    Key("checksum", "`pseudo-header` or `rfc9568`", "The IPv4 VRRPv3 checksum to send "
        "(both are accepted): `pseudo-header` as keepalived and most routers, `rfc9568` "
        "without it.", "pseudo-header", "rfc9568", "crc32"),
    Key("virtual_mac", BOOL, "Use the virtual MAC (00:00:5e:00:01:VRID, IPv6 "
        "00:00:5e:00:02:VRID) through a macvlan, so hosts keep their ARP entries across a "
        "failover.", False, True, "on"),
    Key("garp", "mapping", "Gratuitous ARP and unsolicited NA after a takeover.", {},
        {"count": 5}, 5, section="garp"),
    Key("reannounce_on_lower", BOOL, "A master that hears a lower-priority master "
        "announces its VIPs again (the other one may have taken the hosts' caches).", True,
        False, "sometimes"),
    Key("address_check", "`relaxed` or `strict`", "An advert whose address list differs "
        "from ours: `relaxed` keeps it in the election (RFC 9568 only asks to log; a rolling "
        "change needs it), `strict` drops it (RFC 3768). Either way the peer is listed and "
        "status is degraded.", "relaxed", "strict", "lax"),
    Key("advertise_link_local", BOOL, "IPv6: list the virtual link-local address first "
        "(fe80::200:5eff:fe00:2VRID unless one is given), as RFC 9568 says. keepalived 2.2 "
        "does not and drops such adverts: set false against it.", True, False, "maybe"),
    Key("track", TRACK_LIST, "Trackers this instance follows. Weights as for its VLAN.", [],
        ["t"], "t"),
    Key("unicast_peers", "list of addresses", "Send adverts to these addresses (TTL 255) "
        "instead of the multicast group, and drop adverts from any other source (counted as "
        "unknown_peer). One peer per family of the VIPs at least.",
        Derived("none: multicast"), ["192.0.2.250"],
        ["192.0.2.250", "192.0.2.250"]),
)

_section(
    "garp", "vlans[].instances[].garp", "vlans[].instances[].garp",
    "Announcements after a takeover: gratuitous ARP for IPv4, unsolicited NA for IPv6.",
    Key("count", "0 to 100", "How many rounds.", 3, 5, 101),
    Key("interval", DURATION, "Between rounds.", "100ms", "50ms", "fast"),
    Key("refresh", DURATION, "Repeat one round this often while master (`0s`: never).",
        "0s", "60s", -1),
)

_section(
    "tracker", "trackers.NAME", "trackers.NAME",
    "A tracker: exactly one of `interface`, `script` or `file`. Followed through `track:` "
    "lists. keepalived's weight rules: weight 0 puts the followers in FAULT while the "
    "tracker fails; a positive weight is added while it passes, a negative one while it "
    "fails; the result stays within 1 to 254 (an owner's 255 never moves).",
    Key("interface", "interface", "Fails while this link is down (from netlink).", None,
        "up0", "an interface name too long"),
    Key("script", "argv", "Passes while the command exits 0, run every `interval` in its "
        "own process group (killed at `timeout`).", None, ["/bin/true"], ["true"]),
    Key("file", "absolute path", "The number in the file, times the weight, is added "
        "(keepalived's track_file; polled every `interval`). A missing or unreadable file "
        "is a failure.", None, "/run/vipd/weight", "weight"),
    Key("weight", "-254 to 254", "See above.", Derived("0; a file: 1"), -20, 255),
    Key("interval", DURATION, "Script and file: how often (100 ms to 1 h).", "1s", "2s",
        "50ms"),
    Key("timeout", DURATION, "Script: killed after this long, a failure.",
        Derived("the smaller of 2 s and `interval`"), "500ms", "forever"),
    Key("rise", "1 to 100", "Script: passes after this many passes in a row.", 1, 2, 0),
    Key("fall", "1 to 100", "Script: fails after this many failures in a row.", 1, 3, 0),
    Key("user", "user name", "Script: run as this user.", Derived("vipd's user"), "root",
        "no-such-user-here"),
)

_section(
    "ref", "track[]", "track entries",
    "Every `track:` list (top level, `groups.NAME`, `vlans[]`, `vlans[].instances[]`) holds "
    "tracker names or mappings. Weights may only sit where they cannot split what moves "
    "together: single-active only at the top level, a grouped VLAN only in its group, "
    "all-active nowhere.",
    Key("name", "name", "The tracker (see trackers).", REQUIRED, "t", "nosuch"),
    Key("weight", "-254 to 254", "Overrides the tracker's weight for these routers.",
        Derived("the tracker's weight"), -50, 300),
)

_section(
    "group", "groups.NAME", "groups.NAME",
    "per-vlan-active: a named group of VLANs that move together.",
    Key("vlans", "list of VLAN names", "Two or more VLANs, each in one group at most.",
        REQUIRED, ["a", "b"], ["a", "zz"]),
    Key("track", TRACK_LIST, "Trackers the group's routers follow; weights go here for "
        "grouped VLANs.", [], [{"name": "t", "weight": -30}], ["nosuch"]),
)

_section(
    "sync", "sync", "sync",
    "The sync link: connection tracking state to the peers (UDP, HMAC-SHA256), and the "
    "second channel (ALIVE messages: views, link loss, node death, split brain).",
    Key("interface", "interface", "The sync link's interface.", REQUIRED, "sync1",
        "an interface name too long"),
    Key("local", "address", "This node's address on it.", REQUIRED, "203.0.113.5",
        "203.0.113.500"),
    Key("peers", "list of addresses", "The other nodes' addresses on it.", REQUIRED,
        ["203.0.113.2", "203.0.113.3"], ["203.0.113.1"]),
    Key("port", "UDP port", "", 3780, 3790, 0),
    Key("key_file", "absolute path", "The shared key, 16 to 4096 bytes; refused if "
        "others can read or write the file.", REQUIRED, "/etc/vipd/other.key", "sync.key"),
    Key("node_id", "1 to 4294967295", "This node's id on the sync link.",
        Derived("the low 32 bits of `local`"), 7, 0),
    Key("alive_interval", DURATION, "ALIVE messages (1 ms to 10 s); a peer silent for "
        "three is gone.", "500ms", "100ms", "20s"),
    Key("protocols", "list", "Protocols whose connections are synced (tcp, udp, icmp, "
        f"{', '.join(PROTOCOLS)}).", list(DEFAULT_PROTOCOLS),
        ["tcp"], ["http"]),
    Key("ignore", "list of addresses or prefixes", "Connections from or to these are not "
        "synced (the sync link's own addresses never are).", [], ["192.0.2.0/28"],
        ["not-a-net"]),
    Key("zones", "list of 0 to 65535", "Only these conntrack zones.",
        Derived("every zone"), [0, 1], [70000]),
    Key("on_vlan_silent", "`takeover` or `hold`", "A backup whose master is silent on a "
        "VLAN but alive on the sync link: `takeover` (RFC 9568, with an alarm) or `hold` "
        "(stay backup, report the broken VLAN).", "takeover", "hold", "wait"),
)

_section(
    "cluster", "cluster", "cluster",
    "all-active: every member holds each VLAN's VIPs; a keyed hash of each connection (the "
    "same both ways) picks one of the buckets; each bucket is a VRRP virtual router on the "
    "election VLAN whose master handles it.",
    Key("members", "list of node names", "Every member's `node.name`, the same list on "
        f"each, this node included (2 to {MAX_MEMBERS}).", REQUIRED, ["r1", "r3"], ["r1"]),
    Key("buckets", f"2 to {MAX_BUCKETS}", "How many buckets the flows are hashed into.", 16, 8, 1),
    Key("vrid_base", "1 to 255", "The first bucket's VRID; the buckets take "
        "`vrid_base` to `vrid_base + buckets - 1`.", Derived("256 - buckets"), 100, 250),
    Key("advert_interval", DURATION, "The buckets' advert interval (10 ms to 40.95 s).",
        "1s", "100ms", "1ms"),
    Key("election_vlan", "VLAN name", "The VLAN whose interface carries the buckets' "
        "adverts.", Derived("the first VLAN"), "a", "zz"),
    Key("seed", "string or integer", "The flow hash key: the same on every member.",
        "vipd", "change me", True),
    Key("queue", "0 to 65535", "NFQUEUE number for each connection's first packet.", 7100,
        7200, 70000),
)

_section(
    "notify", "notify", "notify",
    "Commands run on transitions, one at a time in order, never delaying adverts or "
    "takeovers. Arguments: router name, state, priority; environment: VIPD_EVENT, "
    "VIPD_ROUTER, VIPD_VLAN, VIPD_INTERFACE, VIPD_VRID, VIPD_FAMILY, VIPD_STATE, "
    "VIPD_OLD_STATE, VIPD_PRIORITY, VIPD_CAUSE.",
    *(Key(ev, "argv", f"Run when a router {what}.", None, ["/bin/true"], ["true"])
      for ev, what in (("master", "becomes MASTER"), ("backup", "becomes BACKUP"),
                       ("fault", "enters FAULT"), ("stop", "stops (before a clean exit)"),
                       ("alarm", "reports two masters"))),
    Key("timeout", DURATION, "A command still running after this is killed with its "
        "process group.", "5s", "2s", "never"),
)

def _default(k: Key) -> str:
    if k.default is REQUIRED:
        return "required"
    if k.default is None:
        return "—"
    if isinstance(k.default, Derived):
        return k.default.text
    if k.name == "control_socket_mode" and isinstance(k.default, int):
        return f"`0{k.default:o}`"
    text = yaml.safe_dump(k.default, default_flow_style=True).strip()
    return f"`{text.removesuffix('...').strip()}`"


def _anchor(title: str) -> str:
    return "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c in "-_")


def render() -> str:
    out = ["# Configuration reference", "",
           "Generated from `vipd/config_schema.py`, the table the parser takes its keys "
           "from (`python -m vipd.config_schema > docs/config.md`; a test checks that this "
           "file is current). Commented examples: `configs/*.yaml`.", "",
           "## Value types", ""]
    out += [f"- **{t}**: {d}" for t, d in TYPES.items()]
    for s in SECTIONS.values():
        out += ["", f"## {s.title}", "", s.doc, "",
                "| key | type | default | modes | meaning |", "| --- | --- | --- | --- | --- |"]
        for k in s.keys:
            doc = k.doc
            if k.section:
                sub = SECTIONS[k.section].title
                doc = f"{doc} See [{sub}](#{_anchor(sub)})."
            modes = ", ".join(k.modes) if k.modes else "all"
            out.append(f"| `{k.name}` | {k.type} | {_default(k)} | {modes} | {doc} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
