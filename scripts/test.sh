#!/usr/bin/env bash
# Quick start, step 2: set up the environment if needed, lint, and run the test suite.
#   bash scripts/test.sh [pytest args...]      e.g.  bash scripts/test.sh -m "not slow"
# Tests that need the real data in ../shared/data skip (with the reason) when it is absent.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$here/scripts/setup_env.sh" | tail -n 1)
cd "$here"
"$venv/bin/python" -m ruff check nuclei_d2 tools tests benchmarks setup.py
set +e
"$venv/bin/python" -m pytest -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
fi
exit "$rc"
