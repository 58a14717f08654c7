"""Frames the adapters build or parse, checked against scapy's dissectors."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vipd.io.announce import garp_frame, unsolicited_na
from vipd.io.vrrp_socket import parse_ipv4


def test_garp_frame_is_a_gratuitous_arp_request() -> None:
    layers = pytest.importorskip("scapy.layers.l2")
    frame = garp_frame("00:00:5e:00:01:33", IPv4Address("192.0.2.1"))
    pkt = layers.Ether(frame)
    assert pkt.dst == "ff:ff:ff:ff:ff:ff" and pkt.src == "00:00:5e:00:01:33"
    arp = pkt[layers.ARP]
    assert (arp.op, arp.psrc, arp.pdst, arp.hwsrc) == (1, "192.0.2.1", "192.0.2.1",
                                                      "00:00:5e:00:01:33")


def test_unsolicited_na_has_router_override_and_target_lladdr() -> None:
    inet6 = pytest.importorskip("scapy.layers.inet6")
    body = unsolicited_na("00:00:5e:00:02:33", IPv6Address("2001:db8:a::1"))
    na = inet6.ICMPv6ND_NA(body)
    assert (na.type, na.R, na.S, na.O, na.tgt) == (136, 1, 0, 1, "2001:db8:a::1")
    assert na[inet6.ICMPv6NDOptDstLLAddr].lladdr == "00:00:5e:00:02:33"


def test_parse_ipv4_splits_header_and_payload() -> None:
    payload = b"\x31\x33\x96\x01\x00\x64\x00\x00\xc0\x00\x02\x01"
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0xC0, 20 + len(payload), 0, 0, 255, 112, 0,
                       IPv4Address("192.0.2.11").packed, IPv4Address("224.0.0.18").packed)
    got = parse_ipv4(head + payload + b"pad")  # trailing bytes beyond total length ignored
    assert got is not None
    data, meta = got
    assert data == payload and (meta.ttl, str(meta.src), str(meta.dst)) == (
        255, "192.0.2.11", "224.0.0.18")


@given(st.binary(max_size=80))
def test_parse_ipv4_never_raises(data: bytes) -> None:
    got = parse_ipv4(data)
    assert got is None or isinstance(got[0], bytes)


def test_newest_per_key_keeps_the_newest_of_each_sender_and_vrid() -> None:
    from vipd.core.batch import newest_per_key

    batch = [("a", 51, 1), ("a", 52, 2), ("b", 51, 3), ("a", 51, 4), ("a", 51, 5),
             ("a", 52, 6)]
    kept, superseded = newest_per_key(batch, key=lambda p: (p[0], p[1]))
    assert [p[2] for p in kept] == [3, 5, 6] and superseded == 3
    assert newest_per_key(batch[:1], key=lambda p: p) == (batch[:1], 0)


# ---------------------------------------------------------------- rtnetlink monitor codec


def _nlmsg(kind: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def _rta(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def test_netlink_monitor_parses_links_addresses_and_overruns() -> None:
    from ipaddress import ip_interface

    from vipd.io import netlink_monitor as nm

    link = _nlmsg(nm.RTM_NEWLINK, struct.pack("=BxHiII", 0, 1, 7, 0x10041, 0)
                  + _rta(nm.IFLA_IFNAME, b"lanA\0") + _rta(nm.IFLA_ADDRESS, bytes(range(6))))
    gone = _nlmsg(nm.RTM_DELLINK, struct.pack("=BxHiII", 0, 1, 8, 0x10041, 0)
                  + _rta(nm.IFLA_IFNAME, b"lanB\0"))
    down = _nlmsg(nm.RTM_NEWLINK, struct.pack("=BxHiII", 0, 1, 7, 0x1, 0)
                  + _rta(nm.IFLA_IFNAME, b"lanA\0"))
    addr4 = _nlmsg(nm.RTM_DELADDR, struct.pack("=BBBBI", 2, 24, 0, 0, 7)
                   + _rta(nm.IFA_ADDRESS, bytes([192, 0, 2, 1]))
                   + _rta(nm.IFA_LOCAL, bytes([192, 0, 2, 1])))
    addr6 = _nlmsg(nm.RTM_NEWADDR, struct.pack("=BBBBI", 10, 64, 0, 0, 7)
                   + _rta(nm.IFA_ADDRESS, bytes.fromhex("20010db8000a" + "00" * 9 + "01")))
    route = _nlmsg(24, b"\0" * 12)  # RTM_NEWROUTE: not ours, skipped
    events = nm.parse(link + gone + down + addr4 + addr6 + route
                      + _nlmsg(nm.NLMSG_OVERRUN, b"") + b"\x01\x02")
    assert events == [
        nm.LinkEvent(7, "lanA", True, "00:01:02:03:04:05"),
        nm.LinkEvent(8, "lanB", False, "00:00:00:00:00:00", deleted=True),
        nm.LinkEvent(7, "lanA", False, "00:00:00:00:00:00"),
        nm.AddrEvent(7, ip_interface("192.0.2.1/24"), False),
        nm.AddrEvent(7, ip_interface("2001:db8:a::1/64"), True),
        nm.Resync("netlink overrun"),
    ]


@given(st.binary(max_size=200))
def test_netlink_monitor_parse_never_raises(data: bytes) -> None:
    from vipd.io.netlink_monitor import parse

    assert isinstance(parse(data), list)


def test_address_batch_messages_parse_as_pyroute2_reads_them() -> None:
    from ipaddress import ip_interface

    from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

    from vipd.io import addr_batch as ab

    for add, addr in ((True, "192.0.2.1/24"), (False, "192.0.2.1/24"),
                      (True, "2001:db8:a::1/64")):
        raw = ab.message((add, 7, ip_interface(addr)), 42)
        length, kind, flags, seq, _ = struct.unpack_from("=IHHII", raw)
        assert (length, kind, seq) == (len(raw), ab.RTM_NEWADDR if add else ab.RTM_DELADDR, 42)
        assert flags & ab.NLM_F_ACK and bool(flags & ab.NLM_F_REPLACE) == add
        msg = ifaddrmsg(raw)
        msg.decode()
        assert msg["index"] == 7 and msg["prefixlen"] == int(addr.split("/")[1])
        assert msg.get_attr("IFA_ADDRESS") == addr.split("/")[0]
    ack = struct.pack("=IHHII", 36, ab.NLMSG_ERROR, 0, 42, 0) + struct.pack("=i", -17) + \
        b"\0" * 16
    assert ab.acks(ack) == [(42, 17)] and ab.harmless(True, 17) and not ab.harmless(False, 1)
