"""What the peer scripts share: the command line, the data layout, thread limits, label-map output and run.json.

Imported by ``train_<peer>.py`` inside each peer's own venv, so it needs only the standard library, numpy and Pillow
(every peer venv has them) and nothing from nuclei-d2. Call :func:`parse_args` (which also limits threads)
before importing numpy users such as TensorFlow or torch, so the limits take effect.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "NUMBA_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The arguments every peer script takes (plus ``extra``'s); sets the thread environment variables."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="dataset folder with splits.json, e.g. "
                                                             "../shared/data/monuseg2018")
    p.add_argument("--split", default="kumar2017", help="key of splits.json with train / test_* lists")
    p.add_argument("--minutes", type=float, default=120.0, help="wall-clock training budget")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for training and inference")
    p.add_argument("--output", required=True, type=Path, help="run folder: model, labels/<id>.png, run.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train", type=int, default=None, help="use only the first N training tiles (smoke runs)")
    p.add_argument("--max-test", type=int, default=None, help="predict only the first N test tiles (smoke runs)")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    for var in THREAD_VARS:
        os.environ[var] = str(args.threads)
    return args


def split_ids(data: Path, split: str, max_train: int | None = None,
              max_test: int | None = None) -> tuple[list[str], list[str]]:
    """Training and test tile ids of ``split`` (test = every ``test*`` list, in file order)."""
    splits = json.loads((data / "splits.json").read_text())[split]
    train = list(splits["train"])[:max_train]
    test = [i for key, ids in splits.items() if key.startswith("test") for i in ids][:max_test]
    return train, test


def read_image(data: Path, tile: str) -> Any:
    """RGB uint8 tile (H, W, 3) from ``train/images/<id>.tif`` (LZW TIFF: Pillow reads it, tifffile would need
    imagecodecs)."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(data / "train" / "images" / f"{tile}.tif").convert("RGB"))


def read_labels(data: Path, tile: str) -> Any:
    """uint16 instance label map (H, W) from ``train/labels/<id>.png``."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(data / "train" / "labels" / f"{tile}.png"))


def write_labels(output: Path, tile: str, labels: Any) -> Path:
    """Write ``output/labels/<id>.png``, a uint16 label map (instances renumbered 1..N).

    A map with more than 65535 instances (only an untrained network makes that many) goes to ``<id>.npy`` as int32
    instead, which ``tools/evaluate.py`` reads too.
    """
    import numpy as np
    from PIL import Image

    labels = np.asarray(labels)
    ids = np.unique(labels[labels > 0])
    big = len(ids) > 65535
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, dtype=np.int32 if big else np.uint16)
    lut[ids] = np.arange(1, len(ids) + 1)
    path = output / "labels" / f"{tile}.{'npy' if big else 'png'}"
    path.parent.mkdir(parents=True, exist_ok=True)
    if big:
        print(f"warning: {tile}: {len(ids)} instances do not fit uint16; writing {path.name}", flush=True)
        np.save(path, lut[labels])
    else:
        Image.fromarray(lut[labels]).save(path)
    return path


def predict_tiles(args: argparse.Namespace, tiles: list[str], predict: Callable[[Any], Any]) -> dict[str, Any]:
    """Run ``predict(rgb) -> label map`` on each tile, write the PNGs; return timings for run.json."""
    import numpy as np

    seconds = {}
    counts = {}
    for tile in tiles:
        img = read_image(args.data, tile)
        t0 = time.perf_counter()
        labels = predict(img)
        seconds[tile] = round(time.perf_counter() - t0, 3)
        write_labels(args.output, tile, labels)
        counts[tile] = int(len(np.unique(labels[labels > 0])))
        print(f"predicted {tile}: {counts[tile]} nuclei in {seconds[tile]:.1f} s", flush=True)
    mean = sum(seconds.values()) / max(len(seconds), 1)
    return {"test_tiles": tiles, "seconds_per_tile": round(mean, 3), "seconds_by_tile": seconds,
            "nuclei_by_tile": counts}


def write_run_json(args: argparse.Namespace, peer: str, info: dict[str, Any]) -> Path:
    """``output/run.json``: the command line, machine, budget and what the peer script measured."""
    record = {
        "peer": peer,
        "argv": sys.argv,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "minutes_budget": args.minutes,
        "threads": args.threads,
        "seed": args.seed,
        "split": args.split,
        "data": str(args.data),
        **info,
    }
    path = args.output / "run.json"
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return path


def versions(*names: str) -> dict[str, str]:
    """Installed distribution versions (``importlib.metadata``), ``"missing"`` where not installed."""
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def f1_at_half(true: Any, pred: Any) -> float:
    """Detection F1 at IoU > 0.5 (pairs above 0.5 are unique), for picking thresholds on training tiles."""
    import numpy as np

    true = np.asarray(true).astype(np.int64)
    pred = np.asarray(pred).astype(np.int64)
    n_true = len(np.unique(true[true > 0]))
    n_pred = len(np.unique(pred[pred > 0]))
    if n_true + n_pred == 0:
        return 1.0
    both = (true > 0) & (pred > 0)
    pairs, inter = np.unique(true[both] * (int(pred.max()) + 1) + pred[both], return_counts=True)
    t_ids, p_ids = np.divmod(pairs, int(pred.max()) + 1)
    t_area = np.bincount(true.ravel())
    p_area = np.bincount(pred.ravel())
    iou = inter / (t_area[t_ids] + p_area[p_ids] - inter)
    tp = int((iou > 0.5).sum())
    return 2 * tp / (n_true + n_pred)
