"""The raw VRRP sockets between two namespaces: what recv_all hands the core (payload,
source, destination, TTL or hop limit, age), read in bursts with recvmmsg, and the same
through the plain recvmsg fallback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from lab import Lab, wait_for

ROOT = Path(__file__).resolve().parents[2]

RECEIVER = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {root!r})
    from vipd.io import vrrp_socket
    socks = {{4: vrrp_socket.VrrpSocket("lanA", {ifindex}, 4),
              6: vrrp_socket.VrrpSocket("lanA", {ifindex}, 6)}}
    if {fallback}:
        for s in socks.values():
            s._mmsg = None
    open({ready!r}, "w").close()
    got = {{4: [], 6: []}}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (len(got[4]) < 300 or len(got[6]) < 300):
        for fam, s in socks.items():
            for payload, meta, age in s.recv_all():
                got[fam].append([payload.hex(), str(meta.src), str(meta.dst), meta.ttl, age])
        time.sleep(0.05)
    print(json.dumps({{"got": got, "unusual": {{f: s.unusual_control
                                               for f, s in socks.items()}},
                      "mmsg": {{f: s._mmsg is not None for f, s in socks.items()}}}}))
""")

SENDER = textwrap.dedent("""
    import ipaddress, sys
    sys.path.insert(0, {root!r})
    from vipd.core.packet import encode_v3
    from vipd.io import vrrp_socket
    s4 = vrrp_socket.VrrpSocket("lanA", {ifindex}, 4, send_only=True)
    s6 = vrrp_socket.VrrpSocket("lanA", {ifindex}, 6, send_only=True)
    src4 = ipaddress.ip_address("192.0.2.11")
    src6 = ipaddress.ip_address({ll!r})
    for i in range(300):
        s4.send(encode_v3(vrid=i % 255 + 1, priority=200, max_adver_int_cs=100,
                          addresses=[ipaddress.ip_address("192.0.2.1")], src=src4), src4)
        s6.send(encode_v3(vrid=i % 255 + 1, priority=200, max_adver_int_cs=100,
                          addresses=[ipaddress.ip_address("2001:db8:a::1")], src=src6,
                          dst=vrrp_socket.VRRP_GROUP_V6), src6)
""")


def _ifindex(lab: Lab, node: str) -> int:
    out = lab.run(node, ["cat", "/sys/class/net/lanA/ifindex"]).stdout
    return int(out)


def _link_local(lab: Lab, node: str) -> str:
    def find() -> str | None:
        out = lab.run(node, ["ip", "-6", "-o", "addr", "show", "dev", "lanA", "scope",
                             "link"]).stdout
        return out.split()[3].split("/")[0] if out.strip() and "tentative" not in out \
            else None
    wait_for(lambda: find() is not None, 10, what="r1 link-local address")
    found = find()
    assert found is not None
    return found


def _exchange(lab: Lab, fallback: bool) -> dict[str, object]:
    ready = lab.workdir / f"ready-{fallback}"
    rx = lab.popen("r2", [sys.executable, "-c", RECEIVER.format(
        root=str(ROOT), ifindex=_ifindex(lab, "r2"), fallback=fallback, ready=str(ready))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(ready.exists, 10, what="receiver ready")
        lab.run("r1", [sys.executable, "-c", SENDER.format(
            root=str(ROOT), ifindex=_ifindex(lab, "r1"), ll=_link_local(lab, "r1"))])
        out, err = rx.communicate(timeout=20)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    assert rx.returncode == 0, err.decode()
    result: dict[str, object] = json.loads(out)
    return result


def _check(result: dict[str, object], ll: str) -> None:
    got = result["got"]
    assert isinstance(got, dict)
    assert len(got["4"]) == 300 and len(got["6"]) == 300
    for fam, src, dst, ttl in (("4", "192.0.2.11", "224.0.0.18", 255),
                               ("6", ll, "ff02::12", 255)):
        for _payload, s, d, t, age in got[fam]:
            assert (s, d, t) == (src, dst, ttl)
            assert 0 <= age < 1.0
        assert [bytes.fromhex(p[0])[1] for p in got[fam]] == [i % 255 + 1 for i in range(300)]


def test_bursts_read_with_recvmmsg_give_what_recvmsg_gives(lab: Lab) -> None:
    ll = _link_local(lab, "r1")
    fast = _exchange(lab, fallback=False)
    assert fast["mmsg"] == {"4": True, "6": True}
    _check(fast, ll)
    # the kernel's control messages had the layout the fast parser expects
    assert fast["unusual"] == {"4": 0, "6": 0}
    slow = _exchange(lab, fallback=True)
    assert slow["mmsg"] == {"4": False, "6": False}
    _check(slow, ll)
    assert [p[:4] for p in fast["got"]["6"]] == [p[:4] for p in slow["got"]["6"]]  # type: ignore[index]
