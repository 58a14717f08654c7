"""The configuration reference and the parser are one table (vipd/config_schema.py): every
documented key is read and checked by the parser at its documented path, a documented
default is the parser's default, and docs/config.md is the table rendered."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from vipd.config import ConfigError, loads
from vipd.config_schema import REQUIRED, SECTIONS, Derived, Key, render

ROOT = Path(__file__).resolve().parent.parent
SYNC = {"interface": "sync0", "local": "203.0.113.1", "peers": ["203.0.113.2"],
        "key_file": "/etc/vipd/sync.key"}


def base(mode: str) -> dict[str, Any]:
    """A minimal valid configuration in `mode`, with one tracker `t` to refer to."""
    doc: dict[str, Any] = {"node": {"name": "r1"}, "mode": mode,
                           "trackers": {"t": {"interface": "up0"}}}
    if mode == "all-active":
        doc["cluster"] = {"members": ["r1", "r2"]}
        doc["sync"] = dict(SYNC)
        doc["vlans"] = [{"name": "a", "interface": "lanA", "vips": ["192.0.2.1/24"]},
                        {"name": "b", "interface": "lanB", "vips": ["198.51.100.1/24"]}]
    else:
        doc["vlans"] = [
            {"name": "a", "interface": "lanA",
             "instances": [{"vrid": 1, "vips": ["192.0.2.1/24"]}]},
            {"name": "b", "interface": "lanB",
             "instances": [{"vrid": 2, "vips": ["198.51.100.1/24"]}]}]
    return doc


def mode_for(sid: str, k: Key) -> str:
    if sid == "cluster":
        return "all-active"
    return k.modes[0] if k.modes else "per-vlan-active"


ABSENT = object()  # place(): leave the key out


def place(sid: str, k: Key, value: object) -> tuple[dict[str, Any], str]:
    """A configuration with `value` at key `k` of section `sid` (or without the key, for
    ABSENT), and the path errors about that key start with."""
    doc = base(mode_for(sid, k))
    inst = doc["vlans"][0].get("instances", [{}])[0]
    holder: dict[str, Any]
    if sid == "top":
        holder, path = doc, k.name
    elif sid == "node":
        holder, path = doc["node"], f"node.{k.name}"
    elif sid == "vlan":
        holder, path = doc["vlans"][0], f"vlans[0].{k.name}"
    elif sid == "instance":
        holder, path = inst, f"vlans[0].instances[0].{k.name}"
    elif sid == "garp":
        holder = inst["garp"] = {}
        path = f"vlans[0].instances[0].garp.{k.name}"
    elif sid == "tracker":
        holder = doc["trackers"]["x"] = {} if k.name in ("interface", "script", "file") \
            else {"script": ["/bin/true"]}
        path = f"trackers.x.{k.name}"
    elif sid == "ref":
        holder = {} if k.name == "name" else {"name": "t"}
        doc["track"] = [holder]
        path = "track[0]"
    elif sid == "group":
        holder = doc["groups"] = {"g": {"vlans": ["a", "b"]}}
        holder = holder["g"]
        path = f"groups.g.{k.name}"
    elif sid == "sync":
        holder = doc["sync"] = dict(SYNC)
        path = f"sync.{k.name}"
    elif sid == "cluster":
        holder, path = doc["cluster"], f"cluster.{k.name}"
    elif sid == "notify":
        holder = doc["notify"] = {}
        path = f"notify.{k.name}"
    else:
        raise AssertionError(sid)
    holder.pop(k.name, None)
    if value is not ABSENT:
        holder[k.name] = copy.deepcopy(value)
    return doc, path


def parse(doc: dict[str, Any]) -> Any:
    # through YAML text, as a file is read (line numbers and the C loader included)
    return loads(yaml.safe_dump(doc, sort_keys=False))


KEYS = [(sid, k) for sid, s in SECTIONS.items() for k in s.keys]
IDS = [f"{sid}.{k.name}" for sid, k in KEYS]


def test_the_minimal_configurations_are_valid() -> None:
    for mode in ("single-active", "per-vlan-active", "all-active"):
        parse(base(mode))


@pytest.mark.parametrize(("sid", "k"), KEYS, ids=IDS)
def test_each_documented_key_is_read_and_checked_at_its_path(sid: str, k: Key) -> None:
    parse(place(sid, k, k.example)[0])
    doc, path = place(sid, k, k.bad)
    with pytest.raises(ConfigError) as exc:
        parse(doc)
    assert any(e.startswith(path) for e in exc.value.errors), (path, exc.value.errors)


@pytest.mark.parametrize(("sid", "k"), [(s, k) for s, k in KEYS
                                        if k.default not in (REQUIRED, None)
                                        and not isinstance(k.default, Derived)],
                         ids=[i for i, (s, k) in zip(IDS, KEYS, strict=True)
                              if k.default not in (REQUIRED, None)
                              and not isinstance(k.default, Derived)])
def test_a_documented_default_is_what_leaving_the_key_out_gives(sid: str, k: Key) -> None:
    assert parse(place(sid, k, k.default)[0]) == parse(place(sid, k, ABSENT)[0])


@pytest.mark.parametrize(("sid", "k"), [(s, k) for s, k in KEYS if k.default is REQUIRED
                                        and s not in ("ref",)],
                         ids=[i for i, (s, k) in zip(IDS, KEYS, strict=True)
                              if k.default is REQUIRED and s != "ref"])
def test_a_required_key_left_out_is_an_error(sid: str, k: Key) -> None:
    doc, path = place(sid, k, ABSENT)
    with pytest.raises(ConfigError) as exc:
        parse(doc)
    assert any(e.startswith(path) for e in exc.value.errors), (path, exc.value.errors)


def test_an_undocumented_key_is_refused_in_every_section() -> None:
    for sid, s in SECTIONS.items():
        k = next(iter(s.keys))
        doc, path = place(sid, k, k.example)
        target: Any = doc
        for part in path.replace("[", ".").replace("]", "").split(".")[:-1]:
            target = target[int(part)] if part.isdigit() else target[part]
        if isinstance(target, list):
            target = target[0]
        target["no_such_key"] = 1
        with pytest.raises(ConfigError) as exc:
            parse(doc)
        assert any("no_such_key: unknown key" in e for e in exc.value.errors), sid


def test_docs_config_md_is_the_rendered_table() -> None:
    assert (ROOT / "docs" / "config.md").read_text() == render(), (
        "docs/config.md is stale: .venv/bin/python -m vipd.config_schema > docs/config.md")

