"""Prometheus text exposition (format 0.0.4), derived from the one status model: what a
scrape reports is what `vipctl status --json` says, never a second bookkeeping. Pure.

Names follow the Prometheus conventions: `vipd_` prefix, `_total` for counters, base
units (seconds), one time series per router with labels router, vlan, interface, vrid and
family. The list is in docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

STATES = ("INIT", "BACKUP", "MASTER", "FAULT")
SEVERITY = {"ok": 0, "degraded": 1, "critical": 2}

# (status key, metric name, type, help): one per router
ROUTER_COUNTERS = (
    ("transitions", "vipd_router_transitions_total", "state changes"),
    ("became_master", "vipd_router_became_master_total", "transitions to MASTER"),
    ("adverts_sent", "vipd_router_adverts_sent_total", "advertisements sent"),
    ("adverts_received", "vipd_router_adverts_received_total",
     "valid advertisements received"),
    ("priority_zero_sent", "vipd_router_priority_zero_sent_total",
     "priority 0 advertisements sent (releases)"),
    ("priority_zero_received", "vipd_router_priority_zero_received_total",
     "priority 0 advertisements received"),
    ("io_failures", "vipd_router_io_failures_total", "send or VIP install failures"),
    ("dual_master_episodes", "vipd_router_dual_master_episodes_total",
     "episodes of two masters for this virtual router"),
    ("split_brain_seen", "vipd_router_split_brain_seen_total",
     "peer views over the sync link saying master too"),
    ("vips_repaired", "vipd_router_vips_repaired_total",
     "VIPs removed from outside and put back while master"),
)


def _escape(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, object]]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


class _Out:
    """The samples grouped by family, each after its HELP and TYPE: the format wants a
    family's lines together, and the per-router families are added router by router."""

    def __init__(self) -> None:
        self.families: dict[str, list[str]] = {}

    def metric(self, name: str, kind: str, help_: str, value: float,
               labels: Iterable[tuple[str, object]] = ()) -> None:
        lines = self.families.get(name)
        if lines is None:
            lines = self.families[name] = [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        v = int(value) if isinstance(value, bool) else value
        lines.append(f"{name}{_labels(labels)} {v}")

    def text(self) -> str:
        return "".join(line + "\n" for lines in self.families.values() for line in lines)


def exposition(status: dict[str, Any], loop_lag_s: float | None = None,
               version: str = "") -> str:
    out = _Out()
    out.metric("vipd_info", "gauge", "node, mode and version (always 1)", 1,
               [("node", status["node"]), ("mode", status["mode"]), ("version", version)])
    out.metric("vipd_healthy", "gauge", "1 when status has no problem", status["healthy"])
    out.metric("vipd_severity", "gauge", "0 ok, 1 degraded, 2 critical (two masters)",
               SEVERITY.get(status.get("severity", ""), 1))
    out.metric("vipd_problems", "gauge", "problems listed by vipctl status",
               len(status["problems"]))
    out.metric("vipd_uptime_seconds", "gauge", "seconds since the daemon started",
               status["uptime_s"])
    out.metric("vipd_reloads_total", "counter", "configuration reloads applied",
               status["reloads"])
    if loop_lag_s is not None:
        out.metric("vipd_loop_lag_seconds", "gauge",
                   "how late the event loop ran a 100 ms tick, the worst of the last minute",
                   round(loop_lag_s, 6))
    for i in status["instances"]:
        lab = [("router", i["name"]), ("vlan", i["vlan"]), ("interface", i["interface"]),
               ("vrid", i["vrid"]), ("family", i["family"])]
        for st in STATES:
            out.metric("vipd_router_state", "gauge", "1 for the router's current state",
                       i["state"] == st, [*lab, ("state", st)])
        out.metric("vipd_router_priority", "gauge", "configured priority", i["priority"], lab)
        out.metric("vipd_router_effective_priority", "gauge",
                   "priority advertised and compared (0 when drained)",
                   i["effective_priority"], lab)
        out.metric("vipd_router_dual_master", "gauge", "1 while two masters are seen",
                   i["dual_master"], lab)
        out.metric("vipd_router_vips_in_kernel", "gauge",
                   "VIPs of the router the kernel holds on this node",
                   len(i["vips_in_kernel"] or ()), lab)
        for key, name, help_ in ROUTER_COUNTERS:
            out.metric(name, "counter", help_, i.get(key, 0), lab)
        for reason, n in sorted(i["drops"].items()):
            out.metric("vipd_router_drops_total", "counter",
                       "advertisements dropped, by reason", n, [*lab, ("reason", reason)])
    for f in status["interfaces"]:
        out.metric("vipd_interface_up", "gauge", "carrier and admin state", f["up"],
                   [("interface", f["name"])])
        for fam, drops in f["drops"].items():
            for reason, n in sorted(drops.items()):
                out.metric("vipd_interface_drops_total", "counter",
                           "packets dropped before a VRID matched, by reason", n,
                           [("interface", f["name"]), ("family", fam), ("reason", reason)])
    tr = status.get("tracking") or {}
    for t in tr.get("trackers", ()):
        lab = [("tracker", t["name"]), ("kind", t["kind"])]
        if t["ok"] is not None:
            out.metric("vipd_tracker_ok", "gauge", "1 while the tracker passes (interface "
                       "up, script passing, file readable)", t["ok"], lab)
        if t["value"] is not None:
            out.metric("vipd_tracker_value", "gauge", "the number in a tracked file",
                       t["value"], lab)
        if "failures" in t:
            out.metric("vipd_tracker_failures_total", "counter",
                       "failed script runs or unreadable file reads", t["failures"], lab)
    for target, n in sorted(tr.get("demotions", {}).items()):
        out.metric("vipd_demotion", "gauge", "demotion counter (vipctl demote)", n,
                   [("target", target)])
    sync = status.get("sync")
    if sync:
        out.metric("vipd_sync_ready", "gauge", "1 once the bulk sync from the peers is done",
                   sync["ready"])
        out.metric("vipd_sync_flows", "gauge", "connections in the sync caches",
                   sync["internal_flows"], [("origin", "local")])
        out.metric("vipd_sync_flows", "gauge", "connections in the sync caches",
                   sync["external_flows"], [("origin", "peers")])
        out.metric("vipd_sync_peers", "gauge", "sync peers configured", sync["peers"])
        out.metric("vipd_sync_peers_reachable", "gauge", "sync peers heard recently",
                   sync["peers_reachable"])
    cl = status.get("cluster")
    if cl:
        out.metric("vipd_cluster_buckets_owned", "gauge", "all-active buckets this node owns",
                   len(cl["owned"]))
        if cl.get("accepted_packets") is not None:
            out.metric("vipd_cluster_accepted_packets_total", "counter",
                       "packets this node took for its buckets", cl["accepted_packets"])
        for b in cl["table"]:
            lab = [("bucket", b["bucket"])]
            out.metric("vipd_cluster_bucket_owned", "gauge", "1 when this node owns the bucket",
                       b["owner"] == "self" and b["in_kernel"], lab)
            if b["packets"] is not None:
                out.metric("vipd_cluster_bucket_packets_total", "counter",
                           "packets of the bucket reaching this node", b["packets"], lab)
    return out.text()
