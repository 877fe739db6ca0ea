#!/usr/bin/env bash
# The whole test suite, with the install it needs: the README's second command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh
# The browser test drives Debian's Chromium; install it where this runs as root with apt, else that test skips
# and says why.
if ! command -v chromium >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
      || echo "could not install Debian's chromium: the browser test will skip" >&2
  else
    echo "no chromium, and no apt-get as root to install it: the browser test will skip" >&2
  fi
fi
"$PY" -m ruff check src tests benchmarks
# The documentation site (docs/, the API reference from the docstrings): a broken link or reference fails.
NO_MKDOCS_2_WARNING=1 "$PY" -m mkdocs build --strict --quiet --site-dir "${RAGLINE_SITE_DIR:-site}"
"$PY" -m pytest -q "$@"
