"""The daemon's entry point: load the configuration, build the real adapters, run the loop
until SIGTERM/SIGINT; SIGHUP reloads."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import logging.handlers
import os
import signal

from vipd.config import Config, ConfigError, load
from vipd.runtime.daemon import Daemon

log = logging.getLogger("vipd")


def setup_logging(verbose: bool) -> logging.handlers.QueueListener:
    """Log lines are formatted and written by a thread of their own: the loop only queues
    them (a takeover of 1000 routers logs 1000 transitions; formatting and writing them in
    the loop delayed the VIPs by about 25 ms). Level names in every line; under journald
    (JOURNAL_STREAM set) no timestamp of ours, journald adds its own."""
    import logging.handlers
    import queue

    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    out = logging.StreamHandler()
    out.setFormatter(logging.Formatter(fmt))
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(q)]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # -v: vipd's detail only
    listener = logging.handlers.QueueListener(q, out)
    listener.start()
    return listener


def run(config_path: str, *, control_socket: str | None = None, verbose: bool = False) -> int:
    listener = setup_logging(verbose)
    try:
        return _run(config_path, control_socket, verbose)
    finally:
        listener.stop()  # every queued line is written before the process ends


def _run(config_path: str, control_socket: str | None, verbose: bool) -> int:
    try:
        cfg = load(config_path)
    except ConfigError as exc:
        for line in exc.errors:
            log.error("%s: %s", config_path, line)
        return 1
    profile = os.environ.get("VIPD_PROFILE")
    if not profile:
        return asyncio.run(_main(cfg, config_path, control_socket))
    # diagnostics: profile the whole run, written at a clean stop (SIGTERM)
    import cProfile

    prof = cProfile.Profile()
    try:
        return prof.runcall(asyncio.run, _main(cfg, config_path, control_socket))
    finally:
        prof.dump_stats(profile)


def _realtime(priority: int) -> None:
    if priority <= 0:
        return
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(priority))
        log.info("running at SCHED_RR priority %d", priority)
    except OSError as exc:
        log.warning("cannot run at SCHED_RR priority %d: %s", priority, exc)


async def _main(cfg: Config, config_path: str, control_socket: str | None) -> int:
    from vipd.io.announce import LinuxAnnouncer
    from vipd.io.rtnl import PyrouteRtnl
    from vipd.io.vrrp_socket import VrrpSocket

    _realtime(cfg.node.realtime_priority)
    daemon = Daemon(cfg, rtnl=PyrouteRtnl(), open_socket=VrrpSocket,
                    announcer=LinuxAnnouncer(), control_socket=control_socket,
                    config_path=config_path)
    try:
        await daemon.start()
    except (ConfigError, OSError) as exc:
        log.error("cannot start: %s", exc)
        await daemon.close()
        return 1
    # The configuration, the routers and the imports live as long as the process: keep
    # them out of the cyclic collector's full passes (each walked every object again).
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    slow_ms = os.environ.get("VIPD_SLOW_CALLBACK_MS")
    if slow_ms:  # diagnostics: asyncio logs every callback that blocks the loop longer
        loop.set_debug(True)
        loop.slow_callback_duration = float(slow_ms) / 1000
    loop.add_signal_handler(signal.SIGTERM, daemon.request_stop)
    loop.add_signal_handler(signal.SIGINT, daemon.request_stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_reload(daemon)))
    await daemon.run_until_stopped()
    log.info("stopped")
    return 0


async def _reload(daemon: Daemon) -> None:
    with contextlib.suppress(ConfigError):
        await daemon.reload()
