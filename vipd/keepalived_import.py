"""`vipctl import-keepalived keepalived.conf`: keepalived's VRRP configuration as a vipd
configuration, with a list of what could not be converted. Pure: text in, a YAML-ready
mapping and notes out.

Converted: global_defs (router_id, vrrp_version, vrrp_strict), vrrp_instance (interface,
virtual_router_id, priority, advert_int, version, nopreempt, preempt_delay,
virtual_ipaddress, unicast_peer, use_vmac, accept/no_accept, track_interface, track_script,
track_file, notify_*), vrrp_script, vrrp_track_file and vrrp_sync_group (one group of
every instance: single-active; otherwise per-vlan-active with named groups). Everything
else (virtual_server, authentication, process tracking, garp tuning, ...) is listed.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Block:
    """One keepalived statement: its words, and the statements of its { } block."""

    words: list[str]
    line: int
    children: list[Block] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.words[0] if self.words else ""

    def find(self, key: str) -> Block | None:
        return next((c for c in self.children if c.key == key), None)

    def value(self, key: str) -> str | None:
        b = self.find(key)
        return b.words[1] if b is not None and len(b.words) > 1 else None


def _tokens(text: str) -> Iterator[tuple[str, int]]:
    for n, raw in enumerate(text.splitlines(), 1):
        line = re.split(r"(?<![\S])[#!]", raw, maxsplit=1)[0]
        try:
            words = shlex.split(line.replace("{", " { ").replace("}", " } "), comments=False)
        except ValueError:
            words = line.replace("{", " { ").replace("}", " } ").split()
        for w in words:
            yield w, n
        yield "\n", n


def parse(text: str) -> list[Block]:
    """keepalived's syntax: statements end at the line's end; `{ ... }` opens a block."""
    root = Block([], 0)
    stack = [root]
    current: Block | None = None
    for tok, n in _tokens(text):
        if tok == "\n":
            current = None
        elif tok == "{":
            if current is None:  # a block opened on its own line belongs to the last one
                current = stack[-1].children[-1] if stack[-1].children else Block(["?"], n)
            stack.append(current)
            current = None
        elif tok == "}":
            if len(stack) > 1:
                stack.pop()
            current = None
        elif current is None:
            current = Block([tok], n)
            stack[-1].children.append(current)
        else:
            current.words.append(tok)
    return root.children


def _seconds_ms(v: str) -> str:
    return f"{round(float(v) * 1000)}ms"


def _argv(cmd: str) -> list[str]:
    words = shlex.split(cmd)
    if words and words[0].startswith("/"):
        return words
    return ["/bin/sh", "-c", cmd]  # vipd wants an absolute program: keepalived's PATH lookup


def _vip(words: list[str], note: Any) -> str | None:
    try:
        iface = ipaddress.ip_interface(words[0])
    except ValueError:
        note(f"virtual_ipaddress {' '.join(words)}: not an address")
        return None
    if "/" not in words[0]:
        iface = ipaddress.ip_interface(f"{iface.ip}/{32 if iface.version == 4 else 128}")
    return str(iface)


INSTANCE_KEYS_DONE = {"state", "interface", "virtual_router_id", "priority", "advert_int",
                      "version", "nopreempt", "preempt", "preempt_delay", "virtual_ipaddress",
                      "unicast_peer", "unicast_src_ip", "use_vmac", "accept", "no_accept",
                      "track_interface", "track_script", "track_file", "notify_master",
                      "notify_backup", "notify_fault", "notify_stop", "notify"}


def convert(text: str, node_name: str = "") -> tuple[dict[str, Any], list[str]]:
    """(the vipd configuration, what was not converted or changes meaning)."""
    notes: list[str] = []
    blocks = parse(text)
    gd = next((b for b in blocks if b.key == "global_defs"), Block([], 0))
    version = int(gd.value("vrrp_version") or 2)
    strict = gd.find("vrrp_strict") is not None
    name = node_name or gd.value("router_id") or "vipd"
    trackers: dict[str, dict[str, Any]] = {}
    notify: dict[str, list[str]] = {}
    instances: dict[str, tuple[str, dict[str, Any]]] = {}  # name -> (interface, instance)
    groups: list[tuple[str, list[str], list[Any]]] = []
    for b in blocks:
        kind = b.key
        if kind == "vrrp_script" and len(b.words) > 1:
            t: dict[str, Any] = {}
            script = b.find("script")
            if script is None or len(script.words) < 2:
                notes.append(f"line {b.line}: vrrp_script {b.words[1]} has no script")
                continue
            t["script"] = _argv(" ".join(script.words[1:]))
            for k, conv in (("interval", _seconds_ms), ("timeout", _seconds_ms),
                            ("weight", int), ("rise", int), ("fall", int)):
                v = b.value(k)
                if v is not None:
                    t[k] = conv(v)
            user = b.value("user")
            if user:
                t["user"] = user
            for c in b.children:
                if c.key not in ("script", "interval", "timeout", "weight", "rise", "fall",
                                 "user"):
                    notes.append(f"line {c.line}: vrrp_script {b.words[1]}: {c.key} "
                                 "not converted")
            trackers[b.words[1]] = t
        elif kind == "vrrp_track_file" and len(b.words) > 1:
            path = b.value("file")
            if path:
                trackers[b.words[1]] = {"file": path, "weight": int(b.value("weight") or 1)}
        elif kind == "vrrp_sync_group" and len(b.words) > 1:
            g = b.find("group")
            members = [c.key for c in g.children] if g is not None else []
            groups.append((b.words[1], members, b.children))
        elif kind == "vrrp_instance" and len(b.words) > 1:
            got = _instance(b, version, strict, trackers, notify, notes)
            if got is not None:
                instances[b.words[1]] = got
        elif kind == "global_defs":
            for c in b.children:
                if c.key not in ("router_id", "vrrp_version", "vrrp_strict"):
                    notes.append(f"line {c.line}: global_defs {c.key}: not converted")
        elif kind:
            notes.append(f"line {b.line}: {kind} {' '.join(b.words[1:2])}: not converted "
                         "(vipd does VRRP, not virtual servers or checkers)")
    # VLANs: one per interface, its instances in keepalived's order
    vlans: dict[str, dict[str, Any]] = {}
    for ifname, inst in instances.values():
        vlans.setdefault(ifname, {"name": ifname, "interface": ifname, "instances": []})
        vlans[ifname]["instances"].append(inst)
    cfg: dict[str, Any] = {"node": {"name": name}, "mode": "per-vlan-active"}
    if trackers:
        cfg["trackers"] = trackers
    every = set(instances)
    if len(groups) == 1 and set(groups[0][1]) >= every and every:
        cfg["mode"] = "single-active"
        notes.append(f"vrrp_sync_group {groups[0][0]} holds every instance: mode "
                     "single-active (every VLAN moves together)")
        track = _group_track(groups[0][2], trackers, notify, notes)
        if track:
            cfg["track"] = track
    elif groups:
        out: dict[str, Any] = {}
        taken: dict[str, str] = {}
        for gname, members, children in groups:
            ifaces: list[str] = []
            for m in members:
                if m not in instances:
                    notes.append(f"vrrp_sync_group {gname}: {m} is not an instance")
                    continue
                ifname = instances[m][0]
                if ifname in taken and taken[ifname] != gname:
                    notes.append(f"vrrp_sync_group {gname}: {m} is on {ifname}, already in "
                                 f"group {taken[ifname]}: left there")
                    continue
                if ifname not in ifaces:
                    ifaces.append(ifname)
                    taken[ifname] = gname
            others = [n for n, (i, _) in instances.items() if i in ifaces and n not in members]
            if others:
                notes.append(f"vrrp_sync_group {gname}: {', '.join(others)} share its "
                             "interfaces and move with it (vipd groups VLANs)")
            if len(ifaces) < 2:
                notes.append(f"vrrp_sync_group {gname}: " + (
                    "its instances are on one interface; vipd groups VLANs, so it is not a "
                    "group here" if ifaces else "nothing of it is left"))
                continue
            body: dict[str, Any] = {"vlans": ifaces}
            track = _group_track(children, trackers, notify, notes)
            if track:
                body["track"] = track
            out[gname] = body
        if out:
            cfg["groups"] = out
    _lift_weights(cfg, vlans, trackers, notes)
    if notify:
        cfg["notify"] = notify
        notes.append("notify: vipd runs one command per event for every router, with the "
                     "router's name, state and priority appended (keepalived: per instance, "
                     "no arguments for notify_master and the like)")
    cfg["vlans"] = list(vlans.values())
    if not instances:
        notes.append("no vrrp_instance found")
    return cfg, notes


def _lift_weights(cfg: dict[str, Any], vlans: dict[str, dict[str, Any]],
                  trackers: dict[str, dict[str, Any]], notes: list[str]) -> None:
    """vipd keeps weights where they cannot split what moves together: a weighted track of
    an instance in single-active goes to the node's list, of a grouped VLAN to its group."""
    group_of = {v: g for g, body in cfg.get("groups", {}).items() for v in body["vlans"]}
    for ifname, vlan in vlans.items():
        if cfg["mode"] == "single-active":
            dest, what = cfg.setdefault("track", []), "the node's track list (single-active)"
        elif ifname in group_of:
            g = group_of[ifname]
            dest, what = cfg["groups"][g].setdefault("track", []), f"group {g}"
        else:
            continue
        for inst in vlan["instances"]:
            kept = []
            for ref in inst.get("track", []):
                name = ref if isinstance(ref, str) else ref["name"]
                t = trackers.get(name, {})
                weight = ref.get("weight") if isinstance(ref, dict) else None
                if weight is None:
                    weight = t.get("weight", 1 if "file" in t else 0)
                if weight:
                    if ref not in dest:
                        dest.append(ref)
                    notes.append(f"{ifname}/vrid {inst['vrid']}: weighted track {name} moved "
                                 f"to {what}")
                else:
                    kept.append(ref)
            if kept:
                inst["track"] = kept
            else:
                inst.pop("track", None)
    for holder in (cfg, *cfg.get("groups", {}).values()):
        if holder.get("track") == []:
            del holder["track"]


