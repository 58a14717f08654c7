"""Issue 7: floods, bad input and resource bounds, in virtual time and through the fakes.
The work per event is counted, not timed."""

from __future__ import annotations

import asyncio
import copy
import json
import socket
from fractions import Fraction as F
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim import VIP, make_config
from test_runtime import PEER, World, advert, run
from vipd.core import packet
from vipd.core.packet import VRRP_GROUP_V4, VRRP_GROUP_V6, Advert, ChecksumVariant, IpMeta
from vipd.core.router import MAX_PEERS, State, VirtualRouter
from vipd.io.control_client import STATUS_REQUEST, expand_status
from vipd.runtime import Daemon

ME = IPv4Address("192.0.2.10")
MASTER = IPv4Address("192.0.2.20")


def adv(priority: int, src: IPv4Address) -> Advert:
    return Advert(3, 4, 51, priority, src, (VIP,), max_adver_int_cs=10,
                  checksum_variant=ChecksumVariant.PSEUDO_HEADER)


def test_spoofed_senders_are_bounded_and_the_takeover_keeps_its_time() -> None:
    """10,000 spoofed senders at 1000/s (lower priority) while the real master advertises,
    then the master dies: the peer table never passes MAX_PEERS, and the backup takes over
    exactly Master_Down_Interval after the master's last advert."""
    r = VirtualRouter(make_config(100, interval_cs=10), ME)
    r.start(F(0))
    now = F(0)
    last_master = F(0)
    for i in range(10_000):
        now = F(i, 1000)
        while (deadline := r.get_timer()) is not None and deadline <= now:
            r.handle_timer(deadline)  # timers run at their exact deadline
        if i % 10 == 0 and i < 9_000:  # the real master, every 10 ms, until 9 s
            r.receive(now, adv(200, MASTER))
            last_master = now
        src = IPv4Address(int(IPv4Address("198.51.100.0")) + (i % 250) + 256 * (i // 250))
        r.receive(now, adv(50, src))
        assert len(r.peers) <= MAX_PEERS
        if i < 9_000:  # the master we follow stays listed, however many others speak
            assert MASTER in r.peers
    assert r.counters.peers_forgotten >= 10_000 - MAX_PEERS
    assert r.state is State.MASTER
    assert r.last_transition is not None
    assert r.last_transition.at == last_master + r.master_down_interval  # not a tick later


def test_dual_master_detection_is_constant_work_and_still_right() -> None:
    r = VirtualRouter(make_config(100, interval_cs=10), ME)
    r.start(F(0))
    for i in range(5):  # one master only: no conflict, however long
        r.receive(F(i, 100), adv(200, MASTER))
    assert not r.dual_master_recent(F(5, 100))
    other = IPv4Address("192.0.2.30")
    r.receive(F(6, 100), adv(150, other))  # a second master within the interval
    assert r.dual_master_recent(F(6, 100)) and r.counters.dual_master_episodes == 1


def test_large_adverts_decode_their_address_list_once() -> None:
    addrs = [IPv6Address("fe80::1")] + [IPv6Address(f"2001:db8:a::{i:x}") for i in range(254)]
    raw = packet.encode_v3(vrid=51, priority=100, max_adver_int_cs=10, addresses=addrs,
                           src=IPv6Address("fe80::2"))
    meta = IpMeta(6, IPv6Address("fe80::2"), VRRP_GROUP_V6, 255)
    packet._addresses.cache_clear()
    first = packet.decode(raw, meta)
    second = packet.decode(raw, meta)
    assert first.addresses is second.addresses and len(first.addresses) == 255
    info = packet._addresses.cache_info()
    assert (info.misses, info.hits) == (1, 1)


def test_unknown_vrid_costs_no_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vipd.core.receive as receive

    calls = {"n": 0}
    real = receive.decode

    def counting(payload: bytes, meta: IpMeta) -> Advert:
        calls["n"] += 1
        return real(payload, meta)

    monkeypatch.setattr(receive, "decode", counting)

    async def body(w: World, d: Daemon) -> None:
        for _ in range(100):
            w.deliver(d, advert(200, vrid=99))
        assert calls["n"] == 0
        assert d.status()["interfaces"][0]["drops"]["IPv4"]["unknown_vrid"] == 100
        w.deliver(d, advert(200))
        assert calls["n"] == 1

    run(tmp_path, body)


def test_receive_reads_at_most_one_batch_per_turn(tmp_path: Path) -> None:
    from vipd.io.vrrp_socket import RECV_BATCH

    async def body(w: World, d: Daemon) -> None:
        sock = w.sockets["lanA", 4]
        sock.inbox = [(advert(200), IpMeta(4, PEER, VRRP_GROUP_V4, 255), 0.0)] * 1000
        d.read("lanA", 4)
        assert len(sock.inbox) == 1000 - RECV_BATCH  # the rest waits for the next turn
        inst = d.status()["instances"][0]
        assert inst["adverts_received"] == 1  # newest valid per sender only
        assert d.status()["interfaces"][0]["drops"]["IPv4"]["superseded"] == RECV_BATCH - 1

    run(tmp_path, body)


# ---------------------------------------------------------------- the control socket


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.setblocking(False)
    s.connect(path)
    return s


async def _read_line(s: socket.socket, timeout: float = 2.0) -> bytes:
    loop = asyncio.get_running_loop()
    buf = b""
    end = loop.time() + timeout
    while not buf.endswith(b"\n") and loop.time() < end:
        try:
            chunk = s.recv(65536)
        except BlockingIOError:
            await asyncio.sleep(0.005)
            continue
        if not chunk:
            break
        buf += chunk
    return buf


def test_control_socket_bounds_clients_idle_time_and_nesting(tmp_path: Path) -> None:
    from vipd.io import control

    async def body(w: World, d: Daemon) -> None:
        ctl = d._control
        assert ctl is not None
        ctl.max_clients = 8  # the same rules as at MAX_CLIENTS, with fewer sockets
        # idle connections cannot lock the operator out: the oldest idle one makes room
        idle = [_connect(w.sock_path) for _ in range(ctl.max_clients)]
        # (idle time counts from the server's accept, which a loaded machine delays)
        await asyncio.sleep(control.MIN_IDLE_EVICT_S + 0.3)
        s = _connect(w.sock_path)
        s.sendall(b'{"command": "status"}\n')
        assert json.loads(await _read_line(s))["ok"] is True
        assert ctl.stats["idle_evicted"] == 1 and await _read_line(idle[0]) == b""
        for c in idle + [s]:
            c.close()
        await asyncio.sleep(0.05)
        # only when every connection is mid-request does a newcomer hear "busy"
        release = asyncio.Event()
        real = ctl.handler

        async def slow(req: dict[str, object]) -> dict[str, object]:
            if req["command"] == "hold":
                await release.wait()
                return {"ok": True}
            return await real(req)

        ctl.handler = slow
        held = [_connect(w.sock_path) for _ in range(ctl.max_clients)]
        for c in held:
            c.sendall(b'{"command": "hold"}\n')
        await asyncio.sleep(0.05)
        extra = _connect(w.sock_path)
        assert json.loads(await _read_line(extra))["error"]["code"] == "busy"
        release.set()
        for c in held:
            assert json.loads(await _read_line(c))["ok"] is True
            c.close()
        extra.close()
        # an idle connection is closed after the timeout
        ctl.idle_timeout_s = 0.1
        lazy = _connect(w.sock_path)
        await asyncio.sleep(0.3)
        assert await _read_line(lazy) == b"" and ctl.stats["idle_closed"] >= 1
        lazy.close()
        s = _connect(w.sock_path)
        s.sendall(b"[" * 30000 + b"\n")
        assert json.loads(await _read_line(s))["error"] == {"code": "bad_json",
                                                            "message": "nested too deeply"}
        s.close()
        stats = d.status()["control"]
        assert stats["refused_busy"] == 1 and stats["bad_requests"] == 1

    run(tmp_path, body)


def test_status_storm_builds_one_snapshot_per_window(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(w: World, d: Daemon) -> None:
        builds = {"n": 0}
        real = d.commands.status

        def counting(table: bool = False) -> dict[str, object]:
            builds["n"] += 1
            return real(table)

        monkeypatch.setattr(d.commands, "status", counting)
        replies = await asyncio.gather(*(d.commands.handle({"command": "status"})
                                         for _ in range(200)))
        assert all(r["ok"] for r in replies) and builds["n"] == 1
        # vipctl's form (instances as a table) is built once as well, and is the same model
        tables = await asyncio.gather(*(d.commands.handle(dict(STATUS_REQUEST))
                                        for _ in range(200)))
        assert builds["n"] == 2
        assert isinstance(tables[0]["status"]["instances"], dict)
        assert expand_status(copy.deepcopy(tables[0]))["status"] == replies[0]["status"]

    run(tmp_path, body)


def test_rate_limited_log_counts_what_it_suppressed(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from vipd.ratelimit import RateLimitedLog

    t = {"now": 0.0}
    rl = RateLimitedLog(logging.getLogger("t"), 10.0, clock=lambda: t["now"])
    caplog.set_level(logging.INFO, "t")
    sent = [rl.log(logging.INFO, "k", "same thing") for _ in range(1000)]
    t["now"] = 11.0
    rl.log(logging.INFO, "k", "same thing")
    assert sum(sent) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "same thing", "same thing (999 more like this suppressed)"]


@settings(max_examples=500)
@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode)
       | st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                      lambda c: st.lists(c, max_size=3)
                      | st.dictionaries(st.sampled_from(["command", "on", "x"]), c,
                                        max_size=3)).map(lambda v: json.dumps(v).encode()))
