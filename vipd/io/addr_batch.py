"""Add and remove many addresses in one netlink round trip (a lean struct-based codec).

pyroute2 sends one request and waits for its answer per address: 1000 VIPs taking over at
once cost about 0.3 s that way. Here every RTM_NEWADDR / RTM_DELADDR of a change set goes
out in as few datagrams as fit, each with its own sequence number and an ack requested;
rtnetlink handles them in order, in the sender's context, so the acks are queued by the
time sendmsg returns. Adding what is there (NLM_F_REPLACE) and removing what is not
(EADDRNOTAVAIL, ENODEV) both succeed: the operation is idempotent, like `ip addr replace`.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import struct
import threading
from collections.abc import Sequence

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Op = tuple[bool, int, IPInterface]  # add?, ifindex, address/prefix

NETLINK_ROUTE = 0
RTM_NEWADDR, RTM_DELADDR = 20, 21
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_NODAD = 0x02
_HDR = struct.Struct("=IHHII")
_IFADDR = struct.Struct("=BBBBI")
MAX_DATAGRAM = 32 * 1024


def _attr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def message(op: Op, seq: int) -> bytes:
    add, index, addr = op
    ip = addr.ip
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    flags = 0
    attrs = _attr(IFA_ADDRESS, ip.packed)
    if ip.version == 4:
        attrs += _attr(IFA_LOCAL, ip.packed)
    elif add:
        flags = IFA_F_NODAD  # a VIP that waits for DAD is useless for a second
        attrs += _attr(IFA_FLAGS, struct.pack("=I", IFA_F_NODAD))
    body = _IFADDR.pack(family, addr.network.prefixlen, flags, 0, index) + attrs
    kind = RTM_NEWADDR if add else RTM_DELADDR
    nl_flags = NLM_F_REQUEST | NLM_F_ACK | ((NLM_F_CREATE | NLM_F_REPLACE) if add else 0)
    return _HDR.pack(_HDR.size + len(body), kind, nl_flags, seq, 0) + body


def acks(data: bytes) -> list[tuple[int, int]]:
    """(sequence number, errno) of every NLMSG_ERROR in a datagram (errno 0: success)."""
    out = []
    offset = 0
    while offset + _HDR.size <= len(data):
        length, kind, _flags, seq, _pid = _HDR.unpack_from(data, offset)
        if length < _HDR.size or offset + length > len(data):
            break
        if kind == NLMSG_ERROR and length >= _HDR.size + 4:
            (err,) = struct.unpack_from("=i", data, offset + _HDR.size)
            out.append((seq, -err))
        offset += (length + 3) & ~3
    return out


def harmless(add: bool, err: int) -> bool:
    return err == 0 or (not add and err in (errno.EADDRNOTAVAIL, errno.ENODEV)) or (
        add and err == errno.EEXIST)


class AddrBatcher:
    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   NETLINK_ROUTE)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._sock.bind((0, 0))
        self._sock.setblocking(False)
        self._seq = 0
        self._lock = threading.Lock()  # a large batch may run in a worker thread

    def close(self) -> None:
        self._sock.close()

    def apply(self, ops: Sequence[Op]) -> list[OSError | None]:
        """Carry out every operation, in order; one result per operation."""
        with self._lock:
            return self._apply(ops)

    def _apply(self, ops: Sequence[Op]) -> list[OSError | None]:
        results: list[OSError | None] = [None] * len(ops)
        pending: dict[int, int] = {}
        chunk = b""
        for i, op in enumerate(ops):
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            msg = message(op, self._seq)
            pending[self._seq] = i
            if len(chunk) + len(msg) > MAX_DATAGRAM:
                self._send(chunk)
                chunk = b""
            chunk += msg
        if chunk:
            self._send(chunk)
        deadline_polls = 200  # rtnetlink answers in the sender's context: rarely any wait
        while pending and deadline_polls:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                select.select([self._sock], [], [], 0.005)
                deadline_polls -= 1
                continue
            for seq, err in acks(data):
                i = pending.pop(seq, -1)
                if i >= 0 and not harmless(ops[i][0], err):
                    results[i] = OSError(err, os.strerror(err))
        for i in pending.values():
            results[i] = OSError(errno.ETIMEDOUT, "no answer from rtnetlink")
        return results

    def _send(self, chunk: bytes) -> None:
        self._sock.setblocking(True)
        try:
            self._sock.sendto(chunk, (0, 0))
        finally:
            self._sock.setblocking(False)
