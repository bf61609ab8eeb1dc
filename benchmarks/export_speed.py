#!/usr/bin/env python
"""Seconds per 1000 x 1000 tile (dense methods, Mask R-CNN+): eager PyTorch vs ONNX Runtime vs TorchScript.

Issue 27's goal: ONNX Runtime at least 1.5x faster than eager per tile, same AJI. Each method is exported to both
formats (tools/export_model.py's code), the dense methods also to int8 ONNX (``--quantize int8``, calibrated on
``--calibration-images`` images of ``--calibration``, never the tiles timed), then every runtime runs the same model
code on the same real Kumar test tiles (``kumar_test``: whole 1000 x 1000 images, through the dataset mapper as
evaluation does), one after the other in this process with ``torch.set_num_threads(--threads)`` and ONNX Runtime's
``intra_op_num_threads`` equal to it, tile by tile with the runtimes taking turns (so a load that changes during the
run weighs on all of them alike). Reported per method and runtime: seconds per tile (whole inference: tiling,
networks, post-processing), the seconds in the networks alone (``run_network``), both as a speed-up over eager
measured in the same run, and AJI with its difference from eager's.

Methods: the shipped, trained zoo entries ``two_stage_unet-monuseg`` and ``nb_unet_hv-monuseg`` (the NB U-Net)
and, untrained (random weights: its speed is real, its AJI is not), the BRP-Net CPU config at the same input size.
An untrained BRP-Net's TAFE proposes little, so its refinement networks run on few patches: its numbers are mostly
TAFE's. The R-CNN methods' row is the shipped, trained ``maskrcnn_plus-monuseg`` (its one "rcnn" network: backbone
to masks); an untrained R-CNN's detection count, and so its cost, means nothing.

    NUCLEI_D2_DATASETS=/work/d2data python benchmarks/export_speed.py --threads 1 --tiles 2 --csv speed.csv
    python benchmarks/export_speed.py --methods two_stage_unet-monuseg --tiles 1        # a smoke run

The machine should be otherwise idle for numbers worth quoting.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this clone's nuclei_d2, whatever the venv has installed

#: name -> (zoo entry or config file, overrides). Zoo entries load their trained weights; configs run untrained.
METHODS = {
    "two_stage_unet-monuseg": ("zoo", []),
    "nb_unet_hv-monuseg": ("zoo", []),
    "brpnet_stage2-cpu": ("configs/brpnet_stage2-cpu.yaml", []),
    "maskrcnn_plus-monuseg": ("zoo", []),  # the R-CNN methods' row (issue 27: "report their ratio too")
}
#: runtime row -> (export folder kind, INFERENCE.RUNTIME); "torch" is the eager model itself.
RUNTIMES = {"torch": ("", "torch"), "onnxruntime": ("onnx", "onnxruntime"),
            "onnxruntime int8": ("onnx-int8", "onnxruntime"), "torchscript": ("torchscript", "torchscript")}


def _eager(method: str, opts: list[str]) -> tuple[Any, Any]:
    from nuclei_d2.engine import RANDOM_INIT_OPTS, setup_cfg
    from nuclei_d2.modeling.build import build_nuclei_model

    source, extra = METHODS[method]
    if source == "zoo":
        from nuclei_d2.checkpoint import NucleiCheckpointer

        cfg = setup_cfg(f"zoo:{method}", [*extra, *opts], eval_only=True)
        model = build_nuclei_model(cfg)
        NucleiCheckpointer.from_config(model, cfg).load(cfg.MODEL.WEIGHTS)
    else:
        cfg = setup_cfg(str(REPO / source), [*RANDOM_INIT_OPTS, "MODEL.BRPNET.DENSENET_WEIGHTS", "", *extra, *opts],
                        eval_only=True)
        import torch

        torch.manual_seed(0)
        model = build_nuclei_model(cfg)
    return cfg, model.eval()


def _with_runtime(folder: Path, runtime: str, threads: int, opts: list[str]) -> tuple[Any, Any]:
    from nuclei_d2.engine import setup_cfg
    from nuclei_d2.engine.export import install_runtime
    from nuclei_d2.modeling.build import build_nuclei_model

    cfg = setup_cfg(str(folder / "config.yaml"), [*opts, "INFERENCE.RUNTIME", runtime, "INFERENCE.EXPORTED",
                                                  str(folder), "INFERENCE.RUNTIME_THREADS", str(threads)],
                    eval_only=True)
    model = build_nuclei_model(cfg)
    install_runtime(model, cfg)
    return cfg, model.eval()


def _timed_networks(model: Any) -> dict[str, float]:
    """Count the seconds the model spends in its networks (an instance attribute shadows run_network)."""
    spent = {"seconds": 0.0}
    inner = model.run_network

    def run_network(name: str, *inputs: Any) -> Any:
        t0 = time.perf_counter()
        out = inner(name, *inputs)
        spent["seconds"] += time.perf_counter() - t0
        return out

    model.run_network = run_network
    return spent


def run_method(method: str, records: list[dict], threads: int, work: Path, opts: list[str],
               calibration: tuple[str, int] | None) -> list[dict]:
    """``calibration``: (folder or dataset, image count) for the int8 row (None: no int8 row)."""
    import numpy as np
    import torch

    from nuclei_d2.engine.export import calibration_images, export_model
    from nuclei_d2.engine.zoo_entry import score_records
    from nuclei_d2.inference.test_time import build_test_time_wrapper

    cfg, eager = _eager(method, opts)
    kinds = ["onnx", "torchscript"]
    if calibration is not None and not getattr(eager, "normalizes_inside", False):  # int8: the dense methods
        kinds.append("onnx-int8")
    folders, export_s = {}, {}
    for kind in kinds:
        t0 = time.perf_counter()
        fmt = kind.split("-")[0]
        extra = ({"quantize": "int8", "calibration": calibration_images(cfg, *calibration)}
                 if kind == "onnx-int8" else {})
        folders[kind] = export_model(eager, cfg, work / f"{method}-{kind}", fmt, overwrite=True, **extra)
        export_s[kind] = time.perf_counter() - t0
    runs = {}
    for runtime, (kind, name) in RUNTIMES.items():
        if kind and kind not in folders:
            continue
        if runtime == "torch":
            rcfg, model = cfg, eager
        else:
            rcfg, model = _with_runtime(folders[kind], name, threads, opts)
        spent = _timed_networks(model)
        with torch.no_grad():  # warm-up (sessions, allocator) on a small random image; not timed
            image = torch.rand(model.in_channels, 256, 256, generator=torch.Generator().manual_seed(0)) * 255
            model([{"image": image, "height": 256, "width": 256}])
        spent["seconds"] = 0.0
        runs[runtime] = (rcfg, build_test_time_wrapper(rcfg, model).eval(), spent, [])
    # Tile by tile, every runtime in turn: a load that changes during the run (a shared machine) hits all alike.
    for record in records:
        for rcfg, wrapped, _, scores in runs.values():
            scores += score_records(rcfg, wrapped, [record])
    rows = []
    for runtime, (_, _, spent, scores) in runs.items():
        n = len(scores)
        rows.append({"method": method, "runtime": runtime, "threads": threads, "tiles": n,
                     "s_per_tile": float(np.mean([s["seconds"] for s in scores])),
                     "network_s_per_tile": spent["seconds"] / n, "AJI": float(np.mean([s["AJI"] for s in scores])),
                     "export_s": export_s.get(RUNTIMES[runtime][0], float("nan"))})
        print(f"  {method} {runtime}: {rows[-1]['s_per_tile']:.2f} s/tile ({rows[-1]['network_s_per_tile']:.2f} s "
              f"in the networks), AJI {rows[-1]['AJI']:.4f}", flush=True)
    base = rows[0]
    for r in rows:
        r["speedup"] = base["s_per_tile"] / r["s_per_tile"]
        r["network_speedup"] = base["network_s_per_tile"] / max(r["network_s_per_tile"], 1e-9)
        r["AJI_diff"] = r["AJI"] - base["AJI"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--threads", type=int, default=1, help="torch threads = ONNX Runtime intra-op threads")
    p.add_argument("--tiles", type=int, default=2, help="kumar_test tiles (1000 x 1000) per method and runtime")
    p.add_argument("--dataset", default="kumar_test")
    p.add_argument("--calibration", default="kumar_train",
                   help="int8 rows: calibration images (a folder or a dataset; not the timed tiles)")
    p.add_argument("--calibration-images", type=int, default=4, help="int8 rows: how many calibration images")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 rows")
    p.add_argument("--csv", default=None, help="also write the rows here")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "nuclei_d2_export_speed"),
                   help="the export folders are written here and kept for inspection (tens of MB: delete when done)")
    p.add_argument("opts", nargs="*", default=[], help="KEY VALUE overrides for every method")
    args = p.parse_args(argv)
    import torch

    from nuclei_d2.engine.zoo_entry import dataset_records

    torch.set_num_threads(args.threads)
    records = dataset_records(args.dataset, args.tiles)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods:
        print(f"{method}: exporting and timing {len(records)} tile(s) x up to {len(RUNTIMES)} runtimes, "
              f"{args.threads} thread(s)", flush=True)
        # no test-time augmentation (it multiplies every runtime's work alike; an untrained model's noise nuclei would
        # make its merging the cost): overrides after it can turn it back on
        rows += run_method(method, records, args.threads, work,
                           ["MODEL.DEVICE", "cpu", "TEST.AUG.ENABLED", "False", *args.opts],
                           None if args.no_int8 else (args.calibration, args.calibration_images))
    print(f"\nSeconds per {args.dataset} tile (1000 x 1000), {args.threads} thread(s); speed-up = eager / runtime "
          "in this run\n")
    print("| method | runtime | tiles | s / tile | speed-up | network s / tile | network speed-up | AJI | "
          "AJI - eager |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['runtime']} | {r['tiles']} | {r['s_per_tile']:.2f} | {r['speedup']:.2f}x | "
              f"{r['network_s_per_tile']:.2f} | {r['network_speedup']:.2f}x | {r['AJI']:.4f} | {r['AJI_diff']:+.4f} |")
    if args.csv:
        from nuclei_d2.utils.io import atomic_write

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)

        atomic_write(args.csv, write)
        print(f"\nwrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
