"""Configuration: examples load, every error is reported at once with path and value."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vipd.config import (
    ConfigError,
    Mode,
    link_local_vips,
    load,
    loads,
    parse_duration_ms,
    router_configs,
)
from vipd.core.packet import ChecksumVariant

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

GOOD = """
node: {name: r1, control_socket: /run/vipd/test.sock}
mode: single-active
vlans:
  - name: lan-a
    interface: lanA
    instances:
      - vrid: 51
        priority: 150
        advert_interval: 10ms
        version: 3
        preempt: true
        vips: [192.0.2.1/24, 2001:db8:a::1/64]
sync: {interface: sync0, local: 203.0.113.1, peers: [203.0.113.2], key_file: /etc/vipd/k}
"""


@pytest.mark.parametrize("name,mode", [("single-active", "single-active"),
                                       ("per-vlan-active", "per-vlan-active"),
                                       ("tracking", "per-vlan-active")])
def test_examples_load(name: str, mode: str) -> None:
    cfg = load(CONFIGS / f"{name}.yaml")
    assert cfg.mode is Mode(mode)
    assert cfg.vlans and all(v.instances for v in cfg.vlans)


def test_all_active_example_loads_with_one_bucket_router_each(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from vipd.config import router_specs
    from vipd.daemon import check_config

    cfg = load(CONFIGS / "all-active.yaml")
    assert cfg.mode is Mode.ALL_ACTIVE and cfg.cluster is not None
    assert [v.multicast_mac for v in cfg.vlans] == ["03:00:5e:00:01:01", "03:00:5e:00:01:02"]
    specs = router_specs(cfg)
    assert [s.bucket for s in specs] == list(range(16))
    assert {s.config.vrid for s in specs} == set(range(240, 256))
    assert all(s.interface == "lanA" and s.vips == () for s in specs)
    # r1 is first for 6 of 16 buckets (r2, r3: 5 each): priority 250 on those
    assert sum(s.config.priority == 250 for s in specs) == 6
    key = tmp_path / "sync.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    conf = tmp_path / "all-active.yaml"
    conf.write_text((CONFIGS / "all-active.yaml").read_text().replace(
        "/etc/vipd/sync.key", str(key)))
    assert check_config(str(conf)) == 0
    assert "r1 6, r2 5, r3 5" in capsys.readouterr().out


def test_all_active_errors() -> None:
    base = (CONFIGS / "all-active.yaml").read_text()
    with pytest.raises(ConfigError) as ei:
        loads(base.replace("members: [r1, r2, r3]", "members: [r2, r3]")
              .replace("buckets: 16", "buckets: 20\n  vrid_base: 240")
              .replace('multicast_mac: "03:00:5e:00:01:01"', 'multicast_mac: "02:00:00:00:00:01"'))
    assert ei.value.errors == [
        "vlans[0].multicast_mac: '02:00:00:00:00:01' is not a multicast MAC address "
        "(first octet odd)",
        "cluster.members: ['r2', 'r3'] does not list this node (r1)",
        "cluster.vrid_base: 240 leaves no room for 20 buckets (VRIDs 240 to 259)"]
    with pytest.raises(ConfigError) as ei:
        loads(base.split("sync:")[0])
    assert ei.value.errors == [
        "sync: None is required in all-active mode (connection state follows the buckets)"]
    with pytest.raises(ConfigError) as ei:
        loads(GOOD + "cluster: {members: [r1, r2]}\n")
    assert ei.value.errors == ["cluster: '...' is only used in all-active mode"]


def test_advertise_link_local_off_sends_only_the_configured_ipv6_vips() -> None:
    cfg = loads(GOOD.replace("preempt: true", "preempt: true\n        advertise_link_local: false"))
    inst = cfg.vlans[0].instances[0]
    v6 = router_configs(cfg.vlans[0], inst)[1]
    assert v6.addresses == (IPv6Address("2001:db8:a::1"),)  # as keepalived sends them
    assert [str(v) for v in link_local_vips(inst)] == ["192.0.2.1/24", "2001:db8:a::1/64"]


def test_address_check_option() -> None:
    cfg = loads(GOOD.replace("preempt: true", "preempt: true\n        address_check: strict"))
    rcs = router_configs(cfg.vlans[0], cfg.vlans[0].instances[0])
    assert all(r.strict_addresses for r in rcs)
    assert not router_configs(loads(GOOD).vlans[0],
                              loads(GOOD).vlans[0].instances[0])[0].strict_addresses
    with pytest.raises(ConfigError) as ei:
        loads(GOOD.replace("preempt: true", "preempt: true\n        address_check: loose"))
    assert ei.value.errors == [
        "vlans[0].instances[0].address_check: 'loose' is not relaxed or strict"]


def test_good_config_is_typed() -> None:
    cfg = loads(GOOD)
    inst = cfg.vlans[0].instances[0]
    assert inst.advert_interval_cs == 1 and inst.priority == 150 and inst.version == 3
    assert cfg.sync is not None and cfg.sync.peers == (IPv4Address("203.0.113.2"),)
    rcs = router_configs(cfg.vlans[0], inst)
    assert [r.family for r in rcs] == [4, 6]
    assert rcs[0].name == "lan-a/vrid 51/IPv4"
    # IPv6: the derived virtual link-local is first on the wire (RFC 9568 5.2.9)
    assert rcs[1].addresses == (IPv6Address("fe80::200:5eff:fe00:233"),
                                IPv6Address("2001:db8:a::1"))
    assert rcs[0].checksum is ChecksumVariant.PSEUDO_HEADER
    assert rcs[1].checksum is ChecksumVariant.IPV6
    with pytest.raises(AttributeError):
        inst.priority = 1  # type: ignore[misc]


def test_every_error_reported_with_path_and_value() -> None:
    bad = """
