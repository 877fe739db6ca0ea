#!/usr/bin/env bash
# The whole test suite, with the install it needs: the README's second command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh
"$PY" -m ruff check src tests benchmarks
"$PY" -m pytest -q "$@"
