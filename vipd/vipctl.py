"""vipctl: the operator's command. Talks to vipd over its control socket.

    vipctl [-s SOCKET] status [--json]     exit 0 healthy, 1 degraded, 2 daemon unreachable
    vipctl [-s SOCKET] maintenance on|off  drain this node / bring it back
    vipctl [-s SOCKET] reload              re-read the configuration (like SIGHUP)
    vipctl [-s SOCKET] demote TARGET +N|-N|0
                                           lower the priority of every router (TARGET
                                           node) or of a group's, by a counter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from vipd.defaults import DEFAULT_CONTROL_SOCKET
from vipd.io.control_client import STATUS_REQUEST, expand_status, request

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs vipctl 3 ms
if TYPE_CHECKING:
    from typing import Any, NoReturn

# the monitoring-plugin convention (Nagios, Icinga): OK, WARNING, CRITICAL, UNKNOWN
EXIT_OK, EXIT_DEGRADED, EXIT_CRITICAL, EXIT_UNKNOWN = 0, 1, 2, 3
EXIT_UNREACHABLE = EXIT_CRITICAL
BUSY_RETRIES = 5


_MS_TEXT: dict[float | None, str] = {None: "-"}  # intervals repeat across routers


def _ms(v: float | None) -> str:
    text = _MS_TEXT.get(v)
    if text is None:
        text = _MS_TEXT[v] = f"{v:.3f}".rstrip("0").rstrip(".") + " ms"
    return text


def _ago(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f} ms ago" if v < 10 else f"{v:.1f} s ago"


def render(status: dict[str, Any]) -> str:
    """The text view of the status model (same data as --json)."""
    level = {"ok": "healthy", "degraded": "DEGRADED", "critical": "CRITICAL"}.get(
        status.get("severity", ""), "healthy" if status["healthy"] else "DEGRADED")
    lines = [f"node {status['node']}  mode {status['mode']}  "
             f"{level}  up {status['uptime_s']:.0f} s"]
    for p in status["problems"]:
        lines.append(f"  ! {p}")
    cl = status.get("cluster")
    if cl:
        lines.append("")
        lines.append(f"all-active: members {', '.join(cl['members'])}; this node owns "
                     f"{len(cl['owned'])} of {cl['buckets']} buckets, "
                     f"{cl['accepted_packets'] or 0} packets taken")
        for v in cl["vlans"]:
            lines.append(f"  {v['name']} / {v['interface']}: {', '.join(v['vips'])} "
                         f"answered with {v['multicast_mac']}")
        lines.append(f"  {'bucket':>6} {'state':<7} {'owner':<22} {'packets':>10}")
        for b in cl["table"]:
            owner = (b["owner"] or "-") + (" (waiting)" if b["waiting_for_release"] else "")
            pk = "-" if b["packets"] is None else str(b["packets"])
            lines.append(f"  {b['bucket']:>6} {b['state']:<7} {owner:<22} {pk:>10}")
    for i in status["instances"]:
        lt = i["last_transition"]
        if i["master_is_self"]:
            master = f"{i['master']} (this node)"
        elif i["master"]:
            master = (f"{i['master']} prio {i['master_priority']}, heard "
                      f"{_ago(i['master_heard_ago_s'])}")
        else:
            master = "-"
        rows = [
            ("VLAN / interface", f"{i['vlan']} / {i['interface']}"),
            ("VRID / family", f"{i['vrid']} / {i['family']} (VRRPv{i['version']})"),
            ("state", i["state"] + "".join(f"  [{d}]" for d in i["drains"])),
            ("priority", f"{i['priority']} configured, {i['effective_priority']} effective"
             + "".join(f"; {c['source']} " + ("FAULT" if c["fault"] else f"{c['delta']:+d}")
                       for c in i.get("priority_contributions", ()))),
            ("master", master),
            ("advert interval", f"{_ms(i['advert_interval_ms'])} sent, "
                                f"{_ms(i['master_adver_interval_ms'])} learned"),
            ("master down", f"{_ms(i['master_down_interval_ms'])} "
                            f"(skew {_ms(i['skew_time_ms'])})"),
            ("VIPs", ", ".join(i["vips"])),
            ("VIPs in kernel", "-" if i["vips_in_kernel"] is None else
             (", ".join(i["vips_in_kernel"]) or "none")
             + (f"  ({i['vips_repaired']} put back)" if i["vips_repaired"] else "")),
            ("last transition", "-" if lt is None else
             f"{lt['from']} -> {lt['to']} ({lt['cause']}), {_ago(lt['ago_s'])}"),
            ("adverts", f"{i['adverts_sent']} sent, {i['adverts_received']} received"),
            ("drops", ", ".join(f"{k} {n}" for k, n in i["drops"].items()) or "none"),
        ]
        if i.get("group") and i["group"] != "node":
            rows.insert(1, ("group", i["group"]))
        if i.get("unicast_peers"):
            rows.insert(2, ("unicast peers", ", ".join(i["unicast_peers"])))
        if i["notes"]:
            rows.append(("accepted, noted", ", ".join(f"{k} {n}" for k, n in i["notes"].items())))
        for peer in i["peers"]:
            rows.append((f"peer {peer['address']}",
                         f"prio {peer['priority']}, v{peer['version']}, checksum "
                         f"{peer['checksum']}, {peer['adverts']} adverts, last "
                         f"{_ago(peer['last_heard_ago_s'])}"))
            differ = peer["addresses_differ"]
            if differ:
                rows.append(("  addresses differ",
                             f"missing there: {', '.join(differ['missing_there']) or '-'}; "
                             f"extra there: {', '.join(differ['extra_there']) or '-'} "
                             f"(address_check {i['address_check']})"))
        if i["dual_master"]:
            rows.append(("WARNING", "two masters heard recently"))
        lines.append("")
        lines.append(f"{i['name']}")
        lines += [f"  {k:<18} {v}" for k, v in rows]
    tr = status.get("tracking") or {}
    if tr.get("trackers") or tr.get("demotions"):
        lines.append("")
        lines.append("tracking")
        for t in tr.get("trackers", ()):
            state = {True: "ok", False: "FAILING", None: "unknown"}[t["ok"]]
            if t["kind"] == "file" and t["value"] is not None:
                state += f", value {t['value']}"
            weight = f"weight {t['weight']:+d}" if t["weight"] else "FAULT when failing"
            extra = f", last {t['last']}" if t.get("last") else ""
            lines.append(f"  {t['name']:<16} {t['kind']} {t['target']}: {state} ({weight}, "
                         f"{t['followers']} routers{extra})")
        for target, n in sorted(tr.get("demotions", {}).items()):
            lines.append(f"  demoted {target} by {n}")
    iface_drops = [(f["name"], fam, d) for f in status["interfaces"]
                   for fam, d in f["drops"].items() if d]
    if iface_drops:
        lines.append("")
        lines.append("interface drops (before a VRID matched)")
        for name, fam, d in iface_drops:
            lines.append(f"  {name} {fam}: " + ", ".join(f"{k} {n}" for k, n in d.items()))
    return "\n".join(lines)


def render_summary(status: dict[str, Any]) -> str:
    """One line per virtual router, like a router's `show vrrp summary`."""
    level = {"ok": "healthy", "degraded": "DEGRADED", "critical": "CRITICAL"}.get(
        status.get("severity", ""), "?")
    lines = [f"node {status['node']}  mode {status['mode']}  {level}",
             f"{'interface':<12} {'vrid':>4} {'fam':<4} {'state':<7} {'prio':>8} "
             f"{'master':<26} vips (in kernel)"]
    for i in status["instances"]:
        prio = (str(i["priority"]) if i["effective_priority"] == i["priority"]
                else f"{i['priority']}>{i['effective_priority']}")
        master = "self" if i["master_is_self"] else (i["master"] or "-")
        kernel = i["vips_in_kernel"]
        vips = ", ".join(i["vips"])
        held = "-" if kernel is None else f"{len(kernel)}/{len(i['vips'])}"
        flags = "".join(f" [{d}]" for d in i["drains"])
        lines.append(f"{i['interface']:<12} {i['vrid']:>4} {i['family'][2:]:<4} "
                     f"{i['state']:<7} {prio:>8} {master:<26} {vips} ({held}){flags}")
    lines += [f"! {p}" for p in status["problems"]]
    return "\n".join(lines)


