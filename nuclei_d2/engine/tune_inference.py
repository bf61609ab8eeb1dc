"""Grid search of a trained model's inference settings on a training split (``tools/tune_inference.py``).

The papers' post-processing settings assume their models: fully trained, on their data. A model trained for minutes
on a CPU (docs/time_to_accuracy.md) is calibrated differently, and its best score threshold, inside-probability
threshold or marker smoothing can be far from the defaults -- on Kumar, tuning them moved the NB U-Net from AJI 0.299
to 0.422 and Mask R-CNN+ from 0.521 to 0.548 with the same weights. This module evaluates every combination of a
grid of config values with the project's evaluator on a registered dataset (a *training* split: tuning on the test
split would report an optimistic number) and writes the best as a config file that inherits from the tuned one::

    python tools/tune_inference.py --config-file configs/nb_unet-cpu.yaml --weights runs/nb/model_final.pth \\
        --dataset kumar_train --grid MODEL.NB.THRESHOLD=0.5,0.7,0.8,0.9
    python tools/train_net.py --config-file output/nb_unet-cpu/tune_inference/tuned.yaml --eval-only \\
        MODEL.WEIGHTS runs/nb/model_final.pth

The classical floor is tuned the same way (``tools/tune_classical.py`` is this run with its default grid)::

    python tools/tune_inference.py --config-file configs/classical_watershed.yaml --dataset kumar_train \
        --grid MODEL.CLASSICAL.THRESHOLD_SCALE=0.8,0.9,1.0,1.1,1.2,1.3 MODEL.CLASSICAL.SIGMA_FACTOR=0.25,0.5,0.75 \
        MODEL.CLASSICAL.MIN_SIZE=10,30,60

Each grid point rebuilds the model (its modules read the config when built) and evaluates it, so the cost is points x
images x seconds per image; ``--max-images`` tunes on the first N images only. When every key of the grid is
post-processing (the model's ``postprocess_keys``: a dense model's thresholds, dilations, minimum sizes, BRP-Net's
refinement settings; the classical floor's threshold, marker smoothing, minimum size) and test-time copies, if any,
are merged by averaging maps, the maps are computed once per image and kept in memory (K x H x W float32 per image:
12 MB for three maps of a 1000x1000 tile, 8 MB for the classical floor's two haematoxylin maps), and only the
post-processing runs per point: a 16-tile, 8-copy TTA grid of the NB U-Net costs one TTA pass, not one per point. Such
a model splits its inference in two: ``output_probs(input)`` (the maps) and ``output_from_probs(maps, input)``.
Likewise, when the model's test-time copies are merged as nuclei (an R-CNN's TTA) and the grid only changes which
copies are made and how they are merged (``TEST.AUG.TRANSFORMS``, ``TEST.AUG.HUE_DELTA``, ``TEST.MERGE`` thresholds
and votes), each copy of each image is predicted once for the whole grid (``TestTimeWrapper.prediction_cache``; the
nuclei are kept as crops, megabytes per image): a grid over copy sets costs the union of its copies, not their sum.
The object-level Hausdorff distance (the slowest metric) is not computed unless ``--metric`` asks for it.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..inference.prediction_cache import PredictionCache
from .defaults import write_override_config

__all__ = ["parse_grid", "run", "tune_inference", "write_tuned_config"]

# The tuned config is plain overrides on top of the tuned one.
write_tuned_config = write_override_config

logger = logging.getLogger(__name__)

#: Metrics shown for every grid point (plus the one maximised).
SHOWN = ("AJI", "PQ", "Dice1", "F1", "precision", "recall")


def _split_values(values: str) -> list[str]:
    """Split on the commas outside brackets and quotes, so list values (``['identity','hflip'],['identity']``) stay
    whole."""
    out, depth, quote, cur = [], 0, "", []
    for ch in values:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return [v.strip() for v in out if v.strip()]


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["KEY=v1,v2", ...]`` -> ``{KEY: ["v1", "v2"], ...}`` (values stay strings, parsed as config overrides).
    Commas inside brackets or quotes do not split: ``TEST.AUG.TRANSFORMS=['identity'],['identity','hflip']``.

    Raises:
        ValueError: an item without ``=`` or without values, or a key given twice.
    """
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        vals = _split_values(values) if sep else []
        if not key or not vals:
            raise ValueError(f"--grid {item!r}: expected KEY=VALUE[,VALUE...], e.g. MODEL.NB.THRESHOLD=0.5,0.7")
        if key in grid:
            raise ValueError(f"--grid: {key} is given twice")
        grid[key] = vals
    if not grid:
        raise ValueError("--grid: nothing to tune (give at least one KEY=VALUE[,VALUE...])")
    return grid


