#!/usr/bin/env python
"""Train InstanSeg from scratch on a split's training tiles for a wall-clock budget, then predict its test tiles.

Run with the InstanSeg venv's python (``bash benchmarks/peers/setup_instanseg.sh`` prints it)::

    $VENV/bin/python benchmarks/peers/train_instanseg.py --data ../shared/data/monuseg2018 --split kumar2017 \
        --minutes 120 --threads 1 --output runs/peers/instanseg

instanseg-torch installs no training command; its training is ``instanseg.scripts.train.instanseg_training``
(the function behind the repository's ``train.py``), called here with the tiles as an in-memory
``segmentation_dataset`` and the script's defaults (InstanSeg_UNet [32, 64, 128, 256], Adam 1e-3, batch 3, 256x256
crops, 1000 samples per epoch, 10 hot-start epochs, "minimal" augmentation: flips, rotations, rescale jitter), with
the tiles rescaled from 0.25 to 0.5 um/px as InstanSeg's released models are. Its loop has no time limit and no
learning-rate schedule by default (constant rate), so it runs in a child process that is stopped when the budget is
used (or, if none is saved by then, once its first checkpoint is); the checkpoint it keeps (``model_weights.pth``:
the best validation F1 so far) is the model. Validation data:
the training tiles. Inference: ``InstanSeg(model).eval_small_image(tile, pixel_size=0.25)``; ``seed_threshold`` and
``mask_threshold`` picked on training tiles (F1 at IoU 0.5). Writes ``OUTPUT/instanseg/``, ``OUTPUT/labels/<id>.png``
and ``OUTPUT/run.json``.

``--predict-from RUN`` skips training: it loads ``RUN/instanseg/`` (the checkpoint the run predicted with) with the
pixel sizes and thresholds of ``RUN/run.json`` and writes ``OUTPUT/labels/<id>.png`` and ``OUTPUT/predict.json``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import multiprocessing as mp
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

EXPERIMENT = "instanseg"


def extra_args(p: argparse.ArgumentParser) -> None:
    """InstanSeg-specific options (defaults: its training script's, pixel sizes: MoNuSeg 40x and its models')."""
    p.add_argument("--pixel-size", type=float, default=0.25, help="um/px of the tiles (MoNuSeg: 40x)")
    p.add_argument("--model-pixel-size", type=float, default=0.5, help="um/px the network works at")
    p.add_argument("--len-epoch", type=int, default=1000, help="samples per epoch (InstanSeg's default)")
    p.add_argument("--hotstart", type=int, default=10, help="hot-start epochs (InstanSeg's default)")
    p.add_argument("--seed-thresholds", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--mask-thresholds", type=float, nargs="+", default=[0.4, 0.53])
    p.add_argument("--tune-tiles", type=int, default=4, help="training tiles used to pick the thresholds")


def _train_child(dataset: dict[str, list[dict[str, Any]]], kwargs: dict[str, Any], threads: int) -> None:
    """Child process: InstanSeg's own training loop (it parses sys.argv, so give it none)."""
    import torch

    torch.set_num_threads(threads)
    sys.argv = [sys.argv[0]]
    from instanseg.scripts.train import instanseg_training

    instanseg_training(segmentation_dataset=dataset, **kwargs)


def package_versions() -> dict[str, str]:
    """The installed versions run.json and predict.json record."""
    return _common.versions("instanseg-torch", "torch", "torchvision", "monai", "numpy")


def load_instanseg(output: Path, model_pixel_size: float) -> Any:
    """The ``InstanSeg`` object of the checkpoint in ``output/instanseg`` (its loader, then the TorchScript
    wrapper the ``InstanSeg`` class reads)."""
    import torch
    from instanseg import InstanSeg
    from instanseg.utils.loss.instanseg_loss import InstanSeg_Torchscript
    from instanseg.utils.model_loader import load_model

    net, model_dict = load_model(folder=EXPERIMENT, path=str(output))
    wrapped = InstanSeg_Torchscript(net, cells_and_nuclei=False, pixel_size=model_pixel_size,
                                    n_sigma=int(model_dict["n_sigma"]),
                                    feature_engineering_function=str(model_dict["feature_engineering"]))
    return InstanSeg(torch.jit.script(wrapped), device="cpu", verbosity=0)  # it reads the TorchScript graph


def segment(model: Any, img: Any, pixel_size: float, seed: float, mask: float) -> Any:
    """Label map (int64) of an RGB tile at ``pixel_size`` um/px."""
    import numpy as np

    out = model.eval_small_image(img, pixel_size=pixel_size, return_image_tensor=False, seed_threshold=seed,
                                 mask_threshold=mask)
    return out.squeeze().cpu().numpy().astype(np.int64)


def load_run(run: Path, record: dict[str, Any], threads: int = 1) -> Any:
    """``--predict-from``: the checkpoint a previous run kept in ``run/instanseg`` at that run's pixel sizes and
    thresholds."""
    import torch

    torch.set_num_threads(threads)
    model = load_instanseg(run, float(record.get("model_pixel_size", 0.5)))
    pixel_size = float(record.get("pixel_size", 0.25))
    seed, mask = float(record["thresholds"]["seed_threshold"]), float(record["thresholds"]["mask_threshold"])
    return lambda img: segment(model, img, pixel_size, seed, mask)


