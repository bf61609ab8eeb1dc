#!/usr/bin/env bash
# Quick start, step 2: set up the environment if needed, lint, and run the test suite.
#   bash scripts/test.sh [pytest args...]      e.g.  bash scripts/test.sh -m "not slow"
# Tests that need the real data in ../shared/data skip (with the reason) when it is absent.
#
# The tests run with a temporary folder of their own (TMPDIR) and must leave at most $NUCLEI_D2_TEST_LEFTOVER_MB
# (default 100) MB in it: more fails the run and names the largest entries. A passing run's folder is removed; a
# failing run's is kept (it holds the failed tests' tmp_path) and its path printed.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$here/scripts/setup_env.sh" | tail -n 1)
cd "$here"
limit_mb=${NUCLEI_D2_TEST_LEFTOVER_MB:-100}

set +e
"$venv/bin/python" -m ruff check nuclei_d2 tools tests benchmarks setup.py
lint_rc=$?
tmp_root=$(mktemp -d "${TMPDIR:-/tmp}/nuclei-d2-tests.XXXXXX")
TMPDIR=$tmp_root "$venv/bin/python" -m pytest -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
fi

left_kb=$(du -sk "$tmp_root" | cut -f1)
echo "[test] the tests left $((left_kb / 1024)) MB in the temporary folder (limit ${limit_mb} MB)" >&2
if [ "$rc" -eq 0 ] && [ "$left_kb" -gt $((limit_mb * 1024)) ]; then
  echo "error: the tests left $((left_kb / 1024)) MB in the temporary folder $tmp_root (limit ${limit_mb} MB;" \
       "use tmp_path, or remove what you create). Largest files left:" >&2
  find "$tmp_root" -type f -printf '%s %p\n' | sort -rn | head -n 8 | awk '{printf "  %8.1f MB  %s\n", $1 / 1048576, $2}' >&2
  rc=1
fi
if [ "$rc" -eq 0 ]; then
  rm -rf "$tmp_root"
else
  echo "note: this run's temporary files (failed tests' tmp_path, leftovers) are kept in $tmp_root" >&2
fi
if [ "$rc" -eq 0 ] && [ "$lint_rc" -ne 0 ]; then
  rc=$lint_rc
fi
exit "$rc"
