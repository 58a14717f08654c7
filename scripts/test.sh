#!/bin/bash
# The whole test suite: lint, types, unit tests, and (as root) the namespace integration
# tests. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check vipd tests netns-lab
echo "== mypy"; mypy vipd
echo "== pytest"; exec pytest -q -p no:cacheprovider "$@"
