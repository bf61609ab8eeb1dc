"""The README demo: train a tiny model on the embedded synthetic data, predict a held-apart tile, evaluate."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.utils.logger import setup_logger

from ..config import build_cfg
from ..structures import annotations_to_label_map, instances_to_label_map
from ..utils.io import atomic_write, read_image_rgb, read_label_map, write_label_map
from .defaults import setup_cfg
from .trainer import NucleiTrainer

__all__ = ["count_nuclei", "demo_cfg", "demo_tile", "run_demo", "run_zoo_demo"]

logger = logging.getLogger("nuclei_d2.demo")


def _steps_within(config_file: str, opts: list[str], max_iter: int) -> list[str]:
    """An override keeping only the learning-rate steps before ``max_iter``.

    The tiny configs step at iteration 1000; a demo of exactly 1000 iterations would otherwise be refused (a step at
    the last iteration), and steps past the end do nothing anyway. A SOLVER.STEPS given in ``opts`` wins.
    """
    steps = tuple(build_cfg(config_file, opts).SOLVER.STEPS)
    kept = tuple(s for s in steps if s < max_iter)
    return [] if kept == steps else ["SOLVER.STEPS", repr(kept)]


def demo_cfg(config_file: str, output_dir: str | os.PathLike, max_iter: int, opts: list[str] | None = None
             ) -> CfgNode:
    """The demo's config: ``config_file`` trained ``max_iter`` iterations into ``output_dir``, ``opts`` last.

    One checkpoint only, the final one (the tiny configs save every 10 iterations: 16 files of 149 MB for the
    default 150 iterations); a SOLVER.CHECKPOINT_PERIOD in ``opts`` wins.
    """
    opts = ["OUTPUT_DIR", str(output_dir), "SOLVER.MAX_ITER", str(max_iter), "SOLVER.CHECKPOINT_PERIOD",
            str(max_iter + 1), *(opts or [])]
    return setup_cfg(config_file, _steps_within(config_file, opts, max_iter) + opts)


def _save_weights_only(model: torch.nn.Module, path: Path, iteration: int) -> Path:
    """Replace the final checkpoint by the model's weights: with AdamW the optimizer state holds two more copies of
    every weight (149 MB instead of 50 for the tiny model), and the demo is never resumed."""
    state = {"model": model.state_dict(), "iteration": iteration}
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def count_nuclei(label_map: np.ndarray) -> int:
    """The number of distinct non-zero labels: the nuclei a label map holds (its maximum also counts the ids of
    instances that later, overlapping ones covered completely)."""
    labels = np.unique(label_map)
    return int(np.count_nonzero(labels))


def demo_tile(config_file: str, opts: list[str] | None = None) -> dict[str, Any]:
    """The dataset record of the demo's held-apart tile: the first image of ``config_file``'s first test dataset
    (the embedded synthetic H&E-like tiles are generated on first use)."""
    cfg = build_cfg(config_file, opts or [])
    return DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]


def run_zoo_demo(image: str | os.PathLike, output_dir: str | os.PathLike, name: str | None = None
                 ) -> dict[str, Any] | None:
    """Segment ``image`` with a trained model zoo entry (default: the zoo's flagship) and write its overlay, GeoJSON
    and per-nucleus CSV into ``output_dir``, as ``tools/predict.py --model NAME`` does; prints the paths and the
    command that does the same on the user's own image or slide. Returns None (and says so) when the zoo has no
    flagship and no ``name`` is given."""
    from ..inference.predictor import Predictor
    from ..inference.run import RunOptions, predict_file
    from ..model_zoo import flagship, get_config, get_entry, zoo_dir

    name = name or flagship()
    if name is None:
        print(f"model zoo ({zoo_dir()}): no flagship entry, so no trained model was run (docs/model_zoo.md)",
              flush=True)
        return None
    entry = get_entry(name)
    cfg = get_config(name)  # every file of the entry sha256-checked first
    predictor = Predictor(cfg, progress=False)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = predict_file(predictor, image, out, RunOptions(outputs=("overlay", "geojson", "csv"), overwrite=True))
    held = ((entry.card.get("held_out") or {}).get("scores") or {})
    score = f", held-out AJI {held['AJI']:.3f} on kumar_test (its card)" if isinstance(held.get("AJI"), float) else ""
    tool = Path(__file__).resolve().parents[2] / "tools" / "predict.py"  # the checkout's, when run from one
    command = (f"{sys.executable} {tool if tool.is_file() else 'tools/predict.py'} --model {name} "
               "--input YOUR_IMAGE_OR_SLIDE --output OUT_FOLDER --outputs overlay geojson csv")
    summary = {"model": name, "image": str(image), "nuclei_predicted": result.nuclei, "seconds": result.seconds,
               **result.outputs, "command": command}
    lines = [
        "",
        f"Model zoo: {name} ({entry.description or entry.kind}{score}) on the same tile:",
        f"  predicted {result.nuclei} nuclei in {result.seconds:.1f} s (a model trained on real H&E at 40x; the tile "
        "is synthetic)",
        *(f"  {kind}: {path}" for kind, path in result.outputs.items()),
        "The same on your own image or slide (add --tissue-mask for a whole slide; the zoo models saw 40x, "
        "~0.25 um/px: --magnification 40 picks that level):",
        f"  {command}",
    ]
    print(os.linesep.join(lines), flush=True)
    return summary


def run_demo(config_file: str, output_dir: str, max_iter: int = 150, opts: list[str] | None = None,
             zoo_model: str | None = None, zoo: bool = True) -> dict[str, Any]:
    """Train ``config_file`` for ``max_iter`` iterations, evaluate on its test set, predict its first test tile.

    The test tiles are generated apart from the training ones (another seed), so the prediction is on an image the
    model never saw. Writes the final weights (weights only) with ``config.yaml`` beside them, and returns (and
    prints) the paths written and the headline metrics. Then (``zoo``) the model zoo's flagship, or ``zoo_model``,
    segments the same tile into ``output_dir/zoo`` (:func:`run_zoo_demo`).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_logger(str(out), name="detectron2")
    setup_logger(str(out), name="nuclei_d2")
    cfg = demo_cfg(config_file, out, max_iter, opts)

    trainer = NucleiTrainer(cfg)  # writes OUTPUT_DIR/config.yaml
    trainer.resume_or_load(resume=False)
    trainer.train()  # ends with an evaluation on DATASETS.TEST, written to OUTPUT_DIR/metrics_final.json
    weights = _save_weights_only(trainer.checkpointer.model, out / "model_final.pth", trainer.iter - 1)

    from ..inference import NucleiPredictor, save_overlay

    pred_cfg = cfg.clone()
    pred_cfg.defrost()
    pred_cfg.MODEL.WEIGHTS = str(weights)
    predictor = NucleiPredictor(pred_cfg)
    record = DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]
    image = read_image_rgb(record["file_name"])
    instances = predictor(image)
    pred = instances_to_label_map(instances)
    if "label_file" in record:
        gt = read_label_map(record["label_file"])
    else:
        gt = annotations_to_label_map(record.get("annotations", []), *image.shape[:2])
    overlay = save_overlay(out / "demo_overlay.png", image, pred, gt)
    label_path = write_label_map(out / "demo_prediction_labels.png", pred)

    metrics_path = out / "metrics_final.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    summary = {
        "image": record["file_name"],
        "nuclei_predicted": count_nuclei(pred),
        "nuclei_in_ground_truth": count_nuclei(gt),
        "overlay_png": str(overlay),
        "prediction_label_map": str(label_path),
        "metrics_json": str(metrics_path),
        "metrics": metrics,
        "checkpoint": str(weights),
        "config": str(out / "config.yaml"),
    }
    lines = [
        "",
        "nuclei-d2 demo finished (synthetic H&E-like data; numbers say nothing about real tissue).",
        f"  predicted {summary['nuclei_predicted']} nuclei on the held-apart tile "
        f"(ground truth: {summary['nuclei_in_ground_truth']})",
    ]
    nuclei = metrics.get("nuclei", {})
    if nuclei:
        lines.append("  " + "  ".join(f"{k} {nuclei[k]:.3f}" for k in ("AJI", "PQ", "Dice1", "F1") if k in nuclei))
    if "segm" in metrics:
        lines.append(f"  segm AP {metrics['segm'].get('AP', float('nan')):.1f}  AP50 "
                     f"{metrics['segm'].get('AP50', float('nan')):.1f}")
    lines += [f"  overlay (prediction green | ground truth yellow): {overlay}",
              f"  metrics JSON: {metrics_path}",
              f"  predicted label map: {label_path}",
              f"  model: {summary['checkpoint']} (config: {summary['config']})"]
    print(os.linesep.join(lines), flush=True)
    if zoo:
        summary["zoo"] = run_zoo_demo(record["file_name"], out / "zoo", zoo_model)
    return summary
