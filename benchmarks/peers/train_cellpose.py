#!/usr/bin/env python
"""Train Cellpose from scratch on a split's training tiles for a wall-clock budget, then predict its test tiles.

Run with the Cellpose venv's python (``bash benchmarks/peers/setup_cellpose.sh`` prints it)::

    $VENV/bin/python benchmarks/peers/train_cellpose.py --data ../shared/data/monuseg2018 --split kumar2017 \
        --minutes 120 --threads 1 --output runs/peers/cellpose

Cellpose 3 (the last release that trains from scratch): ``models.CellposeModel(pretrained_model=False,
diam_mean=17)`` (17 px: the built-in nuclei model's diameter) trained with ``train.train_seg`` and its defaults
(AdamW, learning rate 0.005, weight decay 1e-5, batch 8, 224x224 crops, its own augmentation: random rotation,
flip and scale around each image's diameter, rescaled to ``diam_mean``). H&E as grayscale: ``channels=[0, 0]``, the
setting Cellpose's documentation gives for H&E. ``train_seg`` has no time limit and its learning-rate schedule depends
on ``n_epochs``, so timed calibration runs (1 and 3 epochs of throwaway networks) measure seconds per epoch and the real
run gets ``n_epochs`` that fit the rest of the budget. Inference: the trained model's own diameter (``diameter=None``
rescales by ``diam_mean / diam_labels``, the training tiles' mean diameter) and ``flow_threshold`` /
``cellprob_threshold`` picked on training tiles (mean AP at IoU 0.5, ``cellpose.metrics.average_precision``).
Writes ``OUTPUT/models/cellpose_kumar``, ``OUTPUT/labels/<id>.png`` and ``OUTPUT/run.json``.

``--predict-from RUN`` skips training: it loads ``RUN/models/cellpose_kumar`` with the channels and thresholds of
``RUN/run.json`` and writes ``OUTPUT/labels/<id>.png`` and ``OUTPUT/predict.json``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def extra_args(p: argparse.ArgumentParser) -> None:
    """Cellpose-specific options (defaults: Cellpose's own, diameter: its nuclei model's)."""
    p.add_argument("--diam-mean", type=float, default=17.0, help="diameter (px) training rescales nuclei to")
    p.add_argument("--channels", type=int, nargs=2, default=[0, 0], help="Cellpose channels; [0, 0]: grayscale")
    p.add_argument("--nimg-per-epoch", type=int, default=None, help="train_seg's default: every training tile")
    p.add_argument("--flow-thresholds", type=float, nargs="+", default=[0.4, 0.6])
    p.add_argument("--cellprob-thresholds", type=float, nargs="+", default=[-1.0, 0.0, 1.0])
    p.add_argument("--tune-tiles", type=int, default=4, help="training tiles used to pick the thresholds")
    p.add_argument("--safety", type=float, default=0.95, help="fraction of the remaining budget to plan for")


def package_versions() -> dict[str, str]:
    """The installed versions run.json and predict.json record."""
    return _common.versions("cellpose", "torch", "numpy")


def segment(model, img, channels: list[int], flow_t: float, prob_t: float):  # noqa: ANN001, ANN201
    """Label map of an RGB tile (``CellposeModel.eval`` at the model's own diameter)."""
    return model.eval(img, channels=channels, channel_axis=2, flow_threshold=flow_t, cellprob_threshold=prob_t)[0]


def load_run(run: Path, record: dict, threads: int = 1):  # noqa: ANN201 - (rgb -> labels)
    """``--predict-from``: the network a previous run saved in ``run/models/cellpose_kumar`` with that run's channels
    and thresholds."""
    import torch

    torch.set_num_threads(threads)
    from cellpose import models

    model = models.CellposeModel(gpu=False, pretrained_model=str(run / "models" / "cellpose_kumar"))
    channels = [int(c) for c in record.get("channels", [0, 0])]
    flow_t = float(record["thresholds"]["flow_threshold"])
    prob_t = float(record["thresholds"]["cellprob_threshold"])
    return lambda img: segment(model, img, channels, flow_t, prob_t)


def main() -> None:
    """Calibrate, train, pick thresholds on training tiles, predict the test tiles, write run.json."""
    args = _common.parse_args(__doc__.splitlines()[0], extra_args)
    if args.predict_from is not None:  # RUN is checked before torch is imported
        _common.predict_only(args, "cellpose", functools.partial(load_run, threads=args.threads), package_versions())
        return
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from cellpose import dynamics, metrics, models, train

    args.output.mkdir(parents=True, exist_ok=True)
    train_ids, test_ids = _common.split_ids(args.data, args.split, args.max_train, args.max_test)
    t_start = time.monotonic()
    deadline = t_start + args.minutes * 60
    images = [_common.read_image(args.data, t) for t in train_ids]
    labels = [_common.read_labels(args.data, t).astype(np.int32) for t in train_ids]
    flows = dynamics.labels_to_flows(labels, device=torch.device("cpu"))  # once, not in every train_seg call
    common = {"train_data": images, "train_labels": flows, "channels": args.channels, "channel_axis": 2,
              "nimg_per_epoch": args.nimg_per_epoch, "min_train_masks": 1}

    # calibration: 1 and 3 epochs of throwaway networks; the difference is the time of 2 epochs without train_seg's
    # per-call set-up (normalising the tiles), which the first run gives
    (args.output / "calibration").mkdir(exist_ok=True)
    took = {}
    for n in (1, 3):
        t0 = time.monotonic()
        probe = models.CellposeModel(gpu=False, pretrained_model=False, diam_mean=args.diam_mean)
        train.train_seg(probe.net, n_epochs=n, save_path=str(args.output / "calibration"), model_name="probe",
                        **common)
        took[n] = time.monotonic() - t0
    sec_per_epoch = max((took[3] - took[1]) / 2, 1e-3)
    setup_s = max(took[1] - sec_per_epoch, 0.0)
    n_epochs = max(1, int(((deadline - time.monotonic()) * args.safety - setup_s) / sec_per_epoch))
    print(f"calibration: {sec_per_epoch:.2f} s/epoch, {setup_s:.1f} s set-up -> n_epochs={n_epochs}", flush=True)

    np.random.seed(args.seed)  # noqa: NPY002 - Cellpose samples from the global numpy state
    model = models.CellposeModel(gpu=False, pretrained_model=False, diam_mean=args.diam_mean)
    path, train_losses, _ = train.train_seg(model.net, n_epochs=n_epochs, save_path=str(args.output),
                                            model_name="cellpose_kumar", **common)
    train_s = time.monotonic() - t_start
    nimg = args.nimg_per_epoch or len(images)

    model = models.CellposeModel(gpu=False, pretrained_model=str(path))
    t0 = time.monotonic()
    tune = list(zip(images, labels, strict=True))[:args.tune_tiles]
    scores = {}
    for flow_t, prob_t in itertools.product(args.flow_thresholds, args.cellprob_thresholds):
        pred = [segment(model, img, args.channels, flow_t, prob_t) for img, _ in tune]
        ap = metrics.average_precision([lab for _, lab in tune], pred, threshold=[0.5])[0]
        scores[(flow_t, prob_t)] = float(np.mean(ap[:, 0]))
        print(f"flow_threshold={flow_t} cellprob_threshold={prob_t}: AP50 {scores[(flow_t, prob_t)]:.4f}",
              flush=True)
    flow_t, prob_t = max(scores, key=scores.get)
    tune_s = time.monotonic() - t0

    pred = _common.predict_tiles(args, test_ids, lambda img: segment(model, img, args.channels, flow_t, prob_t))
    info = {
        "versions": package_versions(),
        "train_tiles": train_ids,
        "minutes_trained": round(train_s / 60, 2),
        "minutes_trained_note": "includes flow computation and the calibration runs",
        "calibration_seconds_per_epoch": round(sec_per_epoch, 3),
        "calibration_setup_seconds": round(setup_s, 2),
        "epochs": n_epochs,
        "iterations": n_epochs * -(-nimg // 8),
        "images_per_epoch": nimg,
        "batch_size": 8,
        "final_train_loss": float(train_losses[-1]),
        "diam_mean": args.diam_mean,
        "diam_labels": float(model.diam_labels),
        "channels": args.channels,
        "augmentation": "train_seg's random_rotate_and_resize (rotation, flip, scale 0.5-1.5 around diam_mean)",
        "thresholds": {"flow_threshold": flow_t, "cellprob_threshold": prob_t},
        "thresholds_chosen_on": f"first {len(tune)} training tiles, mean AP@0.5",
        "threshold_grid": {f"{f},{c}": s for (f, c), s in scores.items()},
        "minutes_threshold_tuning": round(tune_s / 60, 2),
        "model_path": str(path),
        **pred,
    }
    print(_common.write_run_json(args, "cellpose", info))


if __name__ == "__main__":
    main()
