#!/usr/bin/env python
"""ROIAlign on the CPU: torchvision's kernel against the sparse product of ``MODEL.ROI_ALIGN_CPU "sparse"``.

Run by hand (not a test), with the Kumar split prepared (``tools/convert_dataset.py prepare-builtin monuseg2018``):

    OMP_NUM_THREADS=1 python benchmarks/bench_roi_align.py [--configs maskrcnn_plus-cpu.yaml ...] [--iters 4] \\
        [--repeats 3] [--bf16]

Two tables, each a ratio measured in one run (the two implementations alternated ``--repeats`` times, medians):

* **the op**, on the shapes of the CPU R-CNN configs (64 FPN channels): the box pooler (7x7) and the mask pooler
  (14x14) of a training step on two 256 px crops (forward + backward), and the mask pooler at inference on a
  1000x1000 tile (forward only); with the largest difference between the two outputs;
* **a training step** (forward + backward + AdamW) of each config on one real training batch, the same model with
  its poolers swapped, under bfloat16 autocast with ``--bf16`` (as the issue-24 runs train).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tabulate import tabulate
from torchvision.ops import roi_align

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's nuclei_d2, whatever the venv has installed

from training_step import config_path, real_batch, step_seconds  # noqa: E402  (benchmarks/)

from nuclei_d2.engine import RANDOM_INIT_OPTS, setup_cfg
from nuclei_d2.layers.roi_align import roi_align_sparse
from nuclei_d2.modeling import build_nuclei_model

# (name, feature map N x C x H x W, boxes, box side range in px, output side, spatial scale, backward)
OP_CASES = [
    ("box pooler, training (2 crops of 256 px, P2)", (2, 64, 64, 64), 512, (8, 48), 7, 0.25, True),
    ("mask pooler, training (positives, P2)", (2, 64, 64, 64), 256, (8, 48), 14, 0.25, True),
    ("mask pooler, inference (1000 px tile, P2)", (1, 64, 250, 250), 1500, (8, 48), 14, 0.25, False),
]


def _boxes(n: int, images: int, size: int, sides: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    centre = torch.rand(n, 2, generator=g) * size
    side = sides[0] + torch.rand(n, 2, generator=g) * (sides[1] - sides[0])
    b = torch.cat([centre - side / 2, centre + side / 2], dim=1).clamp(0, size)
    return torch.cat([torch.randint(0, images, (n, 1), generator=g).float(), b], dim=1)


def _op_ms(fn: Callable, feats: torch.Tensor, rois: torch.Tensor, side: int, scale: float, backward: bool,
           iters: int) -> float:
    grad = torch.ones(rois.shape[0], feats.shape[1], side, side)
    start = time.perf_counter()
    for _ in range(iters):
        feats.grad = None
        with torch.set_grad_enabled(backward):
            out = fn(feats, rois, (side, side), scale, 0, True)
        if backward:
            out.backward(grad)
    return (time.perf_counter() - start) / iters * 1000


def op_rows(iters: int, repeats: int) -> list[list]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, shape, n, sides, side, scale, backward in OP_CASES:
        feats = torch.randn(*shape, generator=g).requires_grad_(backward)
        rois = _boxes(n, shape[0], int(shape[2] / scale), sides, g)
        times: dict[str, list[float]] = {"torchvision": [], "sparse": []}
        for _ in range(repeats):
            for label, fn in (("torchvision", roi_align), ("sparse", roi_align_sparse)):
                times[label].append(_op_ms(fn, feats, rois, side, scale, backward, iters))
        with torch.no_grad():
            diff = (roi_align(feats, rois, side, scale, 0, True) - roi_align_sparse(feats, rois, side, scale, 0, True))
        tv, sp = statistics.median(times["torchvision"]), statistics.median(times["sparse"])
        rows.append([name, n, "fwd + bwd" if backward else "fwd", f"{tv:.1f}", f"{sp:.1f}", f"{tv / sp:.2f}x",
                     f"{float(diff.abs().max()):.1e}"])
    return rows


def step_rows(configs: list[str], iters: int, repeats: int, bf16: bool) -> list[list]:
    rows = []
    for name in configs:
        path = config_path(name)
        models = {}
        for impl in ("torchvision", "sparse"):
            cfg = setup_cfg(str(path), ["MODEL.DEVICE", "cpu", *RANDOM_INIT_OPTS, "MODEL.ROI_ALIGN_CPU", impl])
            torch.manual_seed(0)
            model = build_nuclei_model(cfg).train()
            models[impl] = (model, torch.optim.AdamW(model.parameters(), 1e-4))
        batch = real_batch(cfg)
        times: dict[str, list[float]] = {k: [] for k in models}
        for model, opt in models.values():
            step_seconds(model, opt, batch, 1, bf16)  # warm-up
        for _ in range(repeats):
            for impl, (model, opt) in models.items():
                times[impl].append(step_seconds(model, opt, batch, iters, bf16))
        tv, sp = statistics.median(times["torchvision"]), statistics.median(times["sparse"])
        rows.append([path.name, len(batch), f"{tv:.3f}", f"{sp:.3f}", f"{tv / sp:.2f}x"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=["maskrcnn_baseline-cpu.yaml", "maskrcnn_plus-cpu.yaml",
                                                     "panoptic_fusion-cpu.yaml"],
                   help="R-CNN configs whose training step is timed (none: the op table only)")
    p.add_argument("--iters", type=int, default=4, help="timed calls (op) or steps (configs) per measurement")
    p.add_argument("--repeats", type=int, default=3, help="measurements per implementation, alternated")
    p.add_argument("--bf16", action="store_true", help="training steps under bfloat16 autocast")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(tabulate(op_rows(args.iters, args.repeats),
                   headers=["ROIAlign call", "boxes", "pass", "torchvision ms", "sparse ms", "speed-up",
                            "max |diff|"]))
    if args.configs:
        print()
        print(tabulate(step_rows(args.configs, args.iters, args.repeats, args.bf16),
                       headers=["config", "batch", "s/step torchvision", "s/step sparse", "speed-up"]))


if __name__ == "__main__":
    main()