node: {name: r1}
mode: half-active
vlans:
  - name: lan-a
    interface: lanA
    instances:
      - {vrid: 51, priority: 100, vips: [192.0.2.1/24]}
  - name: lan-b
    interface: lanB
    instances:
      - vrid: 300
        priority: 0
        advert_interval: 15ms
        vips: [192.0.2.1/24, 192.0.2.2/24, 192.0.2.300]
      - vrid: 7
        version: 2
        advert_interval: 1500ms
        vips: [2001:db8::1/64]
        colour: blue
"""
    with pytest.raises(ConfigError) as ei:
        loads(bad)
    errors = ei.value.errors
    expected = [
        "mode: 'half-active' is not single-active, per-vlan-active or all-active",
        "vlans[1].instances[0].vrid: 300 is not a VRID (1..255)",
        "vlans[1].instances[0].priority: 0 is not a priority (1..255)",
        "vlans[1].instances[0].advert_interval: '15ms' is not 10ms..40.95s in 10 ms steps",
        "vlans[1].instances[0].vips[2]: '192.0.2.300' is not an IP address",
        "vlans[1].instances[1].colour: unknown key",
        "vlans[1].instances[1].advert_interval: '1500ms' is not whole seconds 1s..255s",
        "vlans[1].instances[1].vips: ['2001:db8::1/64'] are IPv6: VRRPv2 is IPv4 only",
    ]
    for e in expected:
        assert any(line.startswith(e) for line in errors), (e, errors)
    assert len(errors) == len(expected), errors


def test_duplicate_vrid_and_names() -> None:
    bad = """
node: {name: r1}
vlans:
  - name: a
    interface: eth1
    instances:
      - {vrid: 5, vips: [192.0.2.1/24]}
      - {vrid: 5, vips: [192.0.2.2/24]}
      - {vrid: 5, vips: ['2001:db8::5/64']}
  - name: a
    interface: eth1
    instances: [{vrid: 6, vips: [192.0.2.6/24]}]
