#!/usr/bin/env python
"""Tune the classical floor's parameters on a registered training split and write them as a config file.

    python tools/tune_classical.py --config-file configs/classical_watershed.yaml --dataset kumar_train
    python tools/tune_classical.py --threshold-scale 0.9 1.0 1.1 --sigma-factor 0.5 --min-size 30 --max-images 4
    python tools/train_net.py --config-file output/classical_watershed/tuned.yaml --eval-only

The work is done by nuclei_d2.engine.tune_classical; docs/classical.md explains the method.
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this clone's nuclei_d2, whatever the venv has installed

#: nuclei_d2.engine.tune_classical.DEFAULT_GRID, repeated here so --help needs no torch (a test keeps them in step).
DEFAULT_GRID = {
    "threshold_scale": (0.8, 0.9, 1.0, 1.1, 1.2, 1.3),
    "sigma_factor": (0.25, 0.5, 0.75),
    "min_size": (10, 30, 60),
}


def build_parser() -> argparse.ArgumentParser:
    """The command line (standard library only: ``--help`` and argument errors never import torch)."""
    p = argparse.ArgumentParser(
        prog="tune_classical.py",
        description="Tune the classical floor (deconvolution + Otsu + distance watershed) on a registered dataset "
                    "and write the best parameters as a config file.")
    p.add_argument("--config-file", default="configs/classical_watershed.yaml", help="the config to tune")
    p.add_argument("--dataset", default="kumar_train", help="registered dataset to tune on (default kumar_train)")
    p.add_argument("--metric", default="AJI", help="per-image mean to maximise (AJI, PQ, Dice1, F1; default AJI)")
    p.add_argument("--threshold-scale", type=float, nargs="+", default=list(DEFAULT_GRID["threshold_scale"]))
    p.add_argument("--sigma-factor", type=float, nargs="+", default=list(DEFAULT_GRID["sigma_factor"]))
    p.add_argument("--min-size", type=int, nargs="+", default=list(DEFAULT_GRID["min_size"]))
    p.add_argument("--max-images", type=int, default=0, help="use only the first N images (0 = all)")
    p.add_argument("--output", default="", help="tuned config to write (default OUTPUT_DIR/tuned.yaml)")
    p.add_argument("--top", type=int, default=10, help="rows of the result table to print")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from nuclei_d2.engine.tune_classical import run  # heavy imports (torch, detectron2) only after parsing

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
