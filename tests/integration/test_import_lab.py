"""The importer's round trip: keepalived's configuration of the pair, converted by
`vipctl import-keepalived`, elects the same master as keepalived with the original, and a
converted node runs beside a keepalived node as its peer."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import yaml
from lab import Lab, wait_for
from scenario import (
    holder,
    keepalived_available,
    keepalived_config,
    start_keepalived,
    start_vipd,
    states,
    status,
)

INTERVAL = 100


def imported(lab: Lab, router: str, priority: int, **kw: Any) -> dict[str, Any]:
    src = lab.workdir / f"{router}.keepalived-orig.conf"
    src.write_text(keepalived_config(lab, router, priority, INTERVAL, **kw))
    p = subprocess.run([sys.executable, "-m", "vipd.vipctl", "import-keepalived", str(src)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    cfg: dict[str, Any] = yaml.safe_load(p.stdout)
    cfg["node"]["control_socket"] = str(lab.workdir / f"{router}.sock")
    return cfg


pytestmark = pytest.mark.skipif(not keepalived_available(), reason="keepalived is not "
                                "installed (the round trip compares with it)")


@pytest.mark.parametrize("sync_group", [False, True])
def test_imported_configs_elect_the_masters_keepalived_elects(lab: Lab,
                                                              sync_group: bool) -> None:
    # keepalived with the originals: who is master of each VLAN
    k1 = start_keepalived(lab, "r1", 200, INTERVAL, sync_group=sync_group)
    k2 = start_keepalived(lab, "r2", 100, INTERVAL, sync_group=sync_group)
    wait_for(lambda: holder(lab, "lanA") == ["r1"] and holder(lab, "lanB") == ["r1"], 10,
             what="keepalived elects r1")
    lab.stop_process(k2.proc)
    lab.stop_process(k1.proc)
    wait_for(lambda: holder(lab, "lanA") == [] and holder(lab, "lanB") == [], 5,
             what="keepalived gone")
    # vipd with the converted ones: the same
    c1 = imported(lab, "r1", 200, sync_group=sync_group)
    c2 = imported(lab, "r2", 100, sync_group=sync_group)
    assert c1["mode"] == ("single-active" if sync_group else "per-vlan-active")
    r1 = start_vipd(lab, "r1", c1)
    r2 = start_vipd(lab, "r2", c2)
    wait_for(lambda: holder(lab, "lanA") == ["r1"] and holder(lab, "lanB") == ["r1"], 10,
             what="vipd elects r1 too")
    wait_for(lambda: set(states(lab, r2)) == {"BACKUP"}, 3, what="r2 backup")
    assert status(lab, r1)["healthy"], status(lab, r1)["problems"]


def test_an_imported_node_is_a_peer_of_a_keepalived_node(lab: Lab) -> None:
    ka = start_keepalived(lab, "r1", 200, INTERVAL)
    r2 = start_vipd(lab, "r2", imported(lab, "r2", 100))
    wait_for(lambda: holder(lab, "lanA") == ["r1"] and holder(lab, "lanB") == ["r1"], 10,
             what="keepalived master")
    wait_for(lambda: set(states(lab, r2)) == {"BACKUP"}, 3, what="imported vipd backup")
    st = status(lab, r2)
    assert all(not i["drops"] for i in st["instances"]), [i["drops"] for i in st["instances"]]
    lab.stop_process(ka.proc)  # keepalived's priority 0: the imported node takes over
    wait_for(lambda: holder(lab, "lanA") == ["r2"] and holder(lab, "lanB") == ["r2"], 3,
             what="vipd takes over")
