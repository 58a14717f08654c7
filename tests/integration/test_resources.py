"""Issue 7 on a real kernel: resources stay bounded while interfaces come and go."""

from __future__ import annotations

import os

from lab import Lab, wait_for
from scenario import holder, start_vipd, status, vipd_config


def test_recreated_interface_leaks_no_descriptors(lab: Lab) -> None:
    r1 = start_vipd(lab, "r1", vipd_config(lab, "r1", 200, 100, virtual_mac=True))
    wait_for(lambda: holder(lab, "lanA") == ["r1"], 10, what="r1 master")

    def cycle() -> None:
        before = status(lab, r1)["interfaces"][0]["index"]
        lab.recreate("r1", "lanA")
        wait_for(lambda: (s := status(lab, r1))["interfaces"][0]["index"] != before
                 and s["instances"][0]["state"] == "MASTER", 5, what="lanA back, r1 master")
        wait_for(lambda: holder(lab, "lanA") == ["r1"], 5, what="VIP back")

    cycle()  # the first one may open what a steady state keeps open
    fds = len(os.listdir(f"/proc/{r1.proc.pid}/fd"))
    for _ in range(5):
        cycle()
    assert len(os.listdir(f"/proc/{r1.proc.pid}/fd")) == fds
