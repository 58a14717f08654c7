"""recvmmsg through ctypes (vipd.io.mmsg) and the control-message parsers of the VRRP
socket, on a local datagram socket pair (no root, no network)."""

from __future__ import annotations

import socket
import struct

import pytest

from vipd.io import mmsg
from vipd.io.vrrp_socket import SO_TIMESTAMPNS, _usual_control

pytestmark = pytest.mark.skipif(not mmsg.available(), reason="no recvmmsg in this libc")


def test_a_burst_is_read_in_calls_of_at_most_the_limit_then_nothing() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        b.setblocking(False)
        reader = mmsg.MmsgReader(b.fileno(), count=4, data_size=64, control_size=64)
        sent = [bytes([i]) * (i + 1) for i in range(6)]
        for d in sent:
            a.send(d)
        first, second, third = reader.read(3), reader.read(10), reader.read(10)
        assert [d for d, _c, _n, _t in first] == sent[:3]
        assert [d for d, _c, _n, _t in second] == sent[3:]  # the lengths were reset
        assert third == []


def test_a_datagram_longer_than_the_buffer_is_cut_and_flagged() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        b.setblocking(False)
        reader = mmsg.MmsgReader(b.fileno(), count=2, data_size=8, control_size=64)
        a.send(b"0123456789abcdef")
        a.send(b"short")
        got = reader.read(2)
        assert [(d, t) for d, _c, _n, t in got] == [(b"01234567", True), (b"short", False)]


def test_errors_other_than_nothing_queued_raise() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.close()
    reader = mmsg.MmsgReader(b.fileno(), count=2, data_size=8, control_size=64)
    b.close()
    with pytest.raises(OSError):
        reader.read(2)


def _cmsg(level: int, ctype: int, data: bytes) -> bytes:
    raw = struct.pack("=Qii", 16 + len(data), level, ctype) + data
    return raw + b"\0" * (-len(raw) % 8)


def test_control_messages_split_like_recvmsg_and_the_usual_layout_is_read_in_one_go() -> None:
    stamp = _cmsg(socket.SOL_SOCKET, SO_TIMESTAMPNS, struct.pack("=qq", 12, 345))
    dst = bytes.fromhex("ff020000000000000000000000000012")
    info = _cmsg(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, dst + struct.pack("=I", 7))
    hop = _cmsg(socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT, struct.pack("=i", 255))
    control = stamp + info + hop
    assert mmsg.cmsgs(control) == [
        (socket.SOL_SOCKET, SO_TIMESTAMPNS, struct.pack("=qq", 12, 345)),
        (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, dst + struct.pack("=I", 7)),
        (socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT, struct.pack("=i", 255))]
    assert _usual_control(control, v4=False) == (12_000_000_345, dst, 255)
    assert _usual_control(stamp, v4=True) == (12_000_000_345, None, -1)
    # another order or another message: the general parser's job
    assert _usual_control(stamp + hop + info, v4=False) is None
    assert _usual_control(info, v4=True) is None
    assert mmsg.cmsgs(control[:20]) == []  # a cut header is ignored, not misread
