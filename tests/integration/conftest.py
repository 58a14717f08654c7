"""Integration fixtures: a fresh namespace lab per test, always torn down."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "netns-lab"))

from lab import Lab, Topology  # noqa: E402


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "integration tests need root (network namespaces)"
    if shutil.which("ip") is None:
        return "iproute2 is not installed"
    if not Path("/sys/module/veth").exists() and not Path("/sys/class/net").exists():
        return "kernel without veth support"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _skip_reason()
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(Topology.load()) as lab:
        yield lab
