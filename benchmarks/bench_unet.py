#!/usr/bin/env python
"""CPU time and peak memory of the U-Net family's inference, whole-image vs overlapped tiles.

Run by hand (not a test):

    python benchmarks/bench_unet.py                       # NB model (configs/nb_unet.yaml), 2 threads
    python benchmarks/bench_unet.py --config configs/two_stage_unet_stage2.yaml
    python benchmarks/bench_unet.py --sizes 1000 2000 4000 --whole-max 2000 --threads 2
    python benchmarks/bench_unet.py --config output/nb_unet/config.yaml --weights output/nb_unet/model_final.pth \
        --image ../shared/data/monuseg2018/train/images/TCGA-21-5784-01Z-00-DX1.tif

Two tables:

1. **Time for a 1000x1000 tile** (Cui et al. 2019 report "under 5 s" on a 2018 GPU): network forward tiled
   (``MODEL.TILING`` patches, weighted vote) and whole-image, then post-processing and the conversion to
   ``Instances``; CPU seconds (``time.process_time``: all threads of the process) and wall seconds, best of
   ``--repeats``. The whole-image forward is the baseline of the ratio column.
2. **Peak memory vs image size**: each (size, mode) runs in a fresh subprocess, which reports its peak RSS
   (``VmHWM``, reset just before inference) minus its RSS before inference (model built, image in memory), for
   ``predict_probs`` + ``postprocess`` (the label map; ``Instances``' ``N x H x W`` masks are left out: they grow
   with the number of nuclei times the image, whatever the model). The ratio column divides by the first size's
   tiled run.

The image is ``--image`` or a synthetic H&E-like 1000x1000 tile (``nuclei_d2.data.synthetic``), repeated to larger
sizes. Random weights unless ``--weights`` is given: the network's cost does not depend on them, but post-processing
is only timed with trained weights (random ones give noise maps with tens of thousands of specks).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this clone's nuclei_d2, whatever the venv has installed


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: ``clear_refs`` 5) so the peak covers inference only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; includes earlier peaks


def _image(size: int, path: str = "") -> np.ndarray:
    """A ``size x size`` RGB image: the tile at ``path`` (or a synthetic 1000x1000 one) repeated as needed."""
    if path:
        from nuclei_d2.utils.io import read_image_rgb

        tile = read_image_rgb(path)
    else:
        from nuclei_d2.data.synthetic import make_synthetic_tile

        tile = make_synthetic_tile(1000, 0)[0]
    reps = -(-size // min(tile.shape[:2]))
    return np.ascontiguousarray(np.tile(tile, (reps, reps, 1))[:size, :size])


def _model(config: str, weights: str, tiled: bool, threads: int, opts: list[str]):
    import torch

    import nuclei_d2  # noqa: F401
    from nuclei_d2.checkpoint import NucleiCheckpointer
    from nuclei_d2.engine import setup_cfg
    from nuclei_d2.modeling import build_nuclei_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = setup_cfg(config, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", weights, "MODEL.TILING.ENABLED", str(tiled),
                             *opts], eval_only=True)
    model = build_nuclei_model(cfg).eval()
    if weights:
        NucleiCheckpointer.from_config(model, cfg, config_file=config).load(weights)
    return model, cfg


def child(args: argparse.Namespace) -> None:
    """One measurement in a fresh process: prints a JSON line."""
    import torch

    model, _ = _model(args.config, args.weights, args.mode == "tiled", args.threads, args.opts)
    image = torch.from_numpy(_image(args.size, args.image).transpose(2, 0, 1).astype(np.float32))
    import gc

    gc.collect()
    reset = _reset_peak()
    before = _rss_mb()
    t = time.perf_counter()
    with torch.no_grad():
        probs = model.predict_probs(image)
        # Post-processing only with trained weights: random ones give noise maps with ~35 "nuclei" per 1000 px^2.
        nuclei = int(model.postprocess(probs.numpy())[0].max()) if args.weights else -1
    print(json.dumps({"size": args.size, "mode": args.mode, "before_mb": before, "peak_mb": _peak_mb(),
                      "seconds": time.perf_counter() - t, "nuclei": nuclei, "peak_reset": reset}))


def time_one_tile(args: argparse.Namespace) -> list[list]:
    import torch

    image = torch.from_numpy(_image(1000, args.image).transpose(2, 0, 1).astype(np.float32))
    rows = []
    for mode in ("whole", "tiled"):
        model, cfg = _model(args.config, args.weights, mode == "tiled", args.threads, args.opts)
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.repeats):
            steps = {}
            with torch.no_grad():
                c, w = time.process_time(), time.perf_counter()
                probs = model.predict_probs(image)
                steps["forward"] = (time.process_time() - c, time.perf_counter() - w)
                if not args.weights or mode == "whole":
                    for k, v in steps.items():
                        best[k] = min(best.get(k, v), v)
                    continue
                c, w = time.process_time(), time.perf_counter()
                label, scores = model.postprocess(probs.numpy())
                steps["post-processing"] = (time.process_time() - c, time.perf_counter() - w)
                c, w = time.process_time(), time.perf_counter()
                model.postprocess_probs(probs)
                steps["post-processing + Instances"] = (time.process_time() - c, time.perf_counter() - w)
            for k, v in steps.items():
                best[k] = min(best.get(k, v), v)
        t = cfg.MODEL.TILING
        what = f"tiled {t.PATCH_SIZE}/{t.STRIDE}, batch {t.BATCH_SIZE}" if mode == "tiled" else "whole image"
        rows.append([f"forward ({what})", *best["forward"]])
        if mode == "tiled" and args.weights:
            rows.append(["post-processing (label map)", *best["post-processing"]])
            rows.append(["post-processing + Instances", *best["post-processing + Instances"]])
            rows.append([f"total, tiled ({int(label.max())} nuclei)",
                         best["forward"][0] + best["post-processing + Instances"][0],
                         best["forward"][1] + best["post-processing + Instances"][1]])
    base = rows[0][1]
    return [r + [r[1] / base] for r in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "nb_unet.yaml"))
    p.add_argument("--weights", default="", help="trained model_final.pth (default: random weights)")
    p.add_argument("--image", default="", help="an RGB tile to use (repeated for larger sizes); default synthetic")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    p.add_argument("--whole-max", type=int, default=1000, help="largest size also run without tiling")
    p.add_argument("--skip-time", action="store_true")
    p.add_argument("--opts", nargs="*", default=[], help="config overrides KEY VALUE ...")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("tiled", "whole"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    from tabulate import tabulate

    print(f"config {args.config} {' '.join(args.opts)}, weights {args.weights or '(random: network time only)'}, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if not args.skip_time:
        rows = time_one_tile(args)
        print(f"\nOne 1000x1000 tile (best of {args.repeats})")
        print(tabulate(rows, headers=["step", "CPU s", "wall s", "CPU / whole-image forward"], floatfmt=".2f"))
    rows = []
    base = None
    for size in args.sizes:
        for mode in ("tiled", "whole"):
            if mode == "whole" and size > args.whole_max:
                continue
            cmd = [sys.executable, __file__, "--child", "--config", args.config, "--weights", args.weights,
                   "--threads", str(args.threads), "--size", str(size), "--mode", mode, "--image", args.image,
                   "--opts", *args.opts]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append([size, mode, "failed", proc.stderr.strip().splitlines()[-1][:60], "", ""])
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            delta = r["peak_mb"] - r["before_mb"]
            if mode == "tiled" and size == args.sizes[0]:
                base = delta
            rows.append([size, mode, r["before_mb"], r["peak_mb"], delta, delta / base if base else float("nan"),
                         r["seconds"]])
    print("\nPeak memory of predict_probs + postprocess, one process per row (MiB)")
    print(tabulate(rows, headers=["side px", "mode", "RSS before", "peak RSS", "peak - before",
                                  f"ratio to tiled {args.sizes[0]}", "wall s"], floatfmt=".0f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
