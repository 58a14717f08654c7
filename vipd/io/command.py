"""Run an operator's command (a notify hook, a track script) without blocking the loop:
no shell, its own process group (killed whole at the timeout), optionally as another user.
One copy for every caller."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

OK, FAILED, TIMED_OUT, CANNOT_START = "ok", "failed", "timed_out", "cannot_start"


@dataclass(frozen=True)
class Outcome:
    status: str  # OK, FAILED (non-zero exit), TIMED_OUT (killed), CANNOT_START
    returncode: int | None = None
    detail: str = ""  # the start error, or the start of what it wrote to stderr


def _user_ids(user: str) -> dict[str, object]:
    """Popen arguments that run the child as `user` (its uid, primary gid, no extra
    groups); none when `user` is empty or already who we are."""
    if not user:
        return {}
    import pwd

    pw = pwd.getpwnam(user)
    if pw.pw_uid == os.geteuid():
        return {}
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


async def run_command(argv: Sequence[str], timeout_s: float,
                      env: Mapping[str, str] | None = None, user: str = "") -> Outcome:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, env={**os.environ, **(env or {})}, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, **_user_ids(user))  # type: ignore[arg-type]
    except (OSError, KeyError, ValueError) as exc:
        return Outcome(CANNOT_START, None, str(exc))
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # our child's own group, by its pid
        await proc.wait()
        return Outcome(TIMED_OUT, None, f"killed after {timeout_s:g} s")
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    detail = (err or b"").decode(errors="replace").strip()[:200]
    if proc.returncode != 0:
        return Outcome(FAILED, proc.returncode, detail)
    return Outcome(OK, 0, detail)
