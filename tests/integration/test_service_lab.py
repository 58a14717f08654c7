"""configs/vipd.service run the way systemd runs it, inside a lab router's namespace.

systemd is not PID 1 on this machine (and a second systemd must not manage the host), so
this test plays systemd's side of the unit's contract itself, from the unit file's own
lines: `systemd-analyze verify` on the unit (paths pointed at this checkout);
ExecStartPre refusing a bad file; ExecStart with NOTIFY_SOCKET and WATCHDOG_USEC set;
READY=1 sent by the main PID (NotifyAccess=main, checked with SCM_CREDENTIALS) only once
the control socket answers; WATCHDOG=1 pings at half of WATCHDOG_USEC (1 s here instead of
the unit's 10 s, to keep the test short); ExecReload (`kill -HUP $MAINPID`) applying a
changed priority; and the stop (SIGTERM to the main process, KillMode=mixed) sending
STOPPING=1 and exiting 0 within TimeoutStopSec. What only a real systemd shows (the
restart on failure, the RuntimeDirectory it creates) is checked by hand as
docs/operations.md describes."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from lab import Lab, wait_for
from scenario import Speaker, status, vipd_config

from vipd.defaults import DEFAULT_CONTROL_SOCKET

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "configs" / "vipd.service"


def unit_for(vipd: str, config: Path) -> str:
    return (UNIT.read_text().replace("/opt/vipd/bin/vipd", vipd)
            .replace("/etc/vipd/vipd.yaml", str(config)))


def service(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k] = v
    return out


def seconds(v: str) -> float:
    return float(v.removesuffix("s"))


class NotifySocket:
    """systemd's side of sd_notify: a datagram socket that learns each sender's PID."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)
        self.got: list[tuple[float, int, str]] = []  # (when, sender pid, message)

    def poll(self) -> list[tuple[float, int, str]]:
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except BlockingIOError:
                return self.got
            pid = -1
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", cdata[:12])[0]
            self.got.append((time.monotonic(), pid, data.decode()))

    def messages(self, prefix: str) -> list[tuple[float, int, str]]:
        return [m for m in self.poll() if m[2].startswith(prefix)]


def test_the_unit_passes_systemd_analyze_verify(lab: Lab) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (scripts/bootstrap.sh installs the systemd "
                "package)")
    unit = lab.workdir / "vipd.service"
    unit.write_text(unit_for(str(Path(sys.prefix) / "bin" / "vipd"),
                             lab.workdir / "vipd.yaml"))
    r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True,
                       timeout=60)
    # systemd 252 exits 0 on a misspelt value and only says so: any word is a finding
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stderr


def test_the_unit_run_as_systemd_runs_it(lab: Lab) -> None:
    vipd = Path(sys.prefix) / "bin" / "vipd"
    assert vipd.exists(), "the venv has no vipd entry point"
    config = lab.workdir / "vipd.yaml"
    unit = service(unit_for(str(vipd), config))
    assert unit["Type"] == "notify" and unit["NotifyAccess"] == "main"
    # the default control socket lives in the RuntimeDirectory systemd makes
    assert Path(DEFAULT_CONTROL_SOCKET).parent == Path("/run") / unit["RuntimeDirectory"]

    cfg: dict[str, Any] = vipd_config(lab, "r1", 200, 100)
    config.write_text("mode: [not a mode\n")
    pre = subprocess.run(shlex.split(unit["ExecStartPre"]), capture_output=True, text=True,
                         timeout=30)
    assert pre.returncode != 0, "ExecStartPre accepted a broken file"
    config.write_text(yaml.safe_dump(cfg))
    pre = subprocess.run(shlex.split(unit["ExecStartPre"]), capture_output=True, text=True,
                         timeout=30)
    assert pre.returncode == 0, pre.stdout + pre.stderr

    notify = NotifySocket(lab.workdir / "notify")
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "LISTEN_FDS")}
    env.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="1000000")
    started = time.monotonic()
    proc = lab.popen("r1", shlex.split(unit["ExecStart"]), log="service.log", env=env)
    sp = Speaker("r1", proc, "vipd", config, Path(cfg["node"]["control_socket"]))
    try:
        wait_for(lambda: notify.messages("READY=1") or proc.poll() is not None, 15,
                 what="READY=1")
        assert proc.poll() is None, (lab.workdir / "service.log").read_text()[-2000:]
        ready_at, ready_pid, ready = notify.messages("READY=1")[0]
        assert ready_pid == proc.pid, "READY=1 must come from the main PID (NotifyAccess=main)"
        assert "STATUS=" in ready and "virtual routers" in ready
        # ready means usable: the control socket answers at once
        assert status(lab, sp)["instances"]
        # watchdog pings from the loop, every half WATCHDOG_USEC, from the main PID
        wait_for(lambda: len(notify.messages("WATCHDOG=1")) >= 3, 5, what="3 watchdog pings")
        pings = notify.messages("WATCHDOG=1")
        assert {p[1] for p in pings} == {proc.pid}
        gaps = [b[0] - a[0] for a, b in zip(pings, pings[1:], strict=False)]
        assert all(0.3 <= g <= 0.9 for g in gaps), gaps  # 0.5 s, with scheduling slack
        wait_for(lambda: set(i["state"] for i in status(lab, sp)["instances"]) == {"MASTER"},
                 10, what="r1 master")

        # ExecReload with $MAINPID: a changed priority is applied
        cfg["vlans"][0]["instances"][0]["priority"] = 150
        config.write_text(yaml.safe_dump(cfg))
        reload_cmd = shlex.split(unit["ExecReload"].replace("$MAINPID", str(proc.pid)))
        subprocess.run(reload_cmd, check=True, timeout=10)
        wait_for(lambda: status(lab, sp)["instances"][0]["priority"] == 150, 10,
                 what="the reloaded priority")
        wait_for(lambda: notify.messages("STATUS=") and "reloaded" in
                 notify.messages("STATUS=")[-1][2], 5, what="STATUS after the reload")
        assert proc.poll() is None

        # stop: SIGTERM to the main process (KillMode=mixed), within TimeoutStopSec
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(seconds(unit["TimeoutStopSec"]))
        took = time.monotonic() - t0
        assert rc == 0, (lab.workdir / "service.log").read_text()[-2000:]
        stopping = notify.messages("STOPPING=1")
        assert stopping and stopping[0][1] == proc.pid
        print(f"\nREADY after {ready_at - started:.2f} s, {len(pings)} pings, "
              f"gaps {[round(g, 3) for g in gaps]}, stop took {took:.2f} s")
    finally:
        lab.stop_process(proc)
        notify.sock.close()
