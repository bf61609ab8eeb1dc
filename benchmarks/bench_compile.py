#!/usr/bin/env python
"""Training-step time eager against ``torch.compile`` (``SOLVER.COMPILE``), each in float32 and bfloat16 autocast.

Run by hand (not a test), with the Kumar split prepared (``tools/convert_dataset.py prepare-builtin monuseg2018``):

    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py [--configs nb_unet-cpu.yaml ...] [--iters 4] [--repeats 2]
    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py --configs brpnet-cpu.yaml --mode max-autotune-no-cudagraphs

For each config: one model (in its configured memory format) whose dense networks are compiled the way training
compiles them (:func:`nuclei_d2.engine.compile.compile_for_training`), one real training batch
(``SOLVER.IMS_PER_BATCH`` crops of its training set), forward + backward + optimizer step timed ``--iters`` times for
each of eager / compiled x float32 / bfloat16 autocast, the four alternated ``--repeats`` times on the same model so
machine noise hits all. The first compiled step of each precision compiles (a new graph per precision); its time
minus the compiled median is the compilation's seconds. Reported: medians, compile seconds and eager/compiled
ratios (> 1: compiled is faster); a compilation that failed is named and its row shows eager times only.
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
from nuclei_d2.engine.compile import COMPILE_MODES, DYNAMIC_SHAPES, compile_for_training
from nuclei_d2.modeling import build_nuclei_model


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b == b and b > 0 else "-"  # b != b: nan (compilation failed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["maskrcnn_plus-cpu.yaml", "panoptic_fusion-cpu.yaml",
                                                     "nb_unet-cpu.yaml", "two_stage_unet-cpu.yaml",
                                                     "brpnet-cpu.yaml"])
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--mode", default="default", choices=COMPILE_MODES)
    p.add_argument("--dynamic", default="auto", choices=list(DYNAMIC_SHAPES))
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...) for every config")
    args = p.parse_args()
    rows, failures = [], []
    for name in args.configs:
        path = config_path(name)
        cfg = setup_cfg(str(path), ["MODEL.DEVICE", "cpu", *RANDOM_INIT_OPTS, *args.opts])
        torch.manual_seed(0)
        model = build_nuclei_model(cfg).train()
        optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
        batch = real_batch(cfg)
        state = compile_for_training(model, args.mode, args.dynamic)
        variants = [(c, bf16) for c in (False, True) for bf16 in (False, True)]
        times: dict[tuple[bool, bool], list[float]] = {v: [] for v in variants}
        first: dict[bool, float] = {}
        for _ in range(args.repeats):
            for compiled, bf16 in variants:
                if compiled and state.failure:
                    continue
                state.active = compiled  # off: the same model steps eager
                if compiled and bf16 not in first:
                    first[bf16] = step_seconds(model, optimizer, batch, 1, bf16)  # compiles this precision's graph
                    if state.failure:
                        continue
                else:
                    step_seconds(model, optimizer, batch, 1, bf16)  # warm-up: oneDNN picks its kernels
                times[(compiled, bf16)].append(step_seconds(model, optimizer, batch, args.iters, bf16))
        state.active = False
        med = {v: statistics.median(t) if t else float("nan") for v, t in times.items()}
        compile_s = {bf16: first[bf16] - med[(True, bf16)] if bf16 in first else float("nan") for bf16 in (False, True)}
        if state.failure:
            failures.append(f"{path.name}: {state.failure}")
        rows.append([path.name, len(batch), ", ".join(state.names) or "-",
                     *(f"{med[v]:.3f}" for v in variants), f"{compile_s[False]:.0f}", f"{compile_s[True]:.0f}",
                     _ratio(med[(False, False)], med[(True, False)]), _ratio(med[(False, True)], med[(True, True)]),
                     _ratio(med[(False, False)], med[(True, True)])])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), mode {args.mode}, dynamic {args.dynamic}, "
          f"native bfloat16: {cpu_has_native_bfloat16()}")
    print(tabulate(rows, headers=["config", "batch", "compiled", "s/step eager fp32", "eager bf16", "compiled fp32",
                                  "compiled bf16", "compile s fp32", "compile s bf16", "speed-up fp32",
                                  "speed-up bf16", "compiled bf16 vs eager fp32"]))
    for f in failures:
        print(f"compilation failed (eager only): {f}")


if __name__ == "__main__":
    main()
