"""The vipd demo: two routers, one VIP per VLAN, the master cut off, the backup takes over.

    scripts/demo.sh            (installs what it needs, then runs this as root)

Builds the pair lab (client on lanA, server on lanB, routers r1 and r2 between them),
starts vipd on both (r1 priority 200, r2 priority 100, 100 ms adverts, IPv4 and IPv6 VIPs),
shows `vipctl status` on both, cuts r1's links while the client pings the server through
the VIPs every millisecond, prints the measured outage and both status tables, restores r1,
shows it preempting, and tears everything down (also on failure or Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab import Lab, Topology, cleanup_on_signals, wait_for  # noqa: E402
from scenario import Probe, holder, start_vipd, status, vipctl, vipd_config  # noqa: E402

BOLD, RESET = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def show(lab: Lab, sp: object, router: str) -> None:
    p = vipctl(lab, sp, "status")  # type: ignore[arg-type]
    print(f"{BOLD}$ vipctl status    # on {router}, exit code {p.returncode}{RESET}")
    print(p.stdout.rstrip() or p.stderr.rstrip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="vipd failover demo")
    ap.add_argument("--interval-ms", type=int, default=100)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("the demo needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    cleanup_on_signals()
    interval = args.interval_ms
    t_start = time.monotonic()
    with Lab(Topology.load()) as lab:
        say(f"lab {lab.prefix}: client (lanA) -- r1, r2 -- server (lanB); "
            f"VIPs 192.0.2.1, 198.51.100.1, 2001:db8:a::1, 2001:db8:b::1")
        fams = ("ipv4", "ipv6")
        r1 = start_vipd(lab, "r1", vipd_config(lab, "r1", 200, interval, fams))
        r2 = start_vipd(lab, "r2", vipd_config(lab, "r2", 100, interval, fams))
        wait_for(lambda: holder(lab, "lanA") == ["r1"] and holder(lab, "lanB") == ["r1"], 10,
                 what="r1 elected")
        wait_for(lambda: all(i["state"] == "BACKUP" for i in status(lab, r2)["instances"])
                 and all(i["peers"] for i in status(lab, r2)["instances"]), 5,
                 what="r2 backup")
        say("elected: r1 is master for both VLANs")
        show(lab, r1, "r1")
        show(lab, r2, "r2")

        say("client pings the server through the VIPs every 1 ms; cutting r1's links now")
        probe = Probe(lab, "client", "198.51.100.100", 1.0, 30)
        time.sleep(0.5)
        t_cut = time.monotonic()
        lab.cut("r1")
        wait_for(lambda: "r2" in holder(lab, "lanA") and "r2" in holder(lab, "lanB"), 5,
                 interval=0.01, what="r2 takes over")
        time.sleep(0.5)
        res = probe.finish()
        runs = [r for r in res["loss_runs"] if r["last_send"] >= t_cut - 0.002]
        worst = max(runs, key=lambda r: r["count"], default=None)
        mdi = 3 * interval + (256 - 100) * interval / 256
        outage = worst["outage_ms"] if worst else 0.0
        print(f"probe: {res['sent']} requests, {res['lost']} unanswered; outage "
              f"{outage:.1f} ms ({worst['count'] if worst else 0} lost in a row), "
              f"longest reply gap {res['longest_reply_gap_ms']:.1f} ms, probe's own longest "
              f"send gap {res['max_send_gap_ms']:.1f} ms")
        print(f"r2's Master_Down_Interval is {mdi:.1f} ms: the outage is the time r2 needs to "
              "notice r1 is gone, minus the time since r1's last advert.")
        show(lab, r1, "r1")
        show(lab, r2, "r2")

        say("restoring r1's links: it outranks r2 and preempts")
        lab.restore("r1")
        wait_for(lambda: holder(lab, "lanA") == ["r1"] and holder(lab, "lanB") == ["r1"], 5,
                 what="r1 back")
        for sp, name in ((r1, "r1"), (r2, "r2")):
            for i in status(lab, sp)["instances"]:
                lt = i["last_transition"]
                print(f"{name} {i['name']:<20} {i['state']:<7} last: {lt['from']} -> "
                      f"{lt['to']} ({lt['cause']})")
        say("stopping vipd on r1 with SIGTERM: priority 0, r2 takes over after Skew_Time")
        probe = Probe(lab, "client", "198.51.100.100", 1.0, 30)
        time.sleep(0.5)
        lab.stop_process(r1.proc)
        wait_for(lambda: holder(lab, "lanA") == ["r2"], 5, what="r2 after SIGTERM")
        time.sleep(0.5)
        handoff = probe.finish()
        s = [i for i in status(lab, r2)["instances"] if i["name"] == "lanA/vrid 51/IPv4"][0]
        print(f"r1 exited {r1.proc.returncode}; r2 {s['state']} for lanA, priority-0 adverts "
              f"received: {s['priority_zero_received']}")
        say("summary")
        print(f"master cut off:   outage {outage:.1f} ms against a Master_Down_Interval of "
              f"{mdi:.1f} ms ({interval} ms adverts)")
        print("master restored:  it preempted, both VLANs back on r1")
        print(f"planned handoff:  {handoff['lost']} of {handoff['sent']} pings lost "
              f"(SIGTERM: priority 0, the VIPs held until r2 was heard), longest reply gap "
              f"{handoff['longest_reply_gap_ms']:.1f} ms")
        say("tearing the lab down")
    print(f"demo done in {time.monotonic() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
