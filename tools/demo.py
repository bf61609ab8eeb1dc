#!/usr/bin/env python
"""Train the tiny baseline on the embedded synthetic data, predict a held-apart tile, write overlay + metrics.

    python tools/demo.py                              # ~2 minutes on 2 CPU cores
    python tools/demo.py --iters 300 --output output/demo
"""

import argparse
import sys
from pathlib import Path

import nuclei_d2  # noqa: F401  (registers datasets and models)
from nuclei_d2.engine import ConfigError
from nuclei_d2.engine.demo import run_demo

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=str(REPO / "configs" / "maskrcnn_baseline-tiny.yaml"))
    p.add_argument("--output", default="output/demo", help="folder for the checkpoint, overlay and metrics")
    p.add_argument("--iters", type=int, default=150, help="training iterations")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    try:
        run_demo(args.config_file, args.output, args.iters, args.opts)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
