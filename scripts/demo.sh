#!/usr/bin/env bash
# Quick start, step 1: set up the environment (cached after the first run) and run the demo: train the tiny baseline
# on the embedded synthetic H&E-like tiles, predict a held-apart tile, evaluate; prints where the outputs are.
#   bash scripts/demo.sh [--iters N] [--output DIR] [KEY VALUE ...]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$here/scripts/setup_env.sh" | tail -n 1)
cd "$here"
exec "$venv/bin/python" tools/demo.py "$@"
