#!/usr/bin/env python
"""Training-step time in float32 against bfloat16 autocast (``SOLVER.AMP.ENABLED``, ``PRECISION auto`` on CPU).

Run by hand (not a test), with the Kumar split prepared (``tools/convert_dataset.py prepare-builtin monuseg2018``):

    OMP_NUM_THREADS=1 python benchmarks/bench_autocast.py [--configs nb_unet-cpu.yaml ...] [--iters 4] [--repeats 2]

For each config: one model (in its configured memory format), one real training batch (``SOLVER.IMS_PER_BATCH``
crops of its training set), forward + backward + optimizer step timed ``--iters`` times per precision, the two
alternated ``--repeats`` times on the same model so machine noise hits both; the median of each is reported with
the float32/bfloat16 ratio (> 1: autocast is faster). Whether the CPU has native bfloat16 is printed: without it
(no AVX512-BF16 / AMX) autocast is slower, not faster.
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
from nuclei_d2.engine.autocast import cpu_has_native_bfloat16
from nuclei_d2.modeling import build_nuclei_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["maskrcnn_plus-cpu.yaml", "panoptic_fusion-cpu.yaml",
                                                     "nb_unet-cpu.yaml", "two_stage_unet-cpu.yaml",
                                                     "brpnet-cpu.yaml"])
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    rows = []
    for name in args.configs:
        path = config_path(name)
        cfg = setup_cfg(str(path), ["MODEL.DEVICE", "cpu", *RANDOM_INIT_OPTS])
        torch.manual_seed(0)
        model = build_nuclei_model(cfg).train()
        optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
        batch = real_batch(cfg)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for bf16 in (False, True):
                step_seconds(model, optimizer, batch, 1, bf16)  # warm-up: oneDNN picks its kernels
                times[bf16].append(step_seconds(model, optimizer, batch, args.iters, bf16))
        fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
        rows.append([path.name, len(batch), f"{fp32:.3f}", f"{bf16:.3f}", f"{fp32 / bf16:.2f}x"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), native bfloat16: "
          f"{cpu_has_native_bfloat16()}")
    print(tabulate(rows, headers=["config", "batch", "s/step float32", "s/step bfloat16 autocast", "speed-up"]))


if __name__ == "__main__":
    main()