def watch(args: argparse.Namespace, every_s: float) -> int:
    """Redraw the status every `every_s` seconds until Ctrl-C (exit: the last level)."""
    code = EXIT_OK
    try:
        while True:
            reply = _ask(args.socket, STATUS_REQUEST)
            if reply is None:
                code = EXIT_UNREACHABLE
                text = f"vipctl: cannot reach vipd at {args.socket}"
            else:
                st = reply["status"]
                text = render_summary(st) if args.summary else render(st)
                code = _status_code(st)
            sys.stdout.write("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S ") + text + "\n")
            sys.stdout.flush()
            time.sleep(every_s)
    except KeyboardInterrupt:
        return code


def _status_code(status: dict[str, Any]) -> int:
    if status.get("severity") == "critical":
        return EXIT_CRITICAL
    return EXIT_OK if status["healthy"] else EXIT_DEGRADED


def _ask(path: str, req: dict[str, Any]) -> dict[str, Any] | None:
    """One request, retried while the daemon is busy; None when it cannot be reached."""
    reply: dict[str, Any] = {}
    for attempt in range(BUSY_RETRIES + 1):
        try:
            reply = request(path, req)
        except ConnectionResetError:
            reply = {"ok": False, "error": {"code": "busy", "message": "connection reset"}}
        except (OSError, ValueError):
            return None
        if reply.get("error", {}).get("code") != "busy" or attempt == BUSY_RETRIES:
            break
        time.sleep(0.05 * (attempt + 1))  # every connection was mid-request: try again
    return expand_status(reply)


