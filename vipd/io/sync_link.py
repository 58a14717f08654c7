"""The sync link's UDP socket: unicast datagrams to and from the peers, bound to the sync
interface and our address on it. What is in the datagrams is vipd.core.sync's business."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Protocol

from vipd.core.packet import IPAddress

SO_BINDTODEVICE = 25
RECV_BATCH = 512


class SyncLink(Protocol):
    def fileno(self) -> int: ...
    def recv_all(self, limit: int = RECV_BATCH) -> list[tuple[IPAddress, bytes]]: ...
    def send(self, to: IPAddress, data: bytes) -> None: ...
    def close(self) -> None: ...


class UdpSyncLink:
    def __init__(self, interface: str, local: IPAddress, port: int) -> None:
        fam = socket.AF_INET if local.version == 4 else socket.AF_INET6
        s = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, interface.encode())
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            s.bind((str(local), port))
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        self._sock = s
        self.port = port

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv_all(self, limit: int = RECV_BATCH) -> list[tuple[IPAddress, bytes]]:
        out: list[tuple[IPAddress, bytes]] = []
        while len(out) < limit:
            try:
                data, addr = self._sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # an ICMP error from an earlier send (peer down): not data
            out.append((ipaddress.ip_address(addr[0].split("%", 1)[0]), data))
        return out

    def send(self, to: IPAddress, data: bytes) -> None:
        self._sock.sendto(data, (str(to), self.port))

    def close(self) -> None:
        self._sock.close()


@dataclass
class FakeSyncLink:
    inbox: list[tuple[IPAddress, bytes]] = field(default_factory=list)
    sent: list[tuple[IPAddress, bytes]] = field(default_factory=list)

    def fileno(self) -> int:
        return -1

    def recv_all(self, limit: int = RECV_BATCH) -> list[tuple[IPAddress, bytes]]:
        out, self.inbox = self.inbox[:limit], self.inbox[limit:]
        return out

    def send(self, to: IPAddress, data: bytes) -> None:
        self.sent.append((to, data))

    def close(self) -> None:
        pass
