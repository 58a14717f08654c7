"""Wire codec: golden vectors, scapy cross-checks, one drop reason per failed check, fuzz."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vipd.core.packet import (
    VRRP_GROUP_V4,
    VRRP_GROUP_V6,
    AddressDiff,
    Advert,
    ChecksumVariant,
    DecodeError,
    DropReason,
    IpMeta,
    ReceiverView,
    check_against,
    decode,
    encode_v2,
    encode_v3,
    internet_checksum,
)

SRC4 = IPv4Address("192.0.2.11")
SRC6 = IPv6Address("fe80::1")
META4 = IpMeta(4, SRC4, VRRP_GROUP_V4, 255)
META6 = IpMeta(6, SRC6, VRRP_GROUP_V6, 255)
VIPS4 = (IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2"))
VIPS6 = (IPv6Address("fe80::200:5eff:fe00:233"), IPv6Address("2001:db8:a::1"))

# Golden vectors (VRRP payload only, hex). The v2, v3/IPv4 pseudo-header and v3/IPv6 ones
# are byte-identical to what scapy 2.x builds (see test_scapy_builds_the_same_bytes).
GOLDEN = {
    "v2": "21339601000186c8c00002010000000000000000",
    "v3_ipv4_pseudo_header": "31339602006411c3c0000201c0000202",
    "v3_ipv4_rfc9568": "313396020064b461c0000201c0000202",
    "v3_ipv6": "31336402000adf18fe8000000000000002005efffe00023320010db8000a00000000000000000001",
}


def build(name: str) -> bytes:
    if name == "v2":
        return encode_v2(vrid=51, priority=150, adver_int_s=1, addresses=[VIPS4[0]])
    if name == "v3_ipv4_pseudo_header":
        return encode_v3(vrid=51, priority=150, max_adver_int_cs=100, addresses=VIPS4,
                         src=SRC4, variant=ChecksumVariant.PSEUDO_HEADER)
    if name == "v3_ipv4_rfc9568":
        return encode_v3(vrid=51, priority=150, max_adver_int_cs=100, addresses=VIPS4,
                         src=SRC4, variant=ChecksumVariant.RFC9568)
    return encode_v3(vrid=51, priority=100, max_adver_int_cs=10, addresses=VIPS6, src=SRC6)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_vectors_encode(name: str) -> None:
    assert build(name).hex() == GOLDEN[name]


def test_golden_vectors_decode() -> None:
    v2 = decode(bytes.fromhex(GOLDEN["v2"]), META4)
    assert (v2.version, v2.vrid, v2.priority, v2.adver_int_s, v2.addresses) == (
        2, 51, 150, 1, (VIPS4[0],))
    assert v2.checksum_variant is ChecksumVariant.V2 and v2.auth_type == 0
    assert v2.interval_cs == 100
    ph = decode(bytes.fromhex(GOLDEN["v3_ipv4_pseudo_header"]), META4)
    assert ph.checksum_variant is ChecksumVariant.PSEUDO_HEADER
    assert (ph.version, ph.vrid, ph.priority, ph.max_adver_int_cs, ph.addresses) == (
        3, 51, 150, 100, VIPS4)
    rfc = decode(bytes.fromhex(GOLDEN["v3_ipv4_rfc9568"]), META4)
    assert rfc.checksum_variant is ChecksumVariant.RFC9568
    assert rfc.addresses == VIPS4
    v6 = decode(bytes.fromhex(GOLDEN["v3_ipv6"]), META6)
    assert (v6.family, v6.priority, v6.max_adver_int_cs, v6.addresses) == (6, 100, 10, VIPS6)
    assert v6.checksum_variant is ChecksumVariant.IPV6


def test_rfc9568_checksum_is_over_the_message_alone() -> None:
    raw = bytes.fromhex(GOLDEN["v3_ipv4_rfc9568"])
    assert internet_checksum(raw) == 0  # a valid plain internet checksum over the payload


def test_pseudo_header_checksum_depends_on_addresses() -> None:
    raw = bytes.fromhex(GOLDEN["v3_ipv4_pseudo_header"])
    other = IpMeta(4, IPv4Address("192.0.2.12"), VRRP_GROUP_V4, 255)
    with pytest.raises(DecodeError) as ei:
        decode(raw, other)
    assert ei.value.reason is DropReason.CHECKSUM


def test_v2_auth_is_reported_not_trusted() -> None:
    raw = encode_v2(vrid=7, priority=100, adver_int_s=1, addresses=[VIPS4[0]],
                    auth_type=1, auth_data=b"secret")
    adv = decode(raw, META4)
    assert adv.auth_type == 1 and adv.auth_data == b"secret\x00\x00"


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_scapy_dissects_our_packets(name: str) -> None:
    inet = pytest.importorskip("scapy.layers.inet")
    inet6 = pytest.importorskip("scapy.layers.inet6")
    vrrp = pytest.importorskip("scapy.layers.vrrp")
    from scapy.packet import Raw

    raw = bytes.fromhex(GOLDEN[name])
    if name == "v3_ipv6":
        wire = bytes(inet6.IPv6(src=str(SRC6), dst="ff02::12", hlim=255, nh=112) / Raw(raw))
        pkt = inet6.IPv6(wire)
    else:
        wire = bytes(inet.IP(src=str(SRC4), dst="224.0.0.18", ttl=255, proto=112) / Raw(raw))
        pkt = inet.IP(wire)
    layer = pkt[vrrp.VRRP] if name == "v2" else pkt[vrrp.VRRPv3]
    assert layer.vrid == 51
    if name == "v2":
        assert (layer.version, layer.adv, layer.addrlist) == (2, 1, ["192.0.2.1"])
        return
    assert layer.version == 3
    assert layer.adv == (10 if name == "v3_ipv6" else 100)
    assert [ip_address(a) for a in layer.addrlist] == list(VIPS6 if name == "v3_ipv6" else VIPS4)
    # scapy recomputes the checksum its own way (always with the pseudo-header)
    layer.chksum = None
    again = inet6.IPv6(bytes(pkt)) if name == "v3_ipv6" else inet.IP(bytes(pkt))
    theirs = bytes(again[vrrp.VRRPv3])[6:8]
    if name == "v3_ipv4_rfc9568":
        assert theirs != raw[6:8]  # scapy cannot produce the RFC 9568 IPv4 variant
    else:
        assert theirs == raw[6:8]


@pytest.mark.parametrize("name", ["v2", "v3_ipv4_pseudo_header", "v3_ipv6"])
def test_scapy_builds_the_same_bytes(name: str) -> None:
    # scapy always uses the pseudo-header for v3/IPv4, so the RFC 9568 variant is checked
    # by test_rfc9568_checksum_is_over_the_message_alone instead.
    inet = pytest.importorskip("scapy.layers.inet")
    inet6 = pytest.importorskip("scapy.layers.inet6")
    vrrp = pytest.importorskip("scapy.layers.vrrp")
    if name == "v2":
        p = inet.IP(src=str(SRC4), dst="224.0.0.18", ttl=255, proto=112) / vrrp.VRRP(
            vrid=51, priority=150, adv=1, addrlist=["192.0.2.1"])
        assert bytes(p)[20:].hex() == GOLDEN[name]
    elif name == "v3_ipv6":
        p = inet6.IPv6(src=str(SRC6), dst="ff02::12", hlim=255, nh=112) / vrrp.VRRPv3(
            vrid=51, priority=100, adv=10, addrlist=[str(a) for a in VIPS6])
        assert bytes(p)[40:].hex() == GOLDEN[name]
    else:
        p = inet.IP(src=str(SRC4), dst="224.0.0.18", ttl=255, proto=112) / vrrp.VRRPv3(
            vrid=51, priority=150, adv=100, addrlist=[str(a) for a in VIPS4])
        assert bytes(p)[20:].hex() == GOLDEN[name]


@given(
    vrid=st.integers(1, 255), prio=st.integers(0, 255), interval=st.integers(1, 4095),
    n=st.integers(1, 20), v6=st.booleans(), rfc=st.booleans(),
)
def test_v3_round_trip(vrid: int, prio: int, interval: int, n: int, v6: bool, rfc: bool) -> None:
    if v6:
        addrs = [IPv6Address("fe80::1")] + [IPv6Address(f"2001:db8::{i + 1:x}") for i in range(n)]
        src, meta = SRC6, META6
    else:
        addrs = [IPv4Address(f"198.51.100.{i + 1}") for i in range(n)]
        src, meta = SRC4, META4
    variant = ChecksumVariant.RFC9568 if rfc else ChecksumVariant.PSEUDO_HEADER
    raw = encode_v3(vrid=vrid, priority=prio, max_adver_int_cs=interval, addresses=addrs,
                    src=src, variant=variant)
    adv = decode(raw, meta)
    assert (adv.vrid, adv.priority, adv.max_adver_int_cs, list(adv.addresses)) == (
        vrid, prio, interval, addrs)
    if not v6:
        assert adv.checksum_variant is variant


# ------------------------------------------------------------------ one reason per check


def _reason(raw: bytes, meta: IpMeta = META4) -> DropReason:
    with pytest.raises(DecodeError) as ei:
        decode(raw, meta)
    return ei.value.reason


def _patch(raw: bytes, offset: int, value: int, meta: IpMeta = META4,
           variant: ChecksumVariant = ChecksumVariant.PSEUDO_HEADER) -> bytes:
    """Change one byte and fix the checksum, so only the intended check fails."""
    from vipd.core.packet import vrrp_checksum

    b = bytearray(raw)
    b[offset] = value
    b[6:8] = b"\x00\x00"
    if variant is ChecksumVariant.V2:
        cks = internet_checksum(bytes(b))
    else:
        cks = vrrp_checksum(bytes(b), variant, meta.src, meta.dst)
    b[6:8] = struct.pack("!H", cks)
    return bytes(b)


V3 = bytes.fromhex(GOLDEN["v3_ipv4_pseudo_header"])
V2 = bytes.fromhex(GOLDEN["v2"])
V6 = bytes.fromhex(GOLDEN["v3_ipv6"])


def test_drop_ttl() -> None:
    assert _reason(V3, IpMeta(4, SRC4, VRRP_GROUP_V4, 254)) is DropReason.TTL
    assert _reason(V6, IpMeta(6, SRC6, VRRP_GROUP_V6, 1)) is DropReason.TTL


def test_drop_version() -> None:
    assert _reason(_patch(V3, 0, 0x41)) is DropReason.VERSION
    assert _reason(V2, IpMeta(6, SRC6, VRRP_GROUP_V6, 255)) is DropReason.VERSION  # v2 is IPv4


def test_drop_type() -> None:
    assert _reason(_patch(V3, 0, 0x32)) is DropReason.TYPE


def test_drop_length() -> None:
    assert _reason(V3[:7]) is DropReason.LENGTH
    assert _reason(V3 + b"\x00") is DropReason.LENGTH


def test_drop_count() -> None:
    assert _reason(_patch(V3, 3, 0)) is DropReason.COUNT
    assert _reason(_patch(V3, 3, 3)) is DropReason.COUNT


def test_drop_interval_zero() -> None:
    b = _patch(_patch(V3, 4, 0), 5, 0)
    assert _reason(b) is DropReason.INTERVAL_ZERO
    assert _reason(_patch(V2, 5, 0, variant=ChecksumVariant.V2)) is DropReason.INTERVAL_ZERO


def test_drop_checksum() -> None:
    b = bytearray(V3)
    b[7] ^= 0xFF
    assert _reason(bytes(b)) is DropReason.CHECKSUM


def test_ipv6_first_not_link_local_is_accepted_and_flagged() -> None:
    # Defect 6.1: RFC 9568 5.2.9 binds the sender; keepalived sends only its global VIPs.
    # Dropping these hid a higher-priority peer (two masters for good).
    raw = encode_v3(vrid=51, priority=100, max_adver_int_cs=10,
                    addresses=[VIPS6[1], VIPS6[0]], src=SRC6)
    assert decode(raw, META6).first_not_link_local
    only_global = decode(encode_v3(vrid=51, priority=100, max_adver_int_cs=10,
                                   addresses=[VIPS6[1]], src=SRC6), META6)
    assert only_global.first_not_link_local
    assert not decode(build("v3_ipv6"), META6).first_not_link_local
    # ours lists the link-local first; a peer listing none is compared on the rest
    assert check_against(only_global, _view(addresses=frozenset(VIPS6))) is None


def _view(**kw: object) -> ReceiverView:
    base: dict[str, object] = dict(vrid=51, version=3, addresses=frozenset(VIPS4),
                                   adver_int_cs=100)
    base.update(kw)
    return ReceiverView(**base)  # type: ignore[arg-type]


def _check_reason(adv: Advert, view: ReceiverView | None) -> DropReason:
    with pytest.raises(DecodeError) as ei:
        check_against(adv, view)
    return ei.value.reason


def test_check_unknown_vrid() -> None:
    assert _check_reason(decode(V3, META4), None) is DropReason.UNKNOWN_VRID


def test_check_address_mismatch_is_a_difference_not_a_drop() -> None:
    adv = decode(V3, META4)
    view = _view(addresses=frozenset({VIPS4[0]}))
    assert check_against(adv, view) == AddressDiff(missing=(), extra=tuple(VIPS4[1:]))
    fewer = decode(encode_v3(vrid=51, priority=100, max_adver_int_cs=100, addresses=VIPS4[:1],
                             src=SRC4), META4)
    assert check_against(fewer, _view()) == AddressDiff(missing=tuple(VIPS4[1:]), extra=())
    assert check_against(adv, _view(addresses=frozenset(reversed(VIPS4)))) is None  # order
    # a peer that does list a link-local is compared on it too
    other_ll = decode(encode_v3(vrid=51, priority=100, max_adver_int_cs=10,
                                addresses=[IPv6Address("fe80::99"), VIPS6[1]], src=SRC6),
                      META6)
    assert check_against(other_ll, _view(addresses=frozenset(VIPS6))) == AddressDiff(
        missing=(VIPS6[0],), extra=(IPv6Address("fe80::99"),))


def test_check_v2_interval_mismatch_and_version_mix() -> None:
    adv2 = decode(V2, META4)
    v2view = _view(version=2, addresses=frozenset({VIPS4[0]}), adver_int_cs=300)
    assert _check_reason(adv2, v2view) is DropReason.V2_INTERVAL_MISMATCH
    check_against(adv2, _view(version=2, addresses=frozenset({VIPS4[0]})))
    # a v3 router drops v2 adverts unless in RFC 5798 8.4 compatibility, and v2 drops v3
    v3view = _view(addresses=frozenset({VIPS4[0]}))
    assert _check_reason(adv2, v3view) is DropReason.VERSION
    check_against(adv2, _view(addresses=frozenset({VIPS4[0]}), accept_v2=True))
    assert _check_reason(decode(V3, META4), _view(version=2)) is DropReason.VERSION


# ------------------------------------------------------------------ fuzz


@settings(max_examples=3000)
@given(data=st.binary(max_size=120), family=st.sampled_from([4, 6]),
       ttl=st.sampled_from([255, 255, 255, 64]))
def test_fuzz_random_bytes(data: bytes, family: int, ttl: int) -> None:
    meta = IpMeta(family, SRC4 if family == 4 else SRC6,
                  VRRP_GROUP_V4 if family == 4 else VRRP_GROUP_V6, ttl)
    try:
        adv = decode(data, meta)
    except DecodeError as exc:
        assert isinstance(exc.reason, DropReason)
        return
    assert adv.version in (2, 3) and 1 <= len(adv.addresses) <= 255


@settings(max_examples=3000)
@given(base=st.sampled_from(sorted(GOLDEN)), edits=st.lists(
    st.tuples(st.integers(0, 60), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 80))
def test_fuzz_mutated_golden(base: str, edits: list[tuple[int, int]], cut: int) -> None:
    raw = bytearray(bytes.fromhex(GOLDEN[base]))
    for off, val in edits:
        if off < len(raw):
            raw[off] = val
    meta = META6 if base == "v3_ipv6" else META4
    data = bytes(raw[: len(raw) - cut % (len(raw) + 1)])
    try:
        decode(data, meta)
    except DecodeError as exc:
        assert isinstance(exc.reason, DropReason)


@given(vrid=st.integers(1, 255), prio=st.integers(0, 255), adv=st.integers(1, 255),
       n=st.integers(1, 30), auth=st.sampled_from([0, 1, 2]), data=st.binary(max_size=8))
def test_v2_round_trip(vrid: int, prio: int, adv: int, n: int, auth: int, data: bytes) -> None:
    addrs = [IPv4Address(f"203.0.113.{i + 1}") for i in range(n)]
    raw = encode_v2(vrid=vrid, priority=prio, adver_int_s=adv, addresses=addrs,
                    auth_type=auth, auth_data=data)
    got = decode(raw, META4)
    assert (got.version, got.vrid, got.priority, got.adver_int_s, list(got.addresses),
            got.auth_type, got.auth_data) == (2, vrid, prio, adv, addrs, auth,
                                              data.ljust(8, b"\0"))
