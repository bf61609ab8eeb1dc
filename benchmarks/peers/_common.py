"""What the peer scripts share: the command line, the data layout, thread limits, label-map output, run.json and
the ``--predict-from RUN`` mode (a saved model predicting without training).

Imported by ``train_<peer>.py`` inside each peer's own venv, so it needs only the standard library, numpy and Pillow
(every peer venv has them) and nothing from nuclei-d2; ``benchmarks/peers/speed.py`` imports it from nuclei-d2's venv.
Call :func:`parse_args` (which also limits threads) before importing numpy users such as TensorFlow or torch, so the
limits take effect.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "NUMBA_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")
PEERS = ("stardist", "cellpose", "instanseg")
#: What a finished run of ``train_<peer>.py`` holds besides run.json (paths relative to the run folder): the files
#: ``--predict-from`` loads, checked before any peer package is imported.
RUN_FILES = {
    "stardist": ("stardist/config.json", "stardist/weights_best.h5"),
    "cellpose": ("models/cellpose_kumar",),
    "instanseg": ("instanseg/model_weights.pth", "instanseg/experiment_log.csv"),
}
#: The run.json ``thresholds`` keys each peer's prediction needs.
THRESHOLD_KEYS = {
    "stardist": ("prob", "nms"),
    "cellpose": ("flow_threshold", "cellprob_threshold"),
    "instanseg": ("seed_threshold", "mask_threshold"),
}
DEFAULT_SPLIT = "kumar2017"


class RunError(ValueError):
    """A ``--predict-from`` run folder or input that cannot be used; the message is one line naming the file."""


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments every peer script takes (plus ``extra``'s); sets the thread environment variables."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="dataset folder with splits.json, e.g. "
                                                            "../shared/data/monuseg2018 (required for training; "
                                                            "--predict-from defaults to the run's)")
    p.add_argument("--split", default=None, help=f"key of splits.json with train / test_* lists (default: "
                                                 f"{DEFAULT_SPLIT}; --predict-from: the run's)")
    p.add_argument("--minutes", type=float, default=120.0, help="wall-clock training budget")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for training and inference")
    p.add_argument("--output", required=True, type=Path, help="run folder: model, labels/<id>.png, run.json "
                                                              "(--predict-from: labels/<id>.png, predict.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train", type=int, default=None, help="use only the first N training tiles (smoke runs)")
    p.add_argument("--max-test", type=int, default=None, help="predict only the first N test tiles (smoke runs)")
    p.add_argument("--predict-from", type=Path, default=None, metavar="RUN",
                   help="skip training: load the model and thresholds a previous run of this script saved in RUN and "
                        "predict the split's test tiles (or --input) into OUTPUT/labels, timings in "
                        "OUTPUT/predict.json")
    p.add_argument("--input", type=Path, nargs="+", default=None, metavar="IMAGE",
                   help="with --predict-from: these RGB images instead of the split's test tiles")
    p.add_argument("--warmup", type=int, default=0,
                   help="with --predict-from: untimed predictions of the first image before the timed ones")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.predict_from is None:
        if args.data is None:
            p.error("--data is required for training (only --predict-from RUN can take the run's)")
        if args.input is not None or args.warmup:
            p.error("--input and --warmup go with --predict-from RUN")
        args.split = args.split or DEFAULT_SPLIT
    elif args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    for var in THREAD_VARS:
        os.environ[var] = str(args.threads)
    return args


def split_ids(data: Path, split: str, max_train: int | None = None,
              max_test: int | None = None) -> tuple[list[str], list[str]]:
    """Training and test tile ids of ``split`` (test = every ``test*`` list, in file order)."""
    path = Path(data) / "splits.json"
    try:
        splits = json.loads(path.read_text())[split]
    except FileNotFoundError:
        raise RunError(f"{path}: missing (--data must be a dataset folder with splits.json)") from None
    except KeyError:
        raise RunError(f"{path}: no split {split!r}") from None
    train = list(splits["train"])[:max_train]
    test = [i for key, ids in splits.items() if key.startswith("test") for i in ids][:max_test]
    return train, test


def tile_path(data: Path, tile: str) -> Path:
    """The image file of a dataset tile: ``train/images/<id>.tif``."""
    return Path(data) / "train" / "images" / f"{tile}.tif"


def read_image_file(path: Path) -> Any:
    """RGB uint8 image (H, W, 3) of any file Pillow reads (LZW TIFF included: tifffile would need imagecodecs)."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def read_image(data: Path, tile: str) -> Any:
    """RGB uint8 tile (H, W, 3) from ``train/images/<id>.tif``."""
    return read_image_file(tile_path(data, tile))


