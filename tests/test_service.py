"""Running under systemd: sd_notify readiness, stopping and watchdog pings (vipd.io.systemd),
the unit file, and logging for journald. No root, no real network."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from pathlib import Path

from test_runtime import World, run, settle
from vipd.io.systemd import Notifier
from vipd.runtime.daemon import Daemon
from vipd.runtime.main import setup_logging

ROOT = Path(__file__).resolve().parent.parent


def listener() -> tuple[socket.socket, str]:
    d = tempfile.mkdtemp(prefix="vipd-sd-")  # short: AF_UNIX paths stop at 108 bytes
    path = os.path.join(d, "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.setblocking(False)
    return s, path


def received(s: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(s.recv(4096).decode())
        except BlockingIOError:
            return out


def test_outside_systemd_nothing_is_sent() -> None:
    n = Notifier({})
    assert not n.enabled and not n.ready("x") and n.watchdog_s is None


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_our_pid() -> None:
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "10000000"}).watchdog_s == 5.0
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "10000000",
                     "WATCHDOG_PID": "1"}).watchdog_s is None  # (not us)
    assert Notifier({"NOTIFY_SOCKET": "@abstract"}).address == "\0abstract"


def test_the_daemon_says_ready_after_start_pings_the_watchdog_and_says_stopping(
        tmp_path: Path) -> None:
    sock, path = listener()
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000000"})

    async def body(w: World, d: Daemon) -> None:
        await settle()
        got = received(sock)
        assert got[0].startswith("READY=1\nSTATUS=1 virtual routers, mode per-vlan-active")
        assert "WATCHDOG=1" in got  # the first ping comes at once, then every 30 s
        d.request_stop()
        await settle()
        assert any(m.startswith("STOPPING=1") for m in received(sock))

    try:
        run(tmp_path, body, systemd=notifier)
    finally:
        sock.close()


def test_the_unit_file_waits_for_readiness_checks_the_config_and_has_a_watchdog() -> None:
    unit = (ROOT / "configs" / "vipd.service").read_text()
    for line in ("Type=notify", "WatchdogSec=10s", "RuntimeDirectory=vipd",
                 "ExecStartPre=/opt/vipd/bin/vipd check-config /etc/vipd/vipd.yaml",
                 "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in unit.splitlines(), line


def test_logging_names_levels_and_leaves_timestamps_to_journald(monkeypatch: object) -> None:
    import pytest

    mp = pytest.MonkeyPatch()
    try:
        for journald, stamped in (("8:123", False), (None, True)):
            if journald:
                mp.setenv("JOURNAL_STREAM", journald)
            else:
                mp.delenv("JOURNAL_STREAM", raising=False)
            listener_ = setup_logging(verbose=False)
            try:
                handler = listener_.handlers[0]
                fmt = handler.formatter._fmt if handler.formatter else ""  # noqa: SLF001
                assert "%(levelname)s" in (fmt or "")
                assert ("%(asctime)s" in (fmt or "")) == stamped
                assert logging.getLogger("pyroute2").level == logging.WARNING
            finally:
                listener_.stop()
    finally:
        mp.undo()
        logging.getLogger().handlers[:] = []
