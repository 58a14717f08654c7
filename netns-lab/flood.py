"""Send VRRP floods onto a lab segment from inside a host namespace (fault suite, tests).

    flood.py --kind spoof   --rate 1000 --seconds 5      valid adverts, random sources
    flood.py --kind garbage --src 192.0.2.11 --rate 2000 --seconds 5
                                                         bad checksums, one claimed source

Raw IPv4 with our own header (IP_HDRINCL), TTL 255, to 224.0.0.18 on eth0. Sources are
drawn from the segment's documentation prefix only. Bounded in count and time; prints how
many packets left.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vipd.core.packet import encode_v3  # noqa: E402


def ipv4(src: str, payload: bytes) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0xC0, 20 + len(payload), 0, 0, 255, 112, 0,
                       socket.inet_aton(src), socket.inet_aton("224.0.0.18")) + payload


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=["spoof", "garbage"], required=True)
    ap.add_argument("--src", default="192.0.2.11")
    ap.add_argument("--net", default="192.0.2.0/24")
    ap.add_argument("--vrid", type=int, default=51)
    ap.add_argument("--priority", type=int, default=50)
    ap.add_argument("--vip", default="192.0.2.1")
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--iface", default="eth0")
    args = ap.parse_args()
    net = ipaddress.ip_network(args.net)
    rng = random.Random(1)
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, args.iface.encode())
    vip = ipaddress.IPv4Address(args.vip)
    sent, start = 0, time.monotonic()
    per_tick = max(1, args.rate // 100)
    while time.monotonic() - start < args.seconds:
        for _ in range(per_tick):
            if args.kind == "spoof":
                src = str(net.network_address + rng.randrange(20, net.num_addresses - 1))
                payload = encode_v3(vrid=args.vrid, priority=args.priority,
                                    max_adver_int_cs=10, addresses=[vip],
                                    src=ipaddress.IPv4Address(src))
            else:
                src = args.src
                good = bytearray(encode_v3(vrid=args.vrid, priority=200, max_adver_int_cs=10,
                                           addresses=[vip], src=ipaddress.IPv4Address(src)))
                good[6] ^= 0xFF
                payload = bytes(good)
            s.sendto(ipv4(src, payload), ("224.0.0.18", 0))
            sent += 1
        time.sleep(0.01)
    print(sent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