"""
    with pytest.raises(ConfigError) as ei:
        loads(bad)
    text = "\n".join(ei.value.errors)
    assert "vlans[0].instances[1].vrid: 5 is already used for IPv4 by instances[0]" in text
    assert "vlans[1].name: 'a' is used by another VLAN" in text
    assert "vlans[1].interface: 'eth1' is used by another VLAN" in text
    assert "instances[2]" not in text  # IPv6 VRID 5 is its own virtual router


def test_missing_and_wrong_shapes() -> None:
    with pytest.raises(ConfigError) as ei:
        loads("node: {}\nvlans: []\n")
    assert ei.value.errors == ["node.name: is required", "mode: is required",
                               "vlans: [] is not a non-empty list"]
    with pytest.raises(ConfigError) as ei:
        loads("node: [\n")
    assert "not valid YAML" in ei.value.errors[0]
    with pytest.raises(ConfigError) as ei:
        loads(GOOD.replace("192.0.2.1/24", "192.0.2.1"))
    assert ei.value.errors == [
        "vlans[0].instances[0].vips[0]: '192.0.2.1' has no prefix length (like 192.0.2.1/24)"]


@pytest.mark.parametrize(("text", "ms"), [("10ms", 10), ("1s", 1000), ("1.5s", 1500),
                                          ("40.95s", 40950), (2, 2000)])
def test_durations(text: object, ms: int) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("text", ["10", "fast", "-1s", "0.0001s", True, float("inf"),
                                  float("nan"), 1e30, "99999999999999999999s", "2000000s"])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration_ms(text)


def test_check_config_command(tmp_path: Path) -> None:
    key = tmp_path / "sync.key"
    key.write_bytes(b"x" * 32)
    key.chmod(0o640)
    good = tmp_path / "good.yaml"
    good.write_text(GOOD.replace("/etc/vipd/k", str(key)))
    loose = subprocess.run([sys.executable, "-m", "vipd", "check-config", str(good)],
                           capture_output=True, text=True)
    assert loose.returncode == 1 and "can be read or written by others" in loose.stderr
    key.chmod(0o600)
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("vrid: 51", "vrid: 0"))
    ok = subprocess.run([sys.executable, "-m", "vipd", "check-config", str(good)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout
    ko = subprocess.run([sys.executable, "-m", "vipd", "check-config", str(bad)],
                        capture_output=True, text=True)
    assert ko.returncode == 1
    # the path, then the line in the file (check-config reads a file)
    assert "vlans[0].instances[0].vrid (line 8): 0 is not a VRID (1..255)" in ko.stderr


def test_checksum_variant_to_send() -> None:
    cfg = loads(GOOD.replace("preempt: true", "preempt: true\n        checksum: rfc9568"))
    rcs = router_configs(cfg.vlans[0], cfg.vlans[0].instances[0])
    assert rcs[0].checksum is ChecksumVariant.RFC9568
    assert rcs[1].checksum is ChecksumVariant.IPV6  # IPv6 always has the pseudo-header
    with pytest.raises(ConfigError) as ei:
        loads(GOOD.replace("preempt: true", "preempt: true\n        checksum: crc32"))
    assert ei.value.errors == [
        "vlans[0].instances[0].checksum: 'crc32' is not rfc9568 or pseudo-header"]


# ---------------------------------------------------------------- issue 7: the loader


def _errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        loads(text)
    return ei.value.errors


def test_infinite_and_huge_durations_are_errors_not_tracebacks() -> None:
    assert _errors(GOOD.replace("advert_interval: 10ms", "advert_interval: .inf")) == [
        "vlans[0].instances[0].advert_interval: inf is not a duration (like 10ms or 1s)"]
    assert _errors(GOOD.replace("advert_interval: 10ms", "advert_interval: 1.0e+300")) == [
        "vlans[0].instances[0].advert_interval: 1e+300 is not a duration (like 10ms or 1s)"]


def test_duplicate_keys_are_refused_with_their_line() -> None:
    errs = _errors(GOOD.replace("priority: 150", "priority: 150\n        priority: 10"))
    assert len(errs) == 1 and "duplicate key 'priority' (first on line 9)" in errs[0]
    assert "line 10, column 9" in errs[0]


def test_deep_nesting_and_alias_bombs_give_short_errors() -> None:
    assert _errors("[" * 100_000 + "]" * 100_000)  # an error, not a RecursionError
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n"
    for i, name in enumerate("bcdefgh"):
        prev = "abcdefgh"[i]
        bomb += f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
    bomb += "node: {name: r1}\nmode: per-vlan-active\nvlans: [*h, *h, *h, *h]\n"
    assert len(bomb) < 700
    errs = _errors(bomb)
    assert sum(len(e) for e in errs) < 10_000 and len(errs) <= 51


def test_many_errors_are_capped() -> None:
    vlans = "".join(f"  - {{name: v{i}, interface: e{i}, instances: [{{vrid: 0}}]}}\n"
                    for i in range(200))
    errs = _errors(f"node: {{name: r1}}\nmode: per-vlan-active\nvlans:\n{vlans}")
    assert len(errs) == 51 and errs[-1].startswith("... and ")


def test_file_size_and_encoding(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20))
    with pytest.raises(ConfigError) as ei:
        load(big)
    assert ei.value.errors == ["(file): over 1048576 bytes: refused"]
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(GOOD.replace("r1", "r\xe9").encode("latin-1"))
    with pytest.raises(ConfigError) as ei:
        load(latin)
    assert ei.value.errors[0].startswith("(file): not UTF-8 (byte ")


def test_falsy_values_are_values() -> None:
    cfg = loads(GOOD.replace("control_socket: /run/vipd/test.sock",
                             "control_socket: /run/vipd/test.sock, control_socket_mode: 0"))
    assert cfg.node.control_socket_mode == 0
    inst = loads(GOOD.replace("preempt: true", "preempt: false")).vlans[0].instances[0]
    assert inst.preempt is False


def test_check_config_names_the_file_once(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("vlans: [}")
    ko = subprocess.run([sys.executable, "-m", "vipd", "check-config", str(bad)],
                        capture_output=True, text=True)
    assert ko.returncode == 1 and ko.stderr.count(str(bad)) == 1, ko.stderr
    assert "Traceback" not in ko.stderr


_yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["node", "mode", "vlans", "name", "interface",
                                       "instances", "vrid", "priority", "vips", "garp",
                                       "advert_interval", "sync", "peers", "x"]),
                      inner, max_size=5),
    max_leaves=30)


@settings(max_examples=400)
@given(_yaml_values)
def test_parse_only_ever_raises_config_error(data: object) -> None:
    from vipd.config import parse

    try:
        parse(data)
    except ConfigError as exc:
        assert exc.errors and all(isinstance(e, str) and len(e) < 2000 for e in exc.errors)


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_loads_only_ever_raises_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        loads(text)


def test_sync_section_options_and_key_file_permissions(tmp_path: Path) -> None:
    from vipd.config import load_sync_key

    base = GOOD.replace("key_file: /etc/vipd/k}",
                        "key_file: /etc/vipd/k, node_id: 7, alive_interval: 200ms, "
                        "protocols: [tcp, udp], ignore: [192.0.2.0/24, '2001:db8::1'], "
                        "zones: [0, 7]}")
    s = loads(base).sync
    assert s is not None
    assert (s.node_id, s.effective_node_id, s.alive_interval_ms) == (7, 7, 200)
    assert s.protocols == frozenset({6, 17}) and len(s.ignore) == 2
    assert s.zones == frozenset({0, 7})
    assert loads(GOOD).sync.effective_node_id == int(IPv4Address("203.0.113.1"))  # type: ignore[union-attr]
    for bad, why in (("protocols: [tcp, bogus]", "is not a list of protocols"),
                     ("alive_interval: 11s", "is not 1 ms to 10 s"),
                     ("node_id: 0", "is not a node id"),
                     ("zones: [70000]", "is not a list of conntrack zones")):
        with pytest.raises(ConfigError) as exc:
            loads(GOOD.replace("key_file: /etc/vipd/k}", f"key_file: /etc/vipd/k, {bad}}}"))
        assert why in "; ".join(exc.value.errors)
    with pytest.raises(ConfigError) as exc:
        loads(GOOD.replace(", key_file: /etc/vipd/k}", "}"))
    assert exc.value.errors == ["sync.key_file: is required"]
    key = tmp_path / "sync.key"
    key.write_bytes(b"0123456789abcdef0123456789abcdef\n")
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="can be read or written by others"):
        load_sync_key(str(key))
    key.chmod(0o600)
    assert load_sync_key(str(key)) == b"0123456789abcdef0123456789abcdef"
    key.write_bytes(b"short")
    with pytest.raises(ConfigError, match="16 to 4096 bytes"):
        load_sync_key(str(key))


def test_vipd_cli_help_version_and_check_config_help() -> None:
    from vipd import __version__

    out = subprocess.run([sys.executable, "-m", "vipd", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "check-config" in out.stdout
    out = subprocess.run([sys.executable, "-m", "vipd", "--version"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"vipd {__version__}"
    out = subprocess.run([sys.executable, "-m", "vipd", "check-config", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "usage: vipd check-config FILE" in out.stdout


def test_errors_in_a_file_name_their_yaml_line(tmp_path: Path) -> None:
    text = """node: {name: r1}
mode: per-vlan-active
vlans:
  - name: a
    interface: lan0
    instances:
      - vrid: 1
        vips:
          - 192.0.2.1/24
          - 192.0.2.300/24
        bogus: 1
      - priority: 20
        vips: [192.0.2.2/24]
"""
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load(f)
    errors = exc.value.errors
    assert "vlans[0].instances[0].vips[1] (line 10): '192.0.2.300/24' is not an IP " \
        "address" in errors
    assert any(e.startswith("vlans[0].instances[0].bogus (line 11): unknown key") for e in errors)
    # a missing key: the line of what should hold it
    assert "vlans[0].instances[1].vrid (line 12): is required" in errors, errors
