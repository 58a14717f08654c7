"""Notify hooks (vipd.runtime.notify): in order, with arguments and environment, bounded
by a timeout, failures counted; driven by the daemon's transitions."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from test_runtime import CONFIG, World, fire, run, settle
from vipd.config import ConfigError, NotifyConfig, loads
from vipd.runtime import Daemon
from vipd.runtime.notify import Notifier


def hook(out: Path) -> list[str]:
    return ["/bin/sh", "-c", f'echo "$VIPD_EVENT $1 $2 $3 $VIPD_OLD_STATE $VIPD_CAUSE" '
                             f'>> {out}', "hook"]


def test_notify_config() -> None:
    base = CONFIG.replace("SOCK", "/tmp/x.sock")
    cfg = loads(base + "notify: {master: [/bin/true, a], fault: [/bin/false], timeout: 2s}\n")
    assert cfg.notify.commands == (("master", ("/bin/true", "a")), ("fault", ("/bin/false",)))
    assert cfg.notify.timeout_ms == 2000
    with pytest.raises(ConfigError) as exc:
        loads(base + "notify: {master: [relative/path], bogus: [/bin/true]}\n")
    text = "; ".join(exc.value.errors)
    assert "notify.master" in text and "bogus" in text


def test_hooks_run_in_order_with_arguments_and_a_timeout(tmp_path: Path) -> None:
    out = tmp_path / "hooks.log"

    async def main() -> Notifier:
        n = Notifier(NotifyConfig((("master", tuple(hook(out))),
                                   ("backup", tuple(hook(out))),
                                   ("fault", ("/bin/sh", "-c", "sleep 5", "hook")),
                                   ("stop", ("/nonexistent/hook",))), timeout_ms=200))
        for new, old in (("MASTER", "BACKUP"), ("BACKUP", "MASTER"), ("MASTER", "BACKUP")):
            n.transition("lan/vrid 1/IPv4", "lan", "lan0", 1, 4, old, new, 100, "test")
        n.transition("lan/vrid 1/IPv4", "lan", "lan0", 1, 4, "MASTER", "FAULT", 0, "link")
        n.transition("lan/vrid 1/IPv4", "lan", "lan0", 1, 4, "FAULT", "INIT", 0, "stop")
        await n.drain()
        return n

    n = asyncio.run(main())
    assert out.read_text().splitlines() == [
        "master lan/vrid 1/IPv4 MASTER 100 BACKUP test",
        "backup lan/vrid 1/IPv4 BACKUP 100 MASTER test",
        "master lan/vrid 1/IPv4 MASTER 100 BACKUP test"]
    assert (n.stats["ran"], n.stats["timed_out"], n.stats["failed"]) == (3, 1, 1)


def test_the_daemon_runs_the_master_hook_on_takeover(tmp_path: Path) -> None:
    out = tmp_path / "hooks.log"
    w = World(tmp_path)
    w.cfg = loads(CONFIG.replace("SOCK", w.sock_path)
                  + "notify: " + json.dumps({"master": hook(out)}) + "\n")

    async def body(w: World, d: Daemon) -> None:
        fire(w, d)
        await settle()
        await d.notifier.drain()
        assert out.read_text().splitlines() == [
            "master lan-a/vrid 51/IPv4 MASTER 150 BACKUP master_down_timer"]
        assert d.status()["notify"]["ran"] == 1

    run(tmp_path, body, w)


def test_vipctl_events_streams_every_transition(tmp_path: Path) -> None:
    w = World(tmp_path)

    async def body(w: World, d: Daemon) -> None:
        reader, writer = await asyncio.open_unix_connection(w.sock_path)
        writer.write(b'{"command": "events"}\n')
        await writer.drain()
        assert json.loads(await reader.readline()) == {"ok": True, "events": "following"}
        fire(w, d)  # BACKUP -> MASTER
        event = json.loads(await asyncio.wait_for(reader.readline(), 2))
        assert (event["event"], event["router"], event["from"], event["to"]) == (
            "transition", "lan-a/vrid 51/IPv4", "BACKUP", "MASTER")
        assert event["cause"] == "master_down_timer"
        # other requests are answered as usual meanwhile
        r2, w2 = await asyncio.open_unix_connection(w.sock_path)
        w2.write(b'{"command": "ping"}\n')
        await w2.drain()
        assert json.loads(await r2.readline())["ok"] is True
        for wr in (writer, w2):
            wr.close()
        await asyncio.sleep(0.05)
        assert d._control is not None and not d._control._subscribers  # noticed at once

    run(tmp_path, body, w)