def in_words(cmd: str, reply: dict[str, Any]) -> str:
    """maintenance and reload, answered in words (--json for the reply itself)."""
    if cmd == "maintenance":
        return ("maintenance on: every master of this node hands over; no takeover until "
                "`vipctl maintenance off`" if reply["maintenance"] else
                "maintenance off: this node is back in every election")
    r = reply.get("reload", {})
    if "kept" not in r:
        return "reload: nothing to do (vipd runs without a configuration file)"
    return (f"reloaded: {r['kept']} virtual routers kept as they were, "
            f"{r['replaced_or_removed']} replaced or removed, {r['started']} started")


def import_keepalived(path: str, name: str, out: str | None) -> int:
    """Convert a keepalived.conf: the vipd YAML (to `out` or stdout), what was not
    converted on stderr; exit 0 when vipd accepts the result, 1 when it does not (its
    errors listed: complete the file by hand), 3 when the file cannot be read."""
    import yaml

    from vipd.config import ConfigError, loads
    from vipd.keepalived_import import convert

    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 20)
    except OSError as exc:
        print(f"vipctl: {path}: {exc.strerror}", file=sys.stderr)
        return EXIT_UNKNOWN
    cfg, notes = convert(text, name)
    body = (f"# converted from {path} by vipctl import-keepalived\n"
            + "".join(f"# note: {n}\n" for n in notes)
            + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=100))
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    code = EXIT_OK
    try:
        loads(body)
    except ConfigError as exc:
        code = EXIT_DEGRADED
        for e in exc.errors:
            print(f"vipd would refuse it: {e}", file=sys.stderr)
    if out:
        with open(out, "w") as f:
            f.write(body)
    else:
        sys.stdout.write(body)
    return code


