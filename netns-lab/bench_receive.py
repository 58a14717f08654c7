"""What one received advert costs the daemon, through its real receive path (decode, checks,
router, actions) with fake adapters: no root, no lab. Prints microseconds per packet.

    .venv/bin/python netns-lab/bench_receive.py [--packets 20000]

Cases: a valid small advert, a bad checksum, an unknown VRID, and 255-address IPv4 and
IPv6 adverts (the same list every time, as a peer sends it).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from ipaddress import IPv4Address, IPv6Address, ip_interface
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vipd.config import loads  # noqa: E402
from vipd.core.packet import VRRP_GROUP_V4, VRRP_GROUP_V6, IpMeta, encode_v3  # noqa: E402
from vipd.io.announce import FakeAnnouncer  # noqa: E402
from vipd.io.lock import InstanceLock  # noqa: E402
from vipd.io.nft import FakeAcceptGuard  # noqa: E402
from vipd.io.rtnl import FakeRtnl, LinkInfo  # noqa: E402
from vipd.io.vrrp_socket import FakeVrrpTransport  # noqa: E402
from vipd.runtime import Daemon  # noqa: E402

V4 = [IPv4Address(f"192.0.2.{i}") for i in range(1, 256)]
V6 = [IPv6Address("fe80::1")] + [IPv6Address(f"2001:db8:a::{i:x}") for i in range(1, 255)]
CONFIG = f"""
node: {{name: bench, control_socket: SOCK}}
mode: per-vlan-active
vlans:
  - name: lan
    interface: lan0
    instances:
      - {{vrid: 51, priority: 100, advert_interval: 10ms, vips: [192.0.2.1/24]}}
      - {{vrid: 52, priority: 100, advert_interval: 10ms,
         vips: [{", ".join(f"{a}/24" for a in V4)}]}}
      - {{vrid: 53, priority: 100, advert_interval: 10ms,
         vips: [{", ".join(f"{a}/64" for a in V6)}]}}
"""


async def main(n: int) -> None:
    tmp = tempfile.mkdtemp()
    rtnl = FakeRtnl()
    rtnl.links["lan0"] = LinkInfo(7, "lan0", True, "02:00:00:00:00:11")
    rtnl.addrs[7] = [(ip_interface("192.0.2.250/24"), 0), (ip_interface("fe80::250/64"), 0)]
    socks: dict[int, FakeVrrpTransport] = {}

    def open_socket(name: str, index: int, family: int) -> FakeVrrpTransport:
        socks[family] = FakeVrrpTransport(name, family)
        return socks[family]

    cfg = loads(CONFIG.replace("SOCK", f"{tmp}/s.sock"))
    d = Daemon(cfg, rtnl=rtnl, open_socket=open_socket, announcer=FakeAnnouncer(),
               accept_guard=FakeAcceptGuard(),
               lock=InstanceLock(f"{tmp}/s.sock", claim_prefix=f"vipd-bench{tmp}/"))
    await d.start()
    src4, src6 = IPv4Address("192.0.2.12"), IPv6Address("fe80::12")
    m4, m6 = IpMeta(4, src4, VRRP_GROUP_V4, 255), IpMeta(6, src6, VRRP_GROUP_V6, 255)
    small = encode_v3(vrid=51, priority=200, max_adver_int_cs=1, addresses=V4[:1], src=src4)
    bad = bytearray(small)
    bad[7] ^= 0xFF
    cases = {
        "valid, 1 address": (small, m4),
        "bad checksum": (bytes(bad), m4),
        "unknown VRID": (encode_v3(vrid=99, priority=200, max_adver_int_cs=1,
                                   addresses=V4[:1], src=src4), m4),
        "valid, 255 IPv4 addresses": (encode_v3(vrid=52, priority=200, max_adver_int_cs=1,
                                                addresses=V4, src=src4), m4),
        "valid, 255 IPv6 addresses": (encode_v3(vrid=53, priority=200, max_adver_int_cs=1,
                                                addresses=V6, src=src6), m6),
    }
    for name, (payload, meta) in cases.items():
        t0 = time.perf_counter()
        for _ in range(n):  # the daemon's receive path: the node core, then its actions
            d.node.receive("lan0", meta.family, [(payload, meta, d.now())])
            d.pump()
        us = (time.perf_counter() - t0) / n * 1e6
        print(f"{name:28} {us:8.1f} us per packet")
    await d.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--packets", type=int, default=20000)
    asyncio.run(main(ap.parse_args().packets))
