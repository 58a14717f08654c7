#!/bin/bash
# Install what vipd's demo and tests need on a fresh Debian 12 machine (run as root),
# then make .venv with the package and its test extra. Idempotent and quiet when done.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for pkg in iproute2 iputils-ping python3 python3-venv python3-dev gcc keepalived nftables \
           procps conntrack conntrackd iptables libnetfilter-queue-dev; do
    have "$pkg" || need+=("$pkg")
done
if ((${#need[@]})); then
    echo "bootstrap: apt-get install ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
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
if [ ! -x .venv/bin/python ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "bootstrap: creating .venv" >&2
    "$PY" -m venv .venv
    .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/pip install -q -e '.[test,hold]'
    touch "$stamp"
fi
