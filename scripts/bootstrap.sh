#!/bin/bash
# Install what vipd's demo and tests need on a fresh Debian 12 machine (run as root),
# then make .venv with the package and its test extra. Idempotent and quiet when done.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for pkg in iproute2 iputils-ping python3 python3-venv python3-dev gcc keepalived nftables \
           procps conntrack conntrackd iptables libnetfilter-queue-dev systemd; do
    have "$pkg" || need+=("$pkg")
done
# A fresh Debian often runs unattended-upgrades at first boot: wait for the dpkg lock
# (saying so) instead of failing at once. apt-get's own DPkg::Lock::Timeout waits too.
wait_for_dpkg() {
    local waited=0
    while fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock \
            >/dev/null 2>&1; do
        if ((waited % 30 == 0)); then
            echo "bootstrap: waiting for the dpkg lock (another apt or unattended-upgrades" \
                 "is running; ${waited} s so far, up to 15 minutes)" >&2
        fi
        if ((waited >= 900)); then
            echo "bootstrap: the dpkg lock is still held after 15 minutes; giving up" >&2
            return 1
        fi
        sleep 5
        waited=$((waited + 5))
    done
}
if ((${#need[@]})); then
    echo "bootstrap: apt-get install ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    if command -v fuser >/dev/null 2>&1; then wait_for_dpkg; fi
    apt-get -o DPkg::Lock::Timeout=900 update -qq >/dev/null
    apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${need[@]}" \
        >/dev/null
fi
# keepalived's and conntrackd's packages start services in the root namespace; we only use
# the binaries (the benchmarks run them inside the lab's namespaces).
for svc in keepalived conntrackd; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active -q "$svc" 2>/dev/null; then
        systemctl disable --now "$svc" >/dev/null 2>&1 || true
    fi
done

PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
stamp=.venv/.vipd-installed
if [ ! -x .venv/bin/python ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] \
        || [ scripts/bootstrap.sh -nt "$stamp" ]; then
    echo "bootstrap: creating .venv" >&2
    "$PY" -m venv .venv
    .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
    # compat: the checkout goes on sys.path by a .pth line. The default editable mode
    # installs an import finder that costs every Python start 10-15 ms (every vipctl).
    .venv/bin/pip uninstall -q -y vipd >/dev/null 2>&1 || true
    # (setuptools calls compat transitional: where it is gone, the default mode serves)
    if ! .venv/bin/pip install -q -e '.[test,hold,plots]' --config-settings editable_mode=compat \
            2>.venv/install.log; then
        cat .venv/install.log >&2
        .venv/bin/pip install -q -e '.[test,hold,plots]'
    fi
    touch "$stamp"
fi
# bytecode as an installed package has it, even where PYTHONDONTWRITEBYTECODE is set:
# without it every vipctl compiles its modules first (a few ms each)
.venv/bin/python -m compileall -q vipd
