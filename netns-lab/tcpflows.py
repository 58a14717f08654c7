"""Long-lived TCP flows through the routers: an echo server, and a client that keeps N
connections busy and reports which ones survived.

    tcpflows.py serve [--port 5001]
    tcpflows.py run SERVER [--flows 20] [--port 5001] [--seconds 60] [--udp]

The client sends 8 bytes per flow every 100 ms and expects them back; on SIGTERM (or after
--seconds) it prints JSON: flows, broken (an error or a reset), stalled (no echo in the last
3 s), the longest stall of any flow in ms, and the min/median/max of each flow's longest
stall.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import selectors
import signal
import socket
import sys
import time


def serve(port: int) -> None:
    sel = selectors.DefaultSelector()
    usocks, lsocks = [], []
    for fam, any_addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        usock = socket.socket(fam, socket.SOCK_DGRAM)  # UDP flows: echoed too
        if fam == socket.AF_INET6:
            usock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        usock.bind((any_addr, port))
        usock.setblocking(False)
        sel.register(usock, selectors.EVENT_READ)
        lsock = socket.socket(fam, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        lsock.bind((any_addr, port))
        lsock.listen(256)
        lsock.setblocking(False)
        sel.register(lsock, selectors.EVENT_READ)
        usocks.append(usock)
        lsocks.append(lsock)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if sock in usocks:
                with contextlib.suppress(OSError):
                    data, addr = sock.recvfrom(2048)  # type: ignore[union-attr]
                    sock.sendto(data, addr)  # type: ignore[union-attr]
                continue
            if sock in lsocks:
                conn, _ = sock.accept()  # type: ignore[union-attr]
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(4096)  # type: ignore[union-attr]
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                sock.close()  # type: ignore[union-attr]
            else:
                sock.sendall(data)  # type: ignore[union-attr]


def run(server: str, flows: int, port: int, seconds: float, udp: bool = False) -> None:
    stop = False

    def on_signal(_s: int, _f: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    sel = selectors.DefaultSelector()
    last: dict[int, float] = {}
    stall: dict[int, float] = {}
    broken: set[int] = set()
    sent: dict[int, int] = {}
    got: dict[int, int] = {}
    socks = {}
    for i in range(flows):
        if udp:
            s = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET,
                              socket.SOCK_DGRAM)
            s.connect((server, port))
        else:
            s = socket.create_connection((server, port), timeout=5)
        s.setblocking(False)
        socks[i] = s
        sel.register(s, selectors.EVENT_READ, i)
        last[i] = time.monotonic()
        stall[i] = 0.0
        sent[i] = got[i] = 0
    end = time.monotonic() + seconds
    next_send = time.monotonic()
    while not stop and time.monotonic() < end:
        now = time.monotonic()
        if now >= next_send:
            for i, s in socks.items():
                if i not in broken:
                    try:
                        s.send(b"vipdflow")
                        sent[i] += 1
                    except BlockingIOError:
                        pass
                    except OSError:
                        if not udp:  # UDP: a pending ICMP error, not the flow's end
                            broken.add(i)
            next_send = now + 0.1
        for key, _ in sel.select(timeout=0.02):
            i = key.data
            try:
                data = socks[i].recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                if udp:  # an ICMP error (unreachable meanwhile): not an end for UDP
                    continue
                data = b""
            if not data:
                broken.add(i)
                sel.unregister(socks[i])
                continue
            now = time.monotonic()
            stall[i] = max(stall[i], now - last[i])
            last[i] = now
            got[i] += len(data) // 8 if udp else 0
    now = time.monotonic()
    stalled = [i for i in socks if i not in broken and now - last[i] > 3.0]
    per_flow = sorted(max(stall[i], now - last[i]) * 1000 for i in socks)
    print(json.dumps({"flows": flows, "broken": len(broken), "stalled": len(stalled),
                      "longest_stall_ms": round(per_flow[-1] if per_flow else 0, 1),
                      # each flow's longest gap between echoes: across a failover, the
                      # time until its first round trip through the new master
                      "stall_ms_min_median_max": [round(per_flow[0], 1),
                                                  round(per_flow[len(per_flow) // 2], 1),
                                                  round(per_flow[-1], 1)] if per_flow else [],
                      # UDP: echoes beyond the datagrams sent (a packet forwarded twice)
                      "duplicates": sum(max(0, got[i] - sent[i]) for i in socks),
                      "ports": [socks[i].getsockname()[1] for i in sorted(socks)],
                      "stall_ms_per_flow": [round(max(stall[i], now - last[i]) * 1000, 1)
                                            for i in sorted(socks)],
                      }))
    for s in socks.values():
        s.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve")
    sv.add_argument("--port", type=int, default=5001)
    rn = sub.add_parser("run")
    rn.add_argument("server")
    rn.add_argument("--flows", type=int, default=20)
    rn.add_argument("--port", type=int, default=5001)
    rn.add_argument("--seconds", type=float, default=60)
    rn.add_argument("--udp", action="store_true", help="UDP flows instead of TCP")
    args = ap.parse_args()
    if args.cmd == "serve":
        serve(args.port)
    else:
        run(args.server, args.flows, args.port, args.seconds, args.udp)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
