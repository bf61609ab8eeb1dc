#!/usr/bin/env python
"""Training-step time with contiguous (NCHW) against channels-last (NHWC) weights (``MODEL.CHANNELS_LAST``).

Run by hand (not a test), with the Kumar split prepared (``tools/convert_dataset.py prepare-builtin monuseg2018``):

    python benchmarks/bench_memory_format.py [--configs nb_unet-cpu.yaml ...] [--iters 4] [--repeats 2]

For each config: one model, one real training batch (``SOLVER.IMS_PER_BATCH`` crops of its training set), forward +
backward timed ``--iters`` times per layout, the two layouts alternated ``--repeats`` times on the same model so
machine noise hits both; the median of each is reported with the NCHW/NHWC ratio (> 1: channels-last is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's nuclei_d2, whatever the venv has installed

from training_step import config_path, real_batch, step_seconds  # noqa: E402  (benchmarks/)

from nuclei_d2.engine import RANDOM_INIT_OPTS, setup_cfg
from nuclei_d2.modeling import build_nuclei_model, to_memory_format


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["maskrcnn_plus-cpu.yaml", "nb_unet-cpu.yaml",
                                                     "two_stage_unet-cpu.yaml", "brpnet-cpu.yaml"])
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    rows = []
    for name in args.configs:
        path = config_path(name)
        cfg = setup_cfg(str(path), ["MODEL.DEVICE", "cpu", *RANDOM_INIT_OPTS])
        torch.manual_seed(0)
        model = build_nuclei_model(cfg).train()
        batch = real_batch(cfg)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for channels_last in (False, True):
                to_memory_format(model, channels_last)
                step_seconds(model, None, batch, 1)  # warm-up: oneDNN picks kernels for the layout
                times[channels_last].append(step_seconds(model, None, batch, args.iters))
        nchw, nhwc = statistics.median(times[False]), statistics.median(times[True])
        rows.append([path.name, len(batch), f"{nchw:.3f}", f"{nhwc:.3f}", f"{nchw / nhwc:.2f}x"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(tabulate(rows, headers=["config", "batch", "s/step NCHW", "s/step channels-last", "speed-up"]))


if __name__ == "__main__":
    main()
