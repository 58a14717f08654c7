"""Metrics scraped over HTTP inside a router's namespace and checked against status."""

from __future__ import annotations

import sys

from lab import Lab, wait_for
from scenario import start_vipd, status, vipd_config

SCRAPE = """
import sys, urllib.request
print(urllib.request.urlopen("http://127.0.0.1:9765/metrics", timeout=5).read().decode())
"""


def test_metrics_scraped_match_status(lab: Lab) -> None:
    cfg = vipd_config(lab, "r1", 200, 100)
    cfg["node"]["metrics"] = "127.0.0.1:9765"
    sp = start_vipd(lab, "r1", cfg)
    wait_for(lambda: "MASTER" in [i["state"] for i in status(lab, sp)["instances"]], 10,
             what="r1 master")
    text = lab.run("r1", [sys.executable, "-c", SCRAPE]).stdout
    st = status(lab, sp)
    for i in st["instances"]:
        line = (f'vipd_router_state{{router="{i["name"]}",vlan="{i["vlan"]}",'
                f'interface="{i["interface"]}",vrid="{i["vrid"]}",family="{i["family"]}",'
                f'state="{i["state"]}"}} 1')
        assert line in text.splitlines(), line
    assert "# TYPE vipd_router_adverts_sent_total counter" in text
    assert any(x.startswith("vipd_loop_lag_seconds ") for x in text.splitlines())
    bad = lab.run("r1", [sys.executable, "-c", SCRAPE.replace("/metrics", "/other")],
                  check=False)
    assert bad.returncode != 0 and "404" in bad.stderr