def main() -> None:
    """Train for the budget, pick thresholds on training tiles, predict the test tiles, write run.json."""
    args = _common.parse_args(__doc__.splitlines()[0], extra_args)
    if args.predict_from is not None:  # RUN is checked before torch is imported
        _common.predict_only(args, "instanseg", functools.partial(load_run, threads=args.threads),
                             package_versions())
        return
    import numpy as np

    args.output.mkdir(parents=True, exist_ok=True)
    train_ids, test_ids = _common.split_ids(args.data, args.split, args.max_train, args.max_test)
    images = [_common.read_image(args.data, t) for t in train_ids]
    labels = [_common.read_labels(args.data, t).astype(np.int32) for t in train_ids]
    items = [{"image": img, "nucleus_masks": lab, "parent_dataset": "kumar", "pixel_size": args.pixel_size,
              "image_modality": "Brightfield"} for img, lab in zip(images, labels, strict=True)]
    kwargs = {"output_path": str(args.output), "experiment_str": EXPERIMENT, "device": "cpu", "num_workers": 1,
              "requested_pixel_size": args.model_pixel_size, "length_of_epoch": args.len_epoch,
              "hotstart_training": args.hotstart, "num_epochs": 1_000_000, "rng_seed": args.seed or None,
              "on_cluster": True, "target_segmentation": "N",
              # name the source: with the default "all", instanseg-torch 0.1.2 keeps only items whose parent_dataset
              # is a substring of "all" (it compares against the string, not the list ["all"])
              "source_dataset": "[kumar]"}
    run_dir = args.output / EXPERIMENT
    weights = run_dir / "model_weights.pth"
    safe = run_dir / "model_weights.last_complete.pth"

    child = mp.get_context("spawn").Process(target=_train_child,
                                            args=({"Train": items, "Validation": items}, kwargs, args.threads))
    t0 = time.monotonic()
    deadline = t0 + args.minutes * 60
    child.start()
    last = None
    # past the deadline, wait for the first complete checkpoint if there is none yet (recorded in run.json)
    while child.is_alive() and (time.monotonic() < deadline or not safe.exists()):
        time.sleep(2)
        if weights.exists():  # keep a copy of each checkpoint once written, in case the stop lands mid-save
            stat = weights.stat()
            key = (stat.st_mtime_ns, stat.st_size)
            if key == last and not (safe.exists() and safe.stat().st_mtime_ns >= stat.st_mtime_ns):
                shutil.copy2(weights, safe)
            last = key
    stopped = child.is_alive()
    child.terminate()
    child.join()
    train_s = time.monotonic() - t0
    if not stopped and child.exitcode != 0:
        raise SystemExit(f"InstanSeg training failed (exit code {child.exitcode})")

    import torch

    torch.set_num_threads(args.threads)
    try:
        model = load_instanseg(args.output, args.model_pixel_size)
    except Exception:  # the stop came during a save: use the last complete checkpoint
        shutil.copy2(safe, weights)
        model = load_instanseg(args.output, args.model_pixel_size)
    checkpoint = torch.load(weights, map_location="cpu", weights_only=False)

    t0 = time.monotonic()
    scores = {}
    for seed, mask in itertools.product(args.seed_thresholds, args.mask_thresholds):
        f1 = [_common.f1_at_half(lab, segment(model, img, args.pixel_size, seed, mask))
              for img, lab in list(zip(images, labels, strict=True))[:args.tune_tiles]]
        scores[(seed, mask)] = float(np.mean(f1))
        print(f"seed_threshold={seed} mask_threshold={mask}: F1@0.5 {scores[(seed, mask)]:.4f}", flush=True)
    seed, mask = max(scores, key=scores.get)
    tune_s = time.monotonic() - t0

    pred = _common.predict_tiles(args, test_ids, lambda img: segment(model, img, args.pixel_size, seed, mask))
    info = {
        "versions": package_versions(),
        "train_tiles": train_ids,
        "minutes_trained": round(train_s / 60, 2),
        "stopped_by_budget": stopped,
        "waited_past_budget_for_first_checkpoint": train_s > args.minutes * 60 + 10,
        "checkpoint_epoch": int(checkpoint.get("epoch", -1)),
        "checkpoint_validation_f1": float(checkpoint.get("f1_score", float("nan"))),
        "epoch_note": "epochs count from 0 again after the hot-start epochs; the checkpoint is the best validation "
                      "F1 so far (every epoch of the first 6)",
        "samples_per_epoch": args.len_epoch,
        "batch_size": 3,
        "hotstart_epochs": args.hotstart,
        "pixel_size": args.pixel_size,
        "model_pixel_size": args.model_pixel_size,
        "augmentation": "InstanSeg 'minimal': flips, rotations, rescale to the model pixel size",
        "validation": "the training tiles (no held-out tile)",
        "dataloader_workers": 1,  # the fewest its loader allows (persistent_workers=True); default 3
        "instanseg_rng_seed": kwargs["rng_seed"],  # InstanSeg treats 0 as "no seed"
        "thresholds": {"seed_threshold": seed, "mask_threshold": mask},
        "thresholds_chosen_on": f"first {min(args.tune_tiles, len(images))} training tiles, F1 at IoU 0.5",
        "threshold_grid": {f"{s},{m}": v for (s, m), v in scores.items()},
        "minutes_threshold_tuning": round(tune_s / 60, 2),
        "model_dir": str(run_dir),
        **pred,
    }
    print(_common.write_run_json(args, "instanseg", info))


if __name__ == "__main__":
    main()
