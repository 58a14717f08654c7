"""systemd's notification protocol (sd_notify(3)), without libsystemd: datagrams to
$NOTIFY_SOCKET. READY=1 once the daemon runs its elections, STATUS= lines, STOPPING=1, and
WATCHDOG=1 at half of $WATCHDOG_USEC from the event loop (a hung loop stops the pings and
systemd restarts the service). Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
from collections import deque


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        if path.startswith("@"):  # an abstract socket
            path = "\0" + path[1:]
        self.address = path or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine \
            else None
        self.sent: deque[str] = deque(maxlen=16)  # the last messages (tests); bounded,
        # since watchdog pings go on for as long as the daemon runs

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        if self.address is None:
            return False
        message = "\n".join(fields)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(message.encode(), self.address)
        except OSError:
            return False
        self.sent.append(message)
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping: releasing mastership")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")