def follow_events(path: str) -> int:
    """Print each event as a JSON line until the daemon goes (or Ctrl-C)."""
    from vipd.io.control_client import stream

    try:
        for event in stream(path, {"command": "events"}):
            if "event" in event:
                print(json.dumps(event), flush=True)
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as exc:
        print(f"vipctl: cannot reach vipd at {path}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    return EXIT_OK


def render_sync(s: dict[str, Any]) -> str:
    lines = [f"sync: node id {s['node_id']}, {'ready' if s['ready'] else 'BULK SYNC NOT DONE'}"
             f"; flows: {s['internal_flows']} ours, {s['external_flows']} from peers",
             f"{'peer':<20} {'reachable':<9} {'heard':>8} {'sent':>8} {'acked':>8} "
             f"{'received':>9} {'retrans':>8} {'resyncs':>8} {'lag':>8}  drops"]
    for p in s["peers"]:
        c = p["counters"]
        drops = ", ".join(f"{k} {c[k]}" for k in ("auth", "replay", "old_epoch", "malformed",
                                                   "short", "version", "stale_channel")
                          if c.get(k)) or "-"
        lines.append(
            f"{p['address']:<20} {'yes' if p['reachable'] else 'NO':<9} "
            f"{_ago(p['last_heard_ago_s']):>8} {p['seq_sent']:>8} {p['acked']:>8} "
            f"{p['seq_received']:>9} {c.get('retransmissions', 0):>8} "
            f"{c.get('resyncs_sent', 0)}/{c.get('resyncs_received', 0):<6} "
            f"{_ms(p['lag_ms']):>8}  {drops}")
    lc = s.get("last_commit")
    lines.append("last commit: none" if not lc else
                 f"last commit: {lc['entries']} entries in {lc['duration_ms']} ms "
                 f"({lc['created']} new, {lc['existed']} already there, {lc['failed']} failed)")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # usage errors are UNKNOWN (3), not 2
        self.print_usage(sys.stderr)
        self.exit(EXIT_UNKNOWN, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(prog="vipctl", description="control a running vipd (exit codes: 0 OK, "
                 "1 degraded, 2 critical or unreachable, 3 usage)")
    ap.add_argument("-s", "--socket", "--control-socket", dest="socket",
                    default=os.environ.get("VIPD_SOCKET", DEFAULT_CONTROL_SOCKET))
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("status", help="show every virtual router")
    st.add_argument("--json", action="store_true")
    st.add_argument("--summary", action="store_true", help="one line per virtual router")
    st.add_argument("--watch", nargs="?", const=1.0, type=float, metavar="SECONDS",
                    help="redraw every SECONDS (1) until Ctrl-C")
    mt = sub.add_parser("maintenance", help="drain this node or bring it back")
    mt.add_argument("onoff", choices=["on", "off"])
    mt.add_argument("--json", action="store_true")
    rl = sub.add_parser("reload", help="re-read the configuration")
    rl.add_argument("--json", action="store_true")
    sy = sub.add_parser("sync", help="connection-state sync: peers, caches, last commit")
    sy.add_argument("--json", action="store_true")
    sub.add_parser("events", help="follow every transition and alarm (JSON lines)")
    dm = sub.add_parser("demote", help="demotion counter: lower (+N), raise back (-N) or "
                        "reset (0) the priority of every router (node) or of a group")
    dm.add_argument("target", help="node, or a group's name")
    dm.add_argument("change", help="+N, -N or 0")
    ik = sub.add_parser("import-keepalived", help="convert a keepalived.conf (VRRP part) "
                        "into a vipd configuration")
    ik.add_argument("file")
    ik.add_argument("--name", default="", help="the node's name (default: router_id)")
    ik.add_argument("-o", "--output", help="write here instead of standard output")
    args = ap.parse_args(argv)
    if args.cmd == "events":
        return follow_events(args.socket)
    if args.cmd == "import-keepalived":
        return import_keepalived(args.file, args.name, args.output)
    if args.cmd == "status" and args.watch is not None:
        if args.json or args.watch <= 0:
            ap.error("--watch takes a positive interval and no --json")
        return watch(args, args.watch)

    if args.cmd == "status":
        req: dict[str, Any] = STATUS_REQUEST
    elif args.cmd == "maintenance":
        req = {"command": "maintenance", "on": args.onoff == "on"}
    elif args.cmd == "sync":
        req = {"command": "sync"}
    elif args.cmd == "demote":
        req = {"command": "demote", "target": args.target, "change": args.change}
    else:
        req = {"command": "reload"}
    reply = _ask(args.socket, req)
    if reply is None:
        print(f"vipctl: cannot reach vipd at {args.socket}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if not reply.get("ok"):
        err = reply.get("error", {})
        print(f"vipctl: {err.get('code')}: {err.get('message')}", file=sys.stderr)
        # a request the daemon cannot take (an unknown group, a malformed change) is a
        # usage error; a refused reload or a missing sync section, a problem to look at
        return EXIT_UNKNOWN if err.get("code") == "bad_request" else EXIT_DEGRADED
    if args.cmd == "status":
        status = reply["status"]
        print(json.dumps(status, indent=2) if args.json else
              render_summary(status) if args.summary else render(status))
        return _status_code(status)
    if args.cmd == "sync":
        sync = reply["sync"]
        print(json.dumps(sync, indent=2) if args.json else render_sync(sync))
        healthy = sync["ready"] and all(p["reachable"] for p in sync["peers"])
        return EXIT_OK if healthy else EXIT_DEGRADED
    if args.cmd == "demote":
        d = reply["demote"]
        print(f"{d['target']}: demotion {d['count']}" + (" (cleared)" if not d["count"] else
                                                          f" (priority lowered by {d['count']})"))
        return EXIT_OK
    if getattr(args, "json", False):
        print(json.dumps({k: v for k, v in reply.items() if k != "ok"}))
    else:
        print(in_words(args.cmd, reply))
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
