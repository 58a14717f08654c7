"""The Prometheus exposition is derived from the status model: what a scrape says is
what `vipctl status --json` says (vipd.metrics)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from test_runtime import World, advert, fire, run
from vipd.metrics import exposition
from vipd.runtime.daemon import Daemon

LINE = re.compile(r'^([a-z_]+)(\{[^}]*\})? (-?[0-9.e+]+)$')


def parse(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = LINE.match(line)
        assert m, line
        out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def test_exposition_matches_status_and_is_well_formed(tmp_path: Path) -> None:
    async def body(w: World, d: Daemon) -> None:
        w.deliver(d, advert(200))  # a peer heard
        w.deliver(d, b"\x00" * 3)  # and something dropped
        fire(w, d)
        st = d.status()
        text = exposition(st, loop_lag_s=0.001, version="test")
        m = parse(text)
        i = st["instances"][0]
        lab = ('router="lan-a/vrid 51/IPv4",vlan="lan-a",interface="lanA",vrid="51",'
               'family="IPv4"')
        assert m[f'vipd_router_state{{{lab},state="{i["state"]}"}}'] == 1
        assert sum(v for k, v in m.items() if k.startswith("vipd_router_state{")) == 1
        assert m[f"vipd_router_adverts_received_total{{{lab}}}"] == i["adverts_received"] >= 1
        assert m[f"vipd_router_effective_priority{{{lab}}}"] == i["effective_priority"]
        assert m["vipd_severity"] == {"ok": 0, "degraded": 1, "critical": 2}[st["severity"]]
        assert m["vipd_loop_lag_seconds"] == 0.001
        assert any(k.startswith("vipd_interface_drops_total{") for k in m)
        # one HELP and TYPE per metric name, before its first sample
        names = [x.split()[2] for x in text.splitlines() if x.startswith("# TYPE")]
        assert len(names) == len(set(names))

    run(tmp_path, body)


def test_label_values_are_escaped() -> None:
    st = {"node": 'a"b\\c\nd', "mode": "x", "healthy": True, "severity": "ok", "problems": [],
          "uptime_s": 1.0, "reloads": 0, "instances": [], "interfaces": []}
    line = next(x for x in exposition(st).splitlines() if x.startswith("vipd_info"))
    assert line == 'vipd_info{node="a\\"b\\\\c\\nd",mode="x",version=""} 1'


def test_trackers_and_demotions_are_exposed_as_status_says() -> None:
    st = {"node": "n", "mode": "per-vlan-active", "healthy": False, "severity": "degraded",
          "problems": ["track gw is failing"], "uptime_s": 1.0, "reloads": 0,
          "instances": [], "interfaces": [],
          "tracking": {"trackers": [
              {"name": "gw", "kind": "script", "ok": False, "value": None, "failures": 4},
              {"name": "load", "kind": "file", "ok": True, "value": 3, "failures": 0},
              {"name": "up", "kind": "interface", "ok": None, "value": None}],
              "demotions": {"edge": 20}}}
    m = parse(exposition(st))
    assert m['vipd_tracker_ok{tracker="gw",kind="script"}'] == 0
    assert m['vipd_tracker_failures_total{tracker="gw",kind="script"}'] == 4
    assert m['vipd_tracker_value{tracker="load",kind="file"}'] == 3
    assert not any("tracker=\"up\"" in k for k in m)  # no state known yet: no sample
    assert m['vipd_demotion{target="edge"}'] == 20


def test_the_reference_parser_reads_it_and_docs_metrics_md_lists_every_family(
        tmp_path: Path) -> None:
    """prometheus_client's own parser (what a Prometheus exporter library reads) accepts
    the exposition, and every family it finds is in docs/metrics.md with the same type."""
    from prometheus_client.parser import text_string_to_metric_families

    doc = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    documented = dict(re.findall(r"^\| `(vipd_[a-z_]+)` \| (counter|gauge) \|", doc, re.M))

    async def body(w: World, d: Daemon) -> None:
        w.deliver(d, advert(200))
        w.deliver(d, b"\x00" * 3)
        fire(w, d)
        text = exposition(d.status(), loop_lag_s=0.002, version="test")
        families = list(text_string_to_metric_families(text))
        assert len(families) >= 10
        for f in families:
            # the parser strips _total from a counter's family name
            name = f.name + "_total" if f.type == "counter" else f.name
            assert documented.get(name) == f.type, (name, f.type)
            assert f.samples, name

    run(tmp_path, body)


def test_each_family_is_one_group_with_many_routers(tmp_path: Path) -> None:
    """The format wants a family's samples together: with several routers the reference
    parser must still see each family once, with its declared type (it took the second
    router's samples for new families of unknown type)."""
    from prometheus_client.parser import text_string_to_metric_families
    from test_scale import daemon, fake_links

    async def main() -> None:
        d = daemon(tmp_path, "m", "per-vlan-active", 2, fake_links(), {"t": 1e9})
        await d.start()
        for _ in range(3):
            await asyncio.sleep(0)
        st = d.status()
        await d.close()
        assert len(st["instances"]) == 8
        families = list(text_string_to_metric_families(exposition(st)))
        names = [f.name for f in families]
        assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
        assert all(f.type in ("gauge", "counter") for f in families)
        state = next(f for f in families if f.name == "vipd_router_state")
        assert len(state.samples) == 8 * 4

    asyncio.run(main())
