"""One vipd per control socket and per interface: refuse to start before touching anything.

A second vipd started by mistake used to take over the control socket, delete the running
master's VIPs as "leftovers", become master too, and on exit delete the socket, the nftables
table and the VIPs. Two claims prevent that, and neither can go stale:
  * an flock on `<control socket>.lock` (released by the kernel when the holder dies, so a
    lock left by kill -9 is simply taken over; the file's PID is for the error message);
  * an abstract Unix socket per managed interface, `@vipd/if/<name>`, which lives in this
    network namespace and disappears with its process, so two daemons can never drive the
    same interface of one namespace, whatever their socket paths.
Paths are opened with O_NOFOLLOW; a directory we create gets an explicit mode.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
from collections.abc import Iterable


class AlreadyRunning(OSError):
    pass


def ensure_dir(path: str, mode: int = 0o755) -> None:
    """Create a missing directory with an explicit mode (not the umask's)."""
    if not path or os.path.isdir(path):
        return
    parent = os.path.dirname(path.rstrip("/"))
    if parent and parent != path:
        ensure_dir(parent, mode)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
        os.chmod(path, mode)


class InstanceLock:
    def __init__(self, control_path: str, claim_prefix: str = "vipd/if/") -> None:
        self.path = control_path + ".lock"
        self.claim_prefix = claim_prefix  # tests use their own, to run side by side
        self._fd: int | None = None
        self._claims: dict[str, socket.socket] = {}

    def acquire(self) -> None:
        ensure_dir(os.path.dirname(self.path))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise AlreadyRunning(errno.EEXIST, f"{self.path} is not a regular file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise AlreadyRunning(errno.EEXIST, f"another vipd (pid {holder}) holds "
                                     f"{self.path}: refusing to start") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def claim_interfaces(self, names: Iterable[str]) -> None:
        """Claim every interface not claimed yet; all or none."""
        new: dict[str, socket.socket] = {}
        try:
            for name in sorted(set(names) - set(self._claims)):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
                new[name] = s
                try:
                    s.bind(f"\0{self.claim_prefix}{name}")
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
                    raise AlreadyRunning(errno.EEXIST, f"interface {name} is already driven "
                                         "by another vipd in this network namespace: "
                                         "refusing") from None
        except BaseException:
            for s in new.values():
                s.close()
            raise
        self._claims.update(new)

    def release_interfaces(self, keep: Iterable[str]) -> None:
        for name in set(self._claims) - set(keep):
            self._claims.pop(name).close()

    def release(self) -> None:
        self.release_interfaces(())
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # the lock file itself stays: unlinking it would race
            self._fd = None
