"""Fuzz the VRRP receive path's pure parts for a long run (the unit suite runs a few
thousand examples; this runs a million): random bytes and mutations of valid adverts of
every variant through parse_ipv4, decode and check_against. Prints inputs per second and
the crashes (anything but DecodeError leaving decode, or any exception elsewhere).

    .venv/bin/python netns-lab/fuzz_codec.py --inputs 1000000 [--seed N]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import struct
import sys
import time
import traceback
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vipd.core.packet import (  # noqa: E402
    VRRP_GROUP_V4,
    VRRP_GROUP_V6,
    ChecksumVariant,
    DecodeError,
    IpMeta,
    ReceiverView,
    check_against,
    decode,
    encode_v2,
    encode_v3,
    vrrp_checksum,
)
from vipd.io.vrrp_socket import parse_ipv4  # noqa: E402

SRC4, SRC6 = IPv4Address("192.0.2.11"), IPv6Address("fe80::11")
META4, META6 = IpMeta(4, SRC4, VRRP_GROUP_V4, 255), IpMeta(6, SRC6, VRRP_GROUP_V6, 255)
VIEW4 = ReceiverView(51, 3, frozenset({IPv4Address("192.0.2.1")}), 100)
VIEW6 = ReceiverView(51, 3, frozenset({IPv6Address("2001:db8:a::1")}), 100)


def seeds() -> list[tuple[bytes, IpMeta]]:
    v4 = [IPv4Address(f"192.0.2.{i}") for i in range(1, 40)]
    v6 = [IPv6Address("fe80::1")] + [IPv6Address(f"2001:db8:a::{i:x}") for i in range(1, 40)]
    return [
        (encode_v2(vrid=51, priority=100, adver_int_s=1, addresses=v4[:3]), META4),
        (encode_v3(vrid=51, priority=100, max_adver_int_cs=100, addresses=v4[:5], src=SRC4,
                   variant=ChecksumVariant.PSEUDO_HEADER), META4),
        (encode_v3(vrid=51, priority=100, max_adver_int_cs=100, addresses=v4, src=SRC4,
                   variant=ChecksumVariant.RFC9568), META4),
        (encode_v3(vrid=51, priority=200, max_adver_int_cs=10, addresses=v6, src=SRC6),
         META6),
    ]


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if op < 0.5 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op < 0.7:
            b = b[:rng.randrange(len(b) + 1)]
        elif op < 0.9:
            b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif b:
            i = rng.randrange(len(b))
            b = b[:i] + b[i + 1:]
    return bytes(b)


def fix_checksum(payload: bytes, meta: IpMeta) -> bytes:
    """Make a mutated payload's checksum right, so decoding gets past that check."""
    if len(payload) < 8:
        return payload
    zeroed = payload[:6] + b"\0\0" + payload[8:]
    if meta.family == 6:
        variant = ChecksumVariant.IPV6
    elif payload[0] >> 4 == 2:
        variant = ChecksumVariant.V2
    else:
        variant = ChecksumVariant.PSEUDO_HEADER
    return payload[:6] + struct.pack("!H", vrrp_checksum(zeroed, variant, meta.src, meta.dst)) \
        + payload[8:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    base = seeds()
    crashes = decoded = 0
    start = time.perf_counter()
    for n in range(args.inputs):
        payload, meta = base[n % len(base)]
        if n % 5 == 0:
            payload = bytes(rng.randrange(256) for _ in range(rng.randint(0, 80)))
        else:
            payload = mutate(rng, payload)
            if n % 2:
                payload = fix_checksum(payload, meta)
        try:
            if n % 7 == 0:  # the IPv4 header parser sees whole datagrams
                parse_ipv4(bytes([0x45]) + payload)
            try:
                adv = decode(payload, meta)
            except DecodeError:
                continue
            decoded += 1
            with contextlib.suppress(DecodeError):
                check_against(adv, VIEW4 if meta.family == 4 else VIEW6)
        except Exception:
            crashes += 1
            if crashes <= 5:
                print(f"CRASH on {payload.hex()}:", file=sys.stderr)
                traceback.print_exc()
    elapsed = time.perf_counter() - start
    print(f"inputs {args.inputs}  decoded {decoded}  crashes {crashes}  "
          f"{args.inputs / elapsed:,.0f} inputs/s  ({elapsed:.1f} s, seed {args.seed})")
    return 1 if crashes else 0


if __name__ == "__main__":
    raise SystemExit(main())
