#!/bin/bash
# The demo: a lab with two routers running vipd, the master's links cut while a host pings
# through the VIP every millisecond, the outage measured, then restore and preemption.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python netns-lab/demo.py "$@"