def read_labels(data: Path, tile: str) -> Any:
    """uint16 instance label map (H, W) from ``train/labels/<id>.png``."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(data / "train" / "labels" / f"{tile}.png"))


def _atomic(path: Path, write: Callable[[Any], None]) -> Path:
    """Call ``write(file object)`` on a temporary file beside ``path``, then rename it to ``path`` (as
    ``nuclei_d2.utils.io.atomic_write``, which the peer venvs cannot import)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, record: Any) -> Path:
    """``record`` as indented JSON at ``path`` (temporary file, then renamed)."""
    text = json.dumps(record, indent=1, default=str) + "\n"
    return _atomic(Path(path), lambda f: f.write(text.encode()))


def write_labels(output: Path, tile: str, labels: Any) -> Path:
    """Write ``output/labels/<id>.png``, a uint16 label map (instances renumbered 1..N).

    A map with more than 65535 instances (only an untrained network makes that many) goes to ``<id>.npy`` as int32
    instead, which ``tools/evaluate.py`` reads too; the other format's file of the same id is removed, so a folder
    never holds two maps of one tile.
    """
    import numpy as np
    from PIL import Image

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{tile}: a label map must be 2-D, got shape {labels.shape}")
    ids = np.unique(labels[labels > 0])
    big = len(ids) > 65535
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, dtype=np.int32 if big else np.uint16)
    lut[ids] = np.arange(1, len(ids) + 1)
    folder = Path(output) / "labels"
    path = folder / f"{tile}.{'npy' if big else 'png'}"
    if big:
        print(f"warning: {tile}: {len(ids)} instances do not fit uint16; writing {path.name}", flush=True)
        _atomic(path, lambda f: np.save(f, lut[labels]))
    else:
        _atomic(path, lambda f: Image.fromarray(lut[labels]).save(f, format="PNG"))
    (folder / f"{tile}.{'png' if big else 'npy'}").unlink(missing_ok=True)
    return path


def predict_files(output: Path, items: Sequence[tuple[str, Path]], predict: Callable[[Any], Any],
                  warmup: int = 0) -> dict[str, Any]:
    """Run ``predict(rgb) -> label map`` on each ``(id, image file)``, write ``output/labels/<id>.png``; return the
    timings (reading and writing excluded; ``warmup`` untimed calls on the first image come first)."""
    import numpy as np

    if warmup and items:
        first = read_image_file(items[0][1])
        for _ in range(warmup):
            predict(first)
    seconds = {}
    cpu = {}
    counts = {}
    for tile, path in items:
        img = read_image_file(path)
        t0, c0 = time.perf_counter(), time.process_time()
        labels = predict(img)
        seconds[tile] = round(time.perf_counter() - t0, 3)
        cpu[tile] = round(time.process_time() - c0, 3)
        write_labels(output, tile, labels)
        counts[tile] = int(len(np.unique(labels[labels > 0])))
        print(f"predicted {tile}: {counts[tile]} nuclei in {seconds[tile]:.1f} s ({cpu[tile]:.1f} s CPU)", flush=True)
    mean = sum(seconds.values()) / max(len(seconds), 1)
    return {"test_tiles": [t for t, _ in items], "seconds_per_tile": round(mean, 3),
            "seconds_per_tile_min": min(seconds.values(), default=0.0), "seconds_by_tile": seconds,
            "cpu_seconds_by_tile": cpu, "nuclei_by_tile": counts}


def predict_tiles(args: argparse.Namespace, tiles: list[str], predict: Callable[[Any], Any]) -> dict[str, Any]:
    """:func:`predict_files` on the dataset tiles ``tiles`` of ``args.data`` into ``args.output``."""
    return predict_files(args.output, [(t, tile_path(args.data, t)) for t in tiles], predict)


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
    return write_json(args.output / "run.json", record)


