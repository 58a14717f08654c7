"""The vipd command: `vipd -c CONFIG` runs the daemon, `vipd check-config FILE` validates."""

from __future__ import annotations

import argparse
import sys

from vipd import __version__
from vipd.config import ConfigError, load, load_sync_key


def check_config(path: str) -> int:
    try:
        cfg = load(path)
        if cfg.sync is not None:  # the daemon refuses to start without a usable key
            load_sync_key(cfg.sync.key_file)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"{path}: {line}", file=sys.stderr)
        return 1
    if cfg.cluster is not None:
        from vipd.core.cluster import preferred_shares

        shares = preferred_shares(cfg.cluster.members, cfg.cluster.buckets)
        print(f"{path}: ok ({len(cfg.vlans)} VLANs, {cfg.cluster.buckets} buckets, "
              f"{cfg.mode.value}; preferred buckets per member: "
              + ", ".join(f"{m} {n}" for m, n in shares.items()) + ")")
        return 0
    routers = sum(len(i.families()) for v in cfg.vlans for i in v.instances)
    print(f"{path}: ok ({len(cfg.vlans)} VLANs, {routers} virtual routers, {cfg.mode.value})")
    return 0


DEFAULT_CONFIG = "/etc/vipd/vipd.yaml"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check-config"]:
        if argv[1:2] in (["-h"], ["--help"]):
            print("usage: vipd check-config FILE\n\nValidate a configuration without "
                  "starting: every error with its path; exit 0 if valid, 1 if not.")
            return 0
        if len(argv) != 2:
            print("usage: vipd check-config FILE", file=sys.stderr)
            return 2
        return check_config(argv[1])
    ap = argparse.ArgumentParser(
        prog="vipd", description="VRRP failover daemon with connection-state sync",
        epilog="vipd check-config FILE  validates a configuration without starting")
    ap.add_argument("--version", action="version", version=f"vipd {__version__}")
    ap.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                    help=f"the configuration (default {DEFAULT_CONFIG})")
    ap.add_argument("--control-socket", help="override node.control_socket")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    from vipd.runtime import run

    return run(args.config, control_socket=args.control_socket, verbose=args.verbose)