def _track_refs(block: Block | None, kind: str, trackers: dict[str, dict[str, Any]],
                notes: list[str]) -> list[Any]:
    """track_interface / track_script / track_file { NAME [weight N] } as vipd references
    (interfaces become trackers named if-NAME)."""
    if block is None:
        return []
    refs: list[Any] = []
    for c in block.children:
        tname = c.key
        weight = None
        if "weight" in c.words:
            i = c.words.index("weight")
            try:
                weight = int(c.words[i + 1])
            except (IndexError, ValueError):
                notes.append(f"line {c.line}: {kind} {tname}: bad weight")
        if kind == "track_interface":
            tname = f"if-{c.key}"
            trackers.setdefault(tname, {"interface": c.key})
        elif tname not in trackers:
            notes.append(f"line {c.line}: {kind} {tname}: no such vrrp_script/vrrp_track_file")
            continue
        refs.append(tname if weight is None else {"name": tname, "weight": weight})
    return refs


def _notify(b: Block, notify: dict[str, list[str]], notes: list[str], where: str) -> None:
    for key, event in (("notify_master", "master"), ("notify_backup", "backup"),
                       ("notify_fault", "fault"), ("notify_stop", "stop")):
        c = b.find(key)
        if c is None:
            continue
        argv = _argv(" ".join(c.words[1:]))
        if event in notify and notify[event] != argv:
            notes.append(f"line {c.line}: {where} {key}: vipd has one {event} command; "
                         f"kept {' '.join(notify[event])}")
            continue
        notify[event] = argv
    if b.find("notify") is not None:
        notes.append(f"{where} notify: not converted (use vipctl events for every "
                     "transition as JSON lines)")