def read_run(run: Path, peer: str) -> dict[str, Any]:
    """The run.json of a finished ``train_<peer>.py`` run in ``run``, checked: it is that peer's, it has the
    thresholds the peer's prediction needs, and the model files of :data:`RUN_FILES` exist. Raises
    :class:`RunError` naming the file and the problem."""
    run = Path(run)
    if peer not in RUN_FILES:
        raise RunError(f"unknown peer {peer!r} (known: {', '.join(PEERS)})")
    path = run / "run.json"
    if not run.is_dir():
        raise RunError(f"{run}: no such run folder")
    if not path.is_file():
        raise RunError(f"{path}: missing (train_{peer}.py writes it last: an unfinished or foreign run folder)")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise RunError(f"{path}: not a JSON object")
    if record.get("peer") != peer:
        raise RunError(f"{path}: a run of {record.get('peer')!r}, not of {peer!r}")
    thresholds = record.get("thresholds")
    missing = [k for k in THRESHOLD_KEYS[peer]
               if not isinstance(thresholds, dict) or not isinstance(thresholds.get(k), int | float)]
    if missing:
        raise RunError(f"{path}: no numeric thresholds {missing} (\"thresholds\": {thresholds!r})")
    for rel in RUN_FILES[peer]:
        if not (run / rel).is_file():
            raise RunError(f"{run / rel}: missing (train_{peer}.py saves its model there)")
    return record


def predict_inputs(args: argparse.Namespace, run: dict[str, Any]) -> list[tuple[str, Path]]:
    """``(id, image file)`` to predict: ``--input`` files (id: file stem), else the test tiles of the split (the
    run's data and split unless ``--data`` / ``--split`` say otherwise), the first ``--max-test``."""
    if args.input:
        items = [(Path(f).stem, Path(f)) for f in args.input]
        for _, f in items:
            if not f.is_file():
                raise RunError(f"{f}: no such image")
        stems = [t for t, _ in items]
        dup = sorted({t for t in stems if stems.count(t) > 1})
        if dup:
            raise RunError(f"--input: several images named {dup[0]!r} would write the same labels/{dup[0]}.png")
        return items[:args.max_test]
    data = args.data if args.data is not None else Path(str(run.get("data", "")))
    split = args.split or run.get("split") or DEFAULT_SPLIT
    _, test = split_ids(data, split, None, args.max_test)
    items = [(t, tile_path(data, t)) for t in test]
    for _, f in items:
        if not f.is_file():
            raise RunError(f"{f}: no such image (split {split!r} of {data})")
    return items


def predict_only(args: argparse.Namespace, peer: str, load: Callable[[Path, dict[str, Any]], Callable[[Any], Any]],
                 versions: dict[str, str] | None = None) -> Path:
    """``--predict-from RUN``: check RUN (:func:`read_run`) and the inputs, ``load(RUN, run.json) -> predict`` (the
    peer's own model loading, not timed), predict each image into ``OUTPUT/labels``, write ``OUTPUT/predict.json``.
    Exits with a one-line error when RUN or an input cannot be used."""
    run_dir = Path(args.predict_from)
    try:
        run = read_run(run_dir, peer)
        items = predict_inputs(args, run)
        if Path(args.output).resolve() == run_dir.resolve():
            raise RunError(f"{args.output}: is the run folder itself; give another --output (its labels/ are the "
                           "run's own)")
    except RunError as e:
        raise SystemExit(f"error: {e}") from None
    t0 = time.perf_counter()
    predict = load(run_dir, run)
    load_s = time.perf_counter() - t0
    pred = predict_files(args.output, items, predict, args.warmup)
    record = {
        "peer": peer,
        "predict_from": str(run_dir.resolve()),
        "thresholds": run["thresholds"],
        "run_minutes_trained": run.get("minutes_trained"),
        "argv": sys.argv,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": args.threads,
        "warmup": args.warmup,
        "seconds_model_load": round(load_s, 3),
        "timing_note": "seconds per image: the peer's prediction call on an RGB array in memory (normalisation and "
                       "post-processing included; reading, writing and model loading excluded); CPU seconds: the "
                       "process's CPU time over the same call (all its threads)",
        "versions": versions or {},
        **pred,
    }
    path = write_json(Path(args.output) / "predict.json", record)
    print(path)
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
