"""vipctl import-keepalived: keepalived's VRRP configuration as a vipd configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vipd.config import Mode, loads, router_specs
from vipd.keepalived_import import convert

SAMPLES = Path("/usr/share/doc/keepalived/samples")


def samples() -> list[Path]:
    return sorted(SAMPLES.glob("keepalived.conf.*")) if SAMPLES.is_dir() else []


@pytest.mark.skipif(not samples(), reason="the keepalived package's samples are not "
                    "installed (/usr/share/doc/keepalived/samples)")
def test_every_debian_sample_with_vrrp_converts_to_a_config_vipd_accepts() -> None:
    converted = 0
    for path in samples():
        text = path.read_text(errors="replace")
        cfg, notes = convert(text)
        if "vrrp_instance" not in text:
            assert "no vrrp_instance found" in notes, path
            continue
        got = loads(yaml.safe_dump(cfg))  # raises with every error if vipd refused it
        assert got.vlans, path
        converted += 1
    assert converted >= 8


DOC_STYLE = """
! as keepalived's documentation writes it
global_defs {
   router_id fw1
   vrrp_version 3
}
vrrp_script chk_gw {
    script "/usr/local/bin/check-gw 203.0.113.254"
    interval 2
    timeout 1
    weight -50
    rise 2
    fall 3
    user nobody
}
vrrp_script chk_haproxy {
    script "killall -0 haproxy"   # a bare command: run through /bin/sh
    interval 1
}
vrrp_track_file load {
    file /run/load-level
}
vrrp_sync_group EDGE {
    group {
        VI_A
        VI_B
    }
    track_interface {
        wan0
    }
    notify_master "/usr/local/bin/edge-master"
}
vrrp_instance VI_A {
    state MASTER
    interface lanA
    virtual_router_id 51
    priority 200
    advert_int 0.1
    nopreempt
    virtual_ipaddress {
        192.0.2.1/24 dev lanA
    }
    track_script {
        chk_gw
    }
}
vrrp_instance VI_B {
    interface lanB
    virtual_router_id 52
    priority 200
    advert_int 0.1
    virtual_ipaddress {
        198.51.100.1/24
        2001:db8:b::1/64
    }
}
vrrp_instance VI_C {
    interface lanC
    virtual_router_id 53
    priority 150
    advert_int 1
    preempt_delay 5
    unicast_src_ip 203.0.113.130
    unicast_peer {
        203.0.113.131
    }
    virtual_ipaddress {
        203.0.113.129
    }
    track_script {
        chk_haproxy weight 20
    }
    track_file {
        load weight -5
    }
    track_interface {
        uplink0 weight -30
    }
    authentication {
        auth_type PASS
        auth_pass secret
    }
}
virtual_server 192.0.2.10 80 {
    lb_algo rr
}
"""


def test_a_documentation_style_config_converts_field_by_field() -> None:
    cfg, notes = convert(DOC_STYLE)
    assert cfg["node"] == {"name": "fw1"} and cfg["mode"] == "per-vlan-active"
    t = cfg["trackers"]
    assert t["chk_gw"] == {"script": ["/usr/local/bin/check-gw", "203.0.113.254"],
                           "interval": "2000ms", "timeout": "1000ms", "weight": -50,
                           "rise": 2, "fall": 3, "user": "nobody"}
    assert t["chk_haproxy"]["script"] == ["/bin/sh", "-c", "killall -0 haproxy"]
    assert t["load"] == {"file": "/run/load-level", "weight": 1}
    assert t["if-wan0"] == {"interface": "wan0"} and t["if-uplink0"] == {"interface": "uplink0"}
    # the group's members move together: the weighted chk_gw of VI_A goes to the group
    assert cfg["groups"] == {"EDGE": {"vlans": ["lanA", "lanB"],
                                      "track": ["if-wan0", "chk_gw"]}}
    assert cfg["notify"] == {"master": ["/usr/local/bin/edge-master"]}
    a, b, c = (v["instances"][0] for v in cfg["vlans"])
    assert (a["vrid"], a["priority"], a["version"], a["advert_interval"], a["preempt"]) == (
        51, 200, 3, "100ms", False)
    assert "track" not in a and a["accept_mode"] is True
    assert b["vips"] == ["198.51.100.1/24", "2001:db8:b::1/64"]
    assert b["advertise_link_local"] is False  # keepalived lists only the VIPs
    assert c["vips"] == ["203.0.113.129/32"] and c["unicast_peers"] == ["203.0.113.131"]
    assert c["preempt_delay"] == "5000ms"
    assert c["track"] == [{"name": "if-uplink0", "weight": -30},
                          {"name": "chk_haproxy", "weight": 20},
                          {"name": "load", "weight": -5}]
    assert any("authentication not converted" in n for n in notes)
    assert any("virtual_server" in n for n in notes)
    got = loads(yaml.safe_dump(cfg))
    assert got.mode is Mode.PER_VLAN_ACTIVE
    specs = {s.vlan: s for s in router_specs(got)}
    assert specs["lanA"].group == "EDGE" and specs["lanC"].group is None


def test_one_sync_group_of_everything_is_single_active() -> None:
    text = DOC_STYLE.replace("        VI_B\n", "        VI_B\n        VI_C\n")
    cfg, notes = convert(text)
    assert cfg["mode"] == "single-active" and "groups" not in cfg
    assert cfg["track"][:2] == ["if-wan0", "chk_gw"]
    assert any("moved to the node's track list" in n for n in notes)
    loads(yaml.safe_dump(cfg))


def test_the_command_writes_yaml_and_lists_notes(tmp_path: Path) -> None:
    src = tmp_path / "keepalived.conf"
    src.write_text(DOC_STYLE)
    out = tmp_path / "vipd.yaml"
    p = subprocess.run([sys.executable, "-m", "vipd.vipctl", "import-keepalived", str(src),
                        "--name", "r1", "-o", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "vrrp_instance VI_C: authentication not converted" in p.stderr
    check = subprocess.run([sys.executable, "-m", "vipd", "check-config", str(out)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert yaml.safe_load(out.read_text())["node"]["name"] == "r1"
    missing = subprocess.run([sys.executable, "-m", "vipd.vipctl", "import-keepalived",
                              str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 3