def test_control_requests_always_get_a_reply(line: bytes) -> None:
    """Any line at all: the dispatcher answers with ok or an error code, never raises."""
    from vipd.io.control import ControlServer

    async def handler(req: dict[str, object]) -> dict[str, object]:
        if req["command"] == "boom":
            raise RuntimeError("handler bug")
        return {"ok": True}

    server = ControlServer("/nonexistent/sock", handler)
    reply = asyncio.run(server._dispatch(line))
    assert reply.get("ok") is True or isinstance(reply["error"]["code"], str)


def test_address_list_comparison_runs_once_per_distinct_list(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from vipd.core.packet import ReceiverView, check_against

    calls = {"n": 0}
    real = packet.address_diff

    def counting(theirs: tuple[IPv6Address, ...], ours: frozenset[IPv6Address]) -> object:
        calls["n"] += 1
        return real(theirs, ours)  # type: ignore[arg-type]

    monkeypatch.setattr(packet, "address_diff", counting)
    addrs = [IPv6Address("fe80::1")] + [IPv6Address(f"2001:db8:a::{i:x}") for i in range(254)]
    view = ReceiverView(51, 3, frozenset(addrs[:-1]), 10)
    raw = packet.encode_v3(vrid=51, priority=100, max_adver_int_cs=10, addresses=addrs,
                           src=IPv6Address("fe80::2"))
    meta = IpMeta(6, IPv6Address("fe80::2"), VRRP_GROUP_V6, 255)
    diffs = [check_against(packet.decode(raw, meta), view) for _ in range(100)]
    assert calls["n"] == 1 and diffs[0] is diffs[-1] and diffs[0] is not None
    assert diffs[0].extra == (addrs[-1],)


def test_vipctl_usage_errors_exit_3_as_monitoring_plugins_expect() -> None:
    import pytest as _pytest

    from vipd.vipctl import EXIT_UNKNOWN, main

    with _pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == EXIT_UNKNOWN == 3