def _subset(dataset: str, max_images: int) -> str:
    """A registered view of the first ``max_images`` images of ``dataset`` (the dataset itself if 0)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if max_images <= 0:
        return dataset
    name = f"{dataset}__first{max_images}"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: DatasetCatalog.get(dataset)[:max_images])
        meta = {k: v for k, v in MetadataCatalog.get(dataset).as_dict().items() if k != "name"}
        MetadataCatalog.get(name).set(**meta)
    return name


#: Keys that only the evaluator reads.
EVALUATOR_PREFIXES = ("TEST.NUCLEI_EVAL.",)


class CachedMaps(nn.Module):
    """A model whose maps (``output_probs``: a dense model's probabilities, a test-time wrapper's averaged ones, the
    classical floor's haematoxylin) are computed once per image and reused: each call post-processes the cached maps
    with ``model``'s own settings (``output_from_probs``). ``cache`` (file name -> ``K x H x W`` maps) is shared
    between the grid points; ``computed`` counts the images whose maps this instance made."""

    def __init__(self, model: nn.Module, cache: PredictionCache):
        super().__init__()
        self.model, self.cache, self.computed = model, cache, 0

    @torch.no_grad()
    def forward(self, batched_inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        outs = []
        for inp in batched_inputs:
            key = str(inp.get("file_name", inp.get("image_id")))
            probs, _, fresh = self.cache.get(key, lambda inp=inp: self.model.output_probs(inp))
            self.computed += int(fresh)
            outs.append(self.model.output_from_probs(probs, inp))
        return outs


def maps_reusable(model: nn.Module, keys: Sequence[str]) -> bool:
    """Whether every grid key only changes ``model``'s post-processing (or the evaluator), so its maps can be
    computed once for the whole grid: ``model`` splits its inference in ``output_probs`` / ``output_from_probs`` (a
    dense model, the classical floor, a test-time wrapper averaging dense maps; not one voting on nuclei) and each key
    is in its ``postprocess_keys`` (a wrapper's: its first member's)."""
    if not (hasattr(model, "output_probs") and hasattr(model, "output_from_probs")):
        return False
    if getattr(model, "merge_mode", "probs") != "probs":
        return False
    allowed = set(getattr(getattr(model, "dense_model", model), "postprocess_keys", ()))
    return all(k in allowed or k.startswith(EVALUATOR_PREFIXES) for k in keys)


#: Keys that only choose a test-time wrapper's copies (each copy is predicted the same whatever the others are) or
#: how it merges their nuclei.
COPY_KEYS = ("TEST.AUG.TRANSFORMS", "TEST.AUG.HUE_DELTA", "TEST.MERGE.IOU_THRESHOLD", "TEST.MERGE.MIN_VOTES",
             "TEST.MERGE.MASK_THRESHOLD")


def copies_reusable(model: nn.Module, keys: Sequence[str]) -> bool:
    """Whether ``model`` is a test-time wrapper merging nuclei and every grid key only changes its copies or their
    merge (or the evaluator), so each copy's prediction can be shared between grid points."""
    from ..inference.test_time import TestTimeWrapper

    if not isinstance(model, TestTimeWrapper) or model.merge_mode != "instances":
        return False
    return all(k in COPY_KEYS or k.startswith(EVALUATOR_PREFIXES) for k in keys)


def _evaluate(cfg: Any, model: nn.Module) -> dict[str, Any]:
    """:meth:`NucleiTrainer.test` on the first test dataset for a model already wrapped for test time (or inside a
    :class:`CachedMaps`), so the wrapper is built once per point."""
    from detectron2.evaluation import inference_on_dataset

    from ..utils.io import write_json_atomic
    from .trainer import NucleiTrainer

    name = cfg.DATASETS.TEST[0]
    results = inference_on_dataset(model, NucleiTrainer.build_test_loader(cfg, name),
                                   NucleiTrainer.build_evaluator(cfg, name))
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    write_json_atomic(os.path.join(cfg.OUTPUT_DIR, "metrics_final.json"), results, indent=2)
    return results


def tune_inference(config_file: str, dataset: str, grid: dict[str, Sequence[str]], *, weights: str = "",
                   opts: Sequence[str] = (), metric: str = "AJI", max_images: int = 0, output_dir: str = "",
                   on_row: Callable[[dict[str, Any]], None] | None = None, reuse_maps: bool = True
                   ) -> list[dict[str, Any]]:
    """Evaluate every combination of ``grid`` on ``dataset``; rows sorted best first by mean ``metric``.

    Args:
        config_file: the config of the trained model; ``opts`` are further overrides (applied before the grid's).
        dataset: a registered dataset with ground truth (a training split).
        grid: config key -> values to try (strings, as on the command line).
        weights: checkpoint to evaluate ("" = the config's MODEL.WEIGHTS).
        output_dir: each point's metrics_final.json goes to ``output_dir/<point number>`` (default
            ``OUTPUT_DIR/tune_inference``).
        reuse_maps: compute the model's maps once when the grid only changes its post-processing (see the module
            docstring); False = full inference at every point.

    Each row holds the grid values (strings), every nuclei metric of the evaluation, and ``"opts"``: the overrides
    that reproduce it.

    Raises:
        ConfigError: a key that does not exist, a value it cannot take, an unregistered dataset.
        KeyError: ``metric`` is not one the evaluator reports.
        ValueError: the dataset has no images.
    """
    from detectron2.data import DatasetCatalog

    from ..checkpoint import NucleiCheckpointer
    from ..inference.test_time import build_test_time_wrapper
    from .defaults import check_datasets, setup_cfg
    from .trainer import NucleiTrainer

    check_datasets([dataset], "--dataset")
    name = _subset(dataset, max_images)
    if not DatasetCatalog.get(name):
        raise ValueError(f"dataset {dataset!r} has no images to tune on")
    keys = list(grid)
    points = list(itertools.product(*(grid[k] for k in keys)))
    base_opts = [*opts, "DATASETS.TEST", repr((name,)), "TEST.EVALUATORS", '["nuclei"]']
    if "hausdorff" not in metric.lower():  # the slowest metric, and not what is tuned
        base_opts += ["TEST.NUCLEI_EVAL.HAUSDORFF", "False"]
    if weights:
        base_opts += ["MODEL.WEIGHTS", weights]
    rows = []
    cache, copy_cache = PredictionCache(), PredictionCache()  # maps by image; test-time copies
    for i, values in enumerate(points):
        point_opts = [x for kv in zip(keys, values, strict=True) for x in kv]
        cfg = setup_cfg(config_file, [*base_opts, *point_opts], eval_only=True, freeze=False)
        root = output_dir or os.path.join(cfg.OUTPUT_DIR, "tune_inference")
        cfg.OUTPUT_DIR = os.path.join(root, f"{i:03d}")
        cfg.freeze()
        logger.info("grid point %d/%d: %s", i + 1, len(points), " ".join(point_opts))
        model = NucleiTrainer.build_model(cfg)
        NucleiCheckpointer.from_config(model, cfg, config_file=config_file).load(cfg.MODEL.WEIGHTS)
        wrapped = build_test_time_wrapper(cfg, model)  # TEST.AUG / TEST.ENSEMBLE, as NucleiTrainer.test does
        if reuse_maps and len(points) > 1 and maps_reusable(wrapped, keys):
            cached = CachedMaps(wrapped, cache)
            nuclei = _evaluate(cfg, cached)["nuclei"]
            logger.info("grid point %d: maps of %d image(s) computed, %d reused", i + 1, cached.computed,
                        len(cache) - cached.computed)
        elif reuse_maps and len(points) > 1 and copies_reusable(wrapped, keys):
            before = copy_cache.computed
            wrapped.prediction_cache = copy_cache
            nuclei = _evaluate(cfg, wrapped)["nuclei"]
            logger.info("grid point %d: %d test-time copies predicted, the others reused", i + 1,
                        copy_cache.computed - before)
        else:
            nuclei = _evaluate(cfg, wrapped)["nuclei"]
        if metric not in nuclei:
            raise KeyError(f"--metric {metric!r} is not reported by the evaluator; choose one of {sorted(nuclei)}")
        row = {**dict(zip(keys, values, strict=True)), **nuclei, "opts": point_opts}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    rows.sort(key=lambda r: -r[metric])
    return rows


#: Overrides that say where a tuning run writes, not how the model predicts: left out of the tuned config.
RUN_ONLY_KEYS = ("OUTPUT_DIR",)


def tuned_opts(opts: Sequence[str], weights: str, best: Sequence[str]) -> list[str]:
    """The overrides of the tuned config: the user's own (e.g. ``TEST.AUG.ENABLED True``, without which a tuned copy
    set would not be used), the weights tuned with, then the best grid point's (which win over the user's)."""
    pairs = [(k, v) for k, v in zip(opts[::2], opts[1::2], strict=True) if k not in RUN_ONLY_KEYS]
    if weights:
        pairs.append(("MODEL.WEIGHTS", weights))
    return [x for kv in pairs for x in kv] + list(best)


def run(args: argparse.Namespace) -> int:
    """``tools/tune_inference.py``, after parsing (its parser lives in the tool, so --help needs no torch): tune,
    print the table, write the tuned config. Returns the exit status (2 for bad input, one line on stderr)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from tabulate import tabulate

    from ..data.datasets import DatasetLoadError
    from .defaults import ConfigError, setup_cfg

    try:
        grid = parse_grid(args.grid)
        weights = ["MODEL.WEIGHTS", args.weights] if args.weights else []
        cfg = setup_cfg(args.config_file, [*args.opts, *weights], eval_only=True)  # fail early on bad input
        arch = getattr(args, "meta_architecture", "")  # a preset's grid fits one architecture (tune_classical.py)
        if arch and cfg.MODEL.META_ARCHITECTURE != arch:
            raise ConfigError(f"{args.config_file}: MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}; "
                              f"this grid tunes {arch} configs")
        rows = tune_inference(args.config_file, args.dataset, grid, weights=args.weights, opts=args.opts,
                              metric=args.metric, max_images=args.max_images, reuse_maps=args.reuse_maps)
    except (ConfigError, DatasetLoadError, KeyError, ValueError) as e:  # DatasetLoadError: e.g. images moved
        print(f"error: {e}", file=sys.stderr)
        return 2
    cols = [*grid, *dict.fromkeys([args.metric, *SHOWN])]
    n = int(rows[0].get("n_images", 0))
    images = f"{n} image{'s' if n != 1 else ''}"
    print(f"\n{len(rows)} settings on {images} of {args.dataset}, best by mean {args.metric}:")
    shown = rows[: args.top] if getattr(args, "top", 0) > 0 else rows
    print(tabulate([[r.get(c, "") for c in cols] for r in shown], headers=cols, floatfmt=".3f"))
    out = args.output or os.path.join(cfg.OUTPUT_DIR, "tune_inference", "tuned.yaml")
    comment = (f"Tuned by tools/tune_inference.py on {args.dataset} ({images}), weights "
               f"{args.weights or cfg.MODEL.WEIGHTS or '(none)'}: mean {args.metric} {rows[0][args.metric]:.4f}")
    path = write_override_config(out, args.config_file, tuned_opts(args.opts, args.weights, rows[0]["opts"]), comment)
    print(f"\nbest: {' '.join(rows[0]['opts'])}\nwrote {path}")
    return 0
