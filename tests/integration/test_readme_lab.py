"""The README's lab walk-through, run as written: its shell block under "## The lab"."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def walkthrough() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## The lab\n"):]
    m = re.search(r"```sh\n(.*?)```", section, re.S)
    assert m, "no shell block in the README's lab section"
    return m.group(1)


def test_the_readme_lab_walkthrough_works_as_written() -> None:
    block = walkthrough()
    assert "lab.py down $P" in block and "ping -c" in block
    # as written; should it fail half way, the lab it made is removed all the same
    script = ("set -euo pipefail\n"
              "trap '[ -n \"${P:-}\" ] && .venv/bin/python netns-lab/lab.py down \"$P\" "
              ">/dev/null 2>&1 || true' EXIT\n" + block + "echo \"PREFIX=$P\"\n")
    p = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    summaries = re.split(r"^node (r\d)  ", out, flags=re.M)
    # r1's summary: master of all four; r2's after the cut: master of all four
    r1 = summaries[summaries.index("r1") + 1]
    r2 = summaries[summaries.index("r2") + 1]
    for text in (r1, r2):
        rows = [line for line in text.splitlines() if line.startswith("lan")]
        assert len(rows) == 4 and all(" MASTER " in r and " self " in r for r in rows), text
    assert out.count("3 packets transmitted, 3 received") == 2, out
    prefix = re.search(r"^PREFIX=(\w+)$", out, re.M)
    assert prefix
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{prefix.group(1)}-" not in left  # `down` removed everything
    procs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"vipd-lab-{prefix.group(1)}/" not in procs  # and ended the vipds it started
