#!/usr/bin/env python
"""Train StarDist 2D from scratch on a split's training tiles for a wall-clock budget, then predict its test tiles.

Run with the StarDist venv's python (``bash benchmarks/peers/setup_stardist.sh`` prints it)::

    $VENV/bin/python benchmarks/peers/train_stardist.py --data ../shared/data/monuseg2018 --split kumar2017 \
        --minutes 120 --threads 1 --output runs/peers/stardist

StarDist's documented H&E set-up (its 2D example notebooks): 3-channel input normalised jointly to the 1-99.8
percentiles, 32 rays, grid (2, 2), 256x256 patches, the notebook's augmenter (random flips / 90-degree rotations and
a random intensity scale and shift). The training tiles serve as the validation data (for ReduceLROnPlateau and
the best-weights checkpoint) and for ``optimize_thresholds``: no test tile is seen before prediction. Training stops
when the budget is used (a Keras callback checked after every batch). Writes ``OUTPUT/stardist/`` (the model),
``OUTPUT/labels/<id>.png`` and ``OUTPUT/run.json``.

``--predict-from RUN`` skips training: it loads ``RUN/stardist/`` (``weights_best.h5``, the weights the run predicted
with) and the thresholds of ``RUN/run.json``, and writes ``OUTPUT/labels/<id>.png`` and ``OUTPUT/predict.json``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

RNG = None  # numpy Generator of the augmenter, seeded in main()


def package_versions() -> dict[str, str]:
    """The installed versions run.json and predict.json record."""
    return _common.versions("stardist", "csbdeep", "tensorflow-cpu", "tensorflow", "numpy")


def extra_args(p: argparse.ArgumentParser) -> None:
    """StarDist-specific options (defaults: StarDist's own)."""
    p.add_argument("--rays", type=int, default=32)
    p.add_argument("--patch", type=int, default=256, help="training patch size")
    p.add_argument("--batch-size", type=int, default=4, help="StarDist's Config2D default")
    p.add_argument("--steps-per-epoch", type=int, default=100, help="StarDist's Config2D default")
    p.add_argument("--no-augment", action="store_true", help="train without the augmenter")
    p.add_argument("--tune-tiles", type=int, default=None,
                   help="training tiles for optimize_thresholds (default: all; 0: keep StarDist's defaults)")
    p.add_argument("--tune-crop", type=int, default=None,
                   help="tune on the central PX x PX crop of each tile (smoke runs: an untrained net makes NMS slow)")


def normalize_rgb(img):  # noqa: ANN001, ANN201 - numpy in, numpy out
    """The H&E notebooks' normalisation: percentiles 1 and 99.8 over all three channels together."""
    from csbdeep.utils import normalize

    return normalize(img, 1, 99.8, axis=(0, 1, 2))


def augmenter(x, y):  # noqa: ANN001, ANN201 - StarDist's augmenter signature: (image, labels) -> (image, labels)
    """StarDist's example augmenter: random flips and 90-degree rotations, random intensity scale and shift."""
    import numpy as np

    perm = tuple(RNG.permutation(2))
    y = y.transpose(perm)
    x = x.transpose(perm + (2,))
    for ax in range(2):
        if RNG.random() > 0.5:
            x = np.flip(x, axis=ax)
            y = np.flip(y, axis=ax)
    x = x * RNG.uniform(0.6, 2) + RNG.uniform(-0.2, 0.2)
    return x, y


def make_predict(model, thresholds: dict):  # noqa: ANN001, ANN201 - StarDist2D in, (rgb -> labels) out
    """Label map of an RGB tile: the notebooks' normalisation, then ``predict_instances`` at the chosen thresholds."""
    import numpy as np

    prob, nms = float(thresholds["prob"]), float(thresholds["nms"])

    def predict(img):  # noqa: ANN001, ANN202
        labels, _ = model.predict_instances(normalize_rgb(img).astype(np.float32), prob_thresh=prob, nms_thresh=nms)
        return labels

    return predict


def limit_threads(threads: int) -> None:
    """TensorFlow's intra- and inter-op pools at ``threads`` (before any TF op runs)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def load_run(run: Path, record: dict, threads: int = 1):  # noqa: ANN201 - (rgb -> labels)
    """``--predict-from``: the StarDist model a previous run saved in ``run/stardist`` (its best weights, the ones
    training ended with) at the thresholds of its run.json."""
    limit_threads(threads)
    from stardist.models import StarDist2D

    model = StarDist2D(None, name="stardist", basedir=str(run))
    model.load_weights("weights_best.h5")
    return make_predict(model, record["thresholds"])


def main() -> None:
    """Train, tune thresholds on the training tiles, predict the test tiles, write run.json."""
    args = _common.parse_args(__doc__.splitlines()[0], extra_args)
    if args.predict_from is not None:  # RUN is checked before TensorFlow is imported
        _common.predict_only(args, "stardist", functools.partial(load_run, threads=args.threads),
                             package_versions())
        return
    import numpy as np
    import tensorflow as tf

    limit_threads(args.threads)
    from stardist import fill_label_holes
    from stardist.models import Config2D, StarDist2D

    global RNG
    RNG = np.random.default_rng(args.seed)
    np.random.seed(args.seed)  # noqa: NPY002 - StarDist draws its patches from the global numpy state
    tf.random.set_seed(args.seed)
    args.output.mkdir(parents=True, exist_ok=True)
    train_ids, test_ids = _common.split_ids(args.data, args.split, args.max_train, args.max_test)
    X = [normalize_rgb(_common.read_image(args.data, t)).astype(np.float32) for t in train_ids]
    Y = [fill_label_holes(_common.read_labels(args.data, t)) for t in train_ids]

    conf = Config2D(n_rays=args.rays, grid=(2, 2), n_channel_in=3, use_gpu=False,
                    train_patch_size=(args.patch, args.patch), train_batch_size=args.batch_size,
                    train_steps_per_epoch=args.steps_per_epoch, train_epochs=1_000_000)
    model = StarDist2D(conf, name="stardist", basedir=str(args.output))

    class Budget(tf.keras.callbacks.Callback):
        """Stop training once the wall-clock budget is used; count the batches."""

        def __init__(self, seconds: float) -> None:
            super().__init__()
            self.deadline = time.monotonic() + seconds
            self.batches = 0
            self.epochs = 0

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.batches += 1
            if time.monotonic() >= self.deadline:
                self.model.stop_training = True

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.epochs += 1
            print(f"epoch {self.epochs}: {self.batches} batches, {logs}", flush=True)

    model.prepare_for_training()
    budget = Budget(args.minutes * 60)
    model.callbacks.append(budget)
    t0 = time.monotonic()
    model.train(X, Y, validation_data=(X, Y), augmenter=None if args.no_augment else augmenter,
                epochs=conf.train_epochs, steps_per_epoch=conf.train_steps_per_epoch)
    train_s = time.monotonic() - t0

    t0 = time.monotonic()
    n_tune = len(X) if args.tune_tiles is None else min(args.tune_tiles, len(X))
    if n_tune:
        c = args.tune_crop
        crop = (lambda a: a) if c is None else (lambda a: a[(a.shape[0] - c) // 2:(a.shape[0] + c) // 2,
                                                            (a.shape[1] - c) // 2:(a.shape[1] + c) // 2])
        thresholds = model.optimize_thresholds([crop(x) for x in X[:n_tune]], [crop(y) for y in Y[:n_tune]])
        tuned_on = f"{n_tune} training tiles{'' if c is None else f' (central {c}x{c} crops)'}, " \
                   "StarDist2D.optimize_thresholds"
    else:
        thresholds = dict(model.thresholds._asdict())
        tuned_on = "not tuned: StarDist's defaults"
    tune_s = time.monotonic() - t0

    thresholds = {k: float(v) for k, v in thresholds.items()}
    pred = _common.predict_tiles(args, test_ids, make_predict(model, thresholds))
    info = {
        "versions": package_versions(),
        "train_tiles": train_ids,
        "minutes_trained": round(train_s / 60, 2),
        "iterations": budget.batches,
        "epochs": budget.epochs,
        "batch_size": conf.train_batch_size,
        "patch_size": list(conf.train_patch_size),
        "n_rays": conf.n_rays,
        "grid": list(conf.grid),
        "augmentation": "none" if args.no_augment else "flips, 90-degree rotations, intensity x U(0.6,2) + U(-0.2,0.2)",
        "validation": "the training tiles (no held-out tile)",
        "thresholds": thresholds,
        "thresholds_chosen_on": tuned_on,
        "minutes_threshold_tuning": round(tune_s / 60, 2),
        "model_dir": str(args.output / "stardist"),
        **pred,
    }
    print(_common.write_run_json(args, "stardist", info))


if __name__ == "__main__":
    main()
