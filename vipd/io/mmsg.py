"""recvmmsg(2) through ctypes: many datagrams, with their control messages and source
addresses, in one system call into buffers allocated once.

Python's socket module has no recvmmsg. A backup at 1000 virtual routers reads 1000
adverts a second in bursts of hundreds; one recvmsg per packet (a call, a tuple, a list of
control-message tuples and a source address formatted as text, each) was a third of its
receive path. Here a burst costs one call, and each packet one bytes slice per buffer.

Linux only (x86_64 and other LP64 ABIs: the structure layouts below are for 64-bit
pointers). `available()` says whether it can be used; callers fall back to recvmsg.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct

MSG_DONTWAIT = 0x40

_libc: ctypes.CDLL | None = None


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.c_void_p), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


def _load() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and ctypes.sizeof(ctypes.c_void_p) == 8:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            lib.recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint,
                                     ctypes.c_int, ctypes.c_void_p]
            lib.recvmmsg.restype = ctypes.c_int
            _libc = lib
        except (OSError, AttributeError):
            return None
    return _libc


def available() -> bool:
    return _load() is not None


class MmsgReader:
    """Reads up to `count` datagrams per call from a non-blocking socket's `fd`."""

    def __init__(self, fd: int, count: int, data_size: int, control_size: int,
                 name_size: int = 28) -> None:
        lib = _load()
        if lib is None:
            raise OSError(errno.ENOSYS, "recvmmsg is not available")
        self._recvmmsg = lib.recvmmsg
        self.fd, self.count = fd, count
        self.data_size, self.control_size, self.name_size = data_size, control_size, name_size
        self._data = ctypes.create_string_buffer(count * data_size)
        self._control = ctypes.create_string_buffer(count * control_size)
        self._names = ctypes.create_string_buffer(count * name_size)
        self._iov = (_Iovec * count)()
        self._msgs = (_Mmsghdr * count)()
        base_d, base_c = ctypes.addressof(self._data), ctypes.addressof(self._control)
        base_n = ctypes.addressof(self._names)
        for i in range(count):
            self._iov[i].base, self._iov[i].len = base_d + i * data_size, data_size
            h = self._msgs[i].hdr
            h.iov, h.iovlen = ctypes.addressof(self._iov[i]), 1
            h.name = base_n + i * name_size
            h.control = base_c + i * control_size
            h.namelen, h.controllen = name_size, control_size
        self._dirty = 0  # how many headers the last call used
        self._msgs_addr = ctypes.addressof(self._msgs)
        # the kernel writes each message's lengths back: read them from the raw array
        assert ctypes.sizeof(_Mmsghdr) == _MMSGHDR.size
        self._view = memoryview(self._msgs).cast("B")
        self._data_view = memoryview(self._data).cast("B")
        self._control_view = memoryview(self._control).cast("B")
        self._names_view = memoryview(self._names).cast("B")

    def read(self, limit: int) -> list[tuple[bytes, memoryview, memoryview, bool]]:
        """(data, control messages, source address, truncated) per datagram; [] when
        nothing is queued. Other errors raise OSError. The control messages and the
        address are views of the reader's buffers: valid until the next read."""
        n = min(limit, self.count)
        msgs = self._msgs
        for i in range(self._dirty):  # the kernel shrank these to what it wrote last time
            h = msgs[i].hdr
            h.namelen, h.controllen = self.name_size, self.control_size
        got = self._recvmmsg(self.fd, self._msgs_addr, n, MSG_DONTWAIT, None)
        self._dirty = max(got, 0)
        if got < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return []
            raise OSError(err, os.strerror(err))
        out = []
        ds, cs, ns = self.data_size, self.control_size, self.name_size
        data, control, names = self._data_view, self._control_view, self._names_view
        for i, (_n, nlen, _i, _il, _c, clen, flags, length) in enumerate(
                _MMSGHDR.iter_unpack(self._view[:got * _MMSGHDR.size])):
            d, c, a = i * ds, i * cs, i * ns
            # (the kernel writes at most the buffer sizes: only an address reports its
            # full length)
            out.append((bytes(data[d:d + length]), control[c:c + clen],
                        names[a:a + min(nlen, ns)], bool(flags & _TRUNCATED)))
        return out


# struct mmsghdr on LP64: msghdr (name, namelen, iov, iovlen, control, controllen, flags),
# then msg_len, padded to 64 bytes
_MMSGHDR = struct.Struct("=QI4xQQQQi4xI4x")
_TRUNCATED = 0x20 | 0x08  # MSG_TRUNC, MSG_CTRUNC
_CMSG_HDR = struct.Struct("=Qii")


def cmsgs(control: bytes | memoryview) -> list[tuple[int, int, bytes | memoryview]]:
    """Split a control buffer into (level, type, data), as socket.recvmsg returns them."""
    out: list[tuple[int, int, bytes | memoryview]] = []
    off, end = 0, len(control)
    while off + _CMSG_HDR.size <= end:
        length, level, ctype = _CMSG_HDR.unpack_from(control, off)
        if length < _CMSG_HDR.size or off + length > end:
            break
        out.append((level, ctype, control[off + _CMSG_HDR.size:off + length]))
        off += (length + 7) & ~7
    return out