def _group_track(children: list[Block], trackers: dict[str, dict[str, Any]],
                 notify: dict[str, list[str]], notes: list[str]) -> list[Any]:
    holder = Block(["group"], 0, children)
    _notify(holder, notify, notes, "vrrp_sync_group")
    return _all_track_refs(holder, trackers, notes)


def _all_track_refs(b: Block, trackers: dict[str, dict[str, Any]],
                    notes: list[str]) -> list[Any]:
    """Every track_interface, track_script and track_file of a block, as references."""
    refs: list[Any] = []
    for kind in ("track_interface", "track_script", "track_file"):
        refs += _track_refs(b.find(kind), kind, trackers, notes)
    return refs


def _instance(b: Block, version: int, strict: bool, trackers: dict[str, dict[str, Any]],
              notify: dict[str, list[str]], notes: list[str]
              ) -> tuple[str, dict[str, Any]] | None:
    where = f"vrrp_instance {b.words[1]}"
    ifname, vrid = b.value("interface"), b.value("virtual_router_id")
    if not ifname or not vrid:
        notes.append(f"line {b.line}: {where}: no interface or virtual_router_id: skipped")
        return None
    inst: dict[str, Any] = {"vrid": int(vrid), "priority": int(b.value("priority") or 100)}
    v = int(b.value("version") or version)
    adv = float(b.value("advert_int") or 1)
    if v == 2 and adv != int(adv):
        notes.append(f"{where}: advert_int {adv:g} needs VRRPv3: version 3")
        v = 3
    inst["version"] = v
    inst["advert_interval"] = _seconds_ms(str(adv))
    if b.find("nopreempt") is not None:
        inst["preempt"] = False
    if b.value("preempt_delay"):
        inst["preempt_delay"] = _seconds_ms(b.value("preempt_delay") or "0")
    vips: list[str] = []

    def note(msg: str) -> None:
        notes.append(f"{where}: {msg}")

    for key in ("virtual_ipaddress", "virtual_ipaddress_excluded"):
        blk = b.find(key)
        for c in blk.children if blk is not None else []:
            vip = _vip(c.words, note)
            if vip is None:
                continue
            if "dev" in c.words and c.words[c.words.index("dev") + 1:][:1] != [ifname]:
                note(f"{vip} is on another device in keepalived; vipd puts it on {ifname}")
            if "label" in c.words:
                note(f"{vip}: label not converted")
            if vip in vips:
                note(f"{vip} listed twice: kept once")
                continue
            vips.append(vip)
    if not vips:
        notes.append(f"line {b.line}: {where}: no virtual_ipaddress: skipped")
        return None
    inst["vips"] = vips
    if any(ipaddress.ip_interface(x).version == 6 for x in vips):
        inst["advertise_link_local"] = False  # as keepalived lists only the VIPs
    peers = b.find("unicast_peer")
    if peers is not None:
        inst["unicast_peers"] = [c.key for c in peers.children]
    if b.find("use_vmac") is not None:
        inst["virtual_mac"] = True
    if b.find("no_accept") is not None or (strict and b.find("accept") is None):
        inst["accept_mode"] = False
    else:  # keepalived answers for its VIPs unless vrrp_strict
        inst["accept_mode"] = True
    track = _all_track_refs(b, trackers, notes)
    if track:
        inst["track"] = track
    _notify(b, notify, notes, where)
    if b.value("state") == "MASTER":
        note("state MASTER: vipd elects by priority (keepalived does too, after startup)")
    for c in b.children:
        if c.key not in INSTANCE_KEYS_DONE and c.key not in ("virtual_ipaddress_excluded",):
            notes.append(f"line {c.line}: {where}: {c.key} not converted")
    return ifname, inst
