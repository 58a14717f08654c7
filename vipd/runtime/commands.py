"""The control commands (status, maintenance, reload, ping) and the status snapshot: the
node core's routers, the kernel's view of their VIPs (vipd.runtime.links) and whether a
change is under way (vipd.runtime.executor), built into the one status model
(vipd.status)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vipd.config import ConfigError
from vipd.core.node import Key, Slot
from vipd.core.packet import IPAddress
from vipd.core.router import State
from vipd.status import RouterView, snapshot, static_row

if TYPE_CHECKING:
    from vipd.runtime.daemon import Daemon

STATUS_REUSE_S = 0.02


def error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


class Commands:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        # the last status reply of each form (instances as objects, as a table)
        self._cache: dict[bool, tuple[float, dict[str, Any]]] = {}
        self._static: dict[Key, tuple[Slot, tuple[Any, ...], tuple[str, ...],
                                      tuple[IPAddress, ...]]] = {}

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("command")
        if cmd == "status":
            return self.shared_status(req.get("instances") == "table")
        if cmd == "maintenance":
            on = req.get("on")
            if not isinstance(on, bool):
                return error("bad_request", "maintenance needs \"on\": true or false")
            self.d.set_maintenance(on)
            return {"ok": True, "maintenance": on}
        if cmd == "reload":
            try:
                return {"ok": True, "reload": await self.d.reload()}
            except ConfigError as exc:
                return error("bad_config", "; ".join(exc.errors))
        if cmd == "demote":
            target, change = req.get("target"), req.get("change")
            if not isinstance(target, str) or not isinstance(change, str):
                return error("bad_request", "demote needs \"target\" and \"change\" "
                             "(+N, -N or 0)")
            try:
                count = self.d.demote(target, change)
            except ValueError as exc:
                return error("bad_request", str(exc))
            return {"ok": True, "demote": {"target": target, "count": count}}
        if cmd == "sync":
            if self.d.sync is None:
                return error("no_sync", "sync is not configured (no sync: section)")
            return {"ok": True, "sync": self.d.sync.status()}
        if cmd == "ping":
            return {"ok": True, "node": self.d.cfg.node.name}
        return error("unknown_command", f"unknown command {cmd!r}")

    def shared_status(self, table: bool = False) -> dict[str, Any]:
        """One snapshot serves every status request of a short window: a storm of clients
        costs one build per window, not one per client (the adverts keep their time).
        `table`: the instances as a table (see vipd.status.snapshot)."""
        now = self.d._loop.time()
        got = self._cache.get(table)
        if got is None or now - got[0] > STATUS_REUSE_S:
            got = self._cache[table] = (now, {"ok": True, "status": self.status(table)})
        return got[1]

    def status(self, table: bool = False) -> dict[str, Any]:
        d = self.d
        now = d.now()
        views = [self._router_view(s) for s in d.node.slots.values()]
        ifaces = []
        for i in d.links.ifaces.values():
            link = d.node.links.get(i.name)
            ifaces.append({
                "name": i.name, "index": i.index, "up": i.up, "mac": i.mac,
                "primary": {f"IPv{f}": str(a) if a else None
                            for f, a in (link.primary.items() if link else ())},
                "drops": {f"IPv{f}": {k.value: n for k, n in c.items() if n}
                          for f, c in (link.drops.items() if link else ())}})
        node_problems = [f"{name} is down ({why}); restarting"
                         for name, why in sorted(d.tasks_down.items())]
        if d.sync is not None:
            node_problems += d.sync.problems()
        trackers = d.tracks.status()
        for t in trackers:
            if t["ok"] is False and t["followers"]:
                node_problems.append(f"track {t['name']} ({t['kind']} {t['target']}) is "
                                     f"failing" + (f": {t['last']}" if t.get("last") else ""))
        snap = snapshot(d.cfg.node.name, d.cfg.mode.value, views, ifaces, now,
                        float(now - d._started), d.reloads, node_problems, d.stopping,
                        table)
        snap["accept_mode_enforced"] = d.accept_mode_enforced
        snap["tracking"] = {"trackers": trackers, "demotions": dict(d.node.demotions),
                            "groups": {g.name: list(g.vlans) for g in d.cfg.groups}}
        snap["task_restarts"] = dict(d.task_restarts)
        if d._control is not None:
            snap["control"] = dict(d._control.stats)
        if d.notifier.enabled:
            snap["notify"] = dict(d.notifier.stats)
        if d.cfg.cluster is not None:
            snap["cluster"] = self._cluster(d)
        if d.sync is not None:
            ss = d.sync.session
            snap["sync"] = {"ready": d.sync.ready_latched,
                            "internal_flows": len(ss.internal),
                            "external_flows": ss.external_count(),
                            "peers_reachable": sum(ss.reachable(p, now)
                                                   for p in ss.peers.values()),
                            "peers": len(ss.peers)}
        return snap

    @staticmethod
    def _cluster(d: Any) -> dict[str, Any]:
        """all-active: members, which member owns each bucket (this node, or the master's
        address as heard), and packets per bucket (frames to the cluster MACs reaching
        this member, from the kernel's counters, read once a second)."""
        cl = d.cfg.cluster
        counts = d.cluster_counters
        table = []
        for slot in d.node.slots.values():
            b = slot.spec.bucket
            if b is None:
                continue
            r = slot.router
            mine = r.state.value == "MASTER"
            table.append({"bucket": b, "state": r.state.value,
                          "owner": "self" if mine else (str(r.master_address)
                                                        if r.master_address else None),
                          "in_kernel": b in d.executor.owned,
                          "waiting_for_release": slot.awaiting_release,
                          "packets": counts.get(str(b))})
        table.sort(key=lambda x: x["bucket"])
        return {"members": list(cl.members), "buckets": cl.buckets,
                "owned": sorted(d.executor.owned),
                "accepted_packets": counts.get("accepted"),
                "classified_connections": getattr(d.cluster, "classified", None),
                "release_waits": d.node.release_waits,
                "release_timeouts": d.node.release_timeouts,
                "vlans": [{"name": v.name, "interface": v.interface,
                           "multicast_mac": v.multicast_mac,
                           "vips": [str(x) for x in v.vips]} for v in d.cfg.vlans],
                "table": table}

    def _static_of(self, slot: Slot) -> tuple[tuple[Any, ...], tuple[str, ...],
                                              tuple[IPAddress, ...]]:
        """The configuration's part of a router's status, its VIPs as text and their
        addresses: built once per router."""
        got = self._static.get(slot.key)
        if got is None or got[0] is not slot:
            spec = slot.spec
            vips = tuple(str(v) for v in spec.vips)
            got = self._static[slot.key] = (slot, static_row(RouterView(
                spec.vlan, spec.interface, slot.router, vips, slot.drops,
                unicast_peers=tuple(str(a) for a in spec.peers))), vips,
                tuple(v.ip for v in spec.vips))
        return got[1], got[2], got[3]

    def _router_view(self, slot: Slot) -> RouterView:
        static, vips, ips = self._static_of(slot)
        index = self.d.links.vip_index(slot.key)
        held = self.d.links.kernel_addrs.get(index) if index is not None else None
        return RouterView(
            slot.spec.vlan, slot.spec.interface, slot.router, vips, slot.drops,
            kernel_vips=None if held is None else tuple(
                text for ip, text in zip(ips, vips, strict=True) if ip in held),
            static=static,
            vips_settling=self.d.executor.settling(slot.key) or slot.installing,
            vips_repaired=slot.vips_repaired,
            split_brain_with=self.d.node.peer_master_with_link(slot)
            if slot.router.state is State.MASTER else None,
            group=slot.group,
            contributions=slot.effective.contributions if slot.effective else ())
