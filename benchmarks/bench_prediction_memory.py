#!/usr/bin/env python
"""Peak memory and time of evaluating one 1000x1000 tile with ~1,000 predicted nuclei: old path against new (issue 23).

* **old** (reproduced here as it was before issue 23): the dense model's label map became ``N x H x W`` boolean
  ``pred_masks`` (``label_map_to_instances``), and ``NucleiEvaluator`` painted them back into a label map
  (``masks_to_label_map``: a full-size mask per nucleus) before computing the metrics.
* **new**: the model's output holds the nuclei as crops (``nuclei_d2.structures.label_map_to_instances`` ->
  ``NucleiInstances``), and the real ``NucleiEvaluator`` paints the crops into a label map
  (``CropMasks.to_label_map``) before computing the same metrics.
* **R-CNN rows**: the same nuclei as raw Mask R-CNN outputs (each nucleus's box and its crop resized to a 28x28 mask
  probability map), post-processed by Detectron2's ``detector_postprocess`` (every mask pasted into the whole image:
  ``N x H x W``, the path before ``NucleiRCNN``) or by ``nuclei_d2.modeling.rcnn.crop_postprocess`` (pasted into
  crops), then evaluated by ``NucleiEvaluator``.

The "prediction" is the real MoNuSeg ground-truth tile whose number of nuclei is closest to 1,000 (``../shared/data``
or ``$NUCLEI_D2_SHARED_DATA``) with every nucleus grown by one pixel (so prediction and ground truth differ), or a
synthetic 1000x1000 map of 1,024 nuclei when the data is absent. Each path runs in a fresh subprocess that reports
its peak RSS (``ru_maxrss``) above its RSS once everything is imported and the inputs are built, and its wall time;
both must give identical metrics.

    python benchmarks/bench_prediction_memory.py                 # ~1 min on 2 shared cores
    python benchmarks/bench_prediction_memory.py --hausdorff     # also the (slow, path-independent) Hausdorff metric
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


def _inputs() -> tuple[np.ndarray, np.ndarray, str]:
    """(ground truth, prediction label map, description)."""
    from scipy import ndimage

    root = Path(os.environ.get("NUCLEI_D2_SHARED_DATA", REPO.parent / "shared" / "data")) / "monuseg2018"
    labels = sorted((root / "train" / "labels").glob("*.png")) if root.is_dir() else []
    if labels:
        from nuclei_d2.structures import label_values
        from nuclei_d2.utils.io import read_label_map

        gts = [read_label_map(p) for p in labels]
        gt, name = min(zip(gts, labels), key=lambda t: abs(label_values(t[0]).size - 1000))  # ~1,000 nuclei
        desc = f"MoNuSeg {name.stem} ({gt.shape[0]}x{gt.shape[1]})"
    else:
        gt = np.zeros((1000, 1000), np.int32)
        k = 0
        for y in range(2, 990, 31):
            for x in range(2, 990, 31):
                k += 1
                gt[y:y + 26, x:x + 26] = k
        desc = "synthetic 1000x1000"
    pred = ndimage.grey_dilation(gt, size=3)  # one pixel larger: touching nuclei split by the larger label
    pred[gt > 0] = gt[gt > 0]
    return gt, pred.astype(np.int32), desc


# ---- the old path, as it was before issue 23 -----------------------------------------------------------------------
def _old_label_map_to_instances(label: np.ndarray, scores: np.ndarray):
    import torch
    from detectron2.structures import Boxes, Instances
    from scipy import ndimage

    from nuclei_d2.structures import relabel_sequential

    h, w = label.shape
    seq = relabel_sequential(label)
    n = int(seq.max())
    masks = torch.zeros((n, h, w), dtype=torch.bool)
    boxes = torch.zeros((n, 4), dtype=torch.float32)
    for idx, sl in enumerate(ndimage.find_objects(seq)):
        if sl is None:
            continue
        masks[idx, sl[0], sl[1]] = torch.from_numpy(seq[sl] == idx + 1)
        boxes[idx] = torch.tensor([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop], dtype=torch.float32)
    inst = Instances((h, w))
    inst.pred_masks = masks
    inst.pred_boxes = Boxes(boxes)
    inst.scores = torch.as_tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.zeros(n, dtype=torch.int64)
    return inst


def _old_instances_to_label_map(inst) -> np.ndarray:
    masks = inst.pred_masks.detach().cpu().numpy().astype(bool, copy=False)
    n, h, w = masks.shape
    out = np.zeros((h, w), dtype=np.int32)
    order = np.argsort(-inst.scores.numpy().astype(np.float64), kind="stable")
    for i in order[::-1]:
        m = masks[i]
        if m.any():
            out[m] = i + 1
    return out


def _raw_rcnn(label: np.ndarray, scores: np.ndarray, size: int = 28):
    """Raw R-CNN outputs (``inference(do_postprocess=False)``) of the nuclei of ``label``: box + ``size x size``
    mask probabilities."""
    import torch
    import torch.nn.functional as F
    from detectron2.structures import Boxes, Instances

    from nuclei_d2.structures import CropMasks

    crops = CropMasks.from_label_map(label, scores)
    masks = torch.stack([F.interpolate(torch.from_numpy(m)[None, None], size=(size, size), mode="bilinear",
                                       align_corners=False)[0] for m in crops.masks])
    inst = Instances(label.shape)
    inst.pred_boxes = Boxes(torch.from_numpy(crops.boxes.astype(np.float32)))
    inst.scores = torch.from_numpy(crops.scores.copy())
    inst.pred_classes = torch.from_numpy(crops.classes.copy())
    inst.pred_masks = masks  # N x 1 x size x size
    return inst


def child(path: str, hausdorff: bool) -> dict:
    import tempfile

    from detectron2.data import DatasetCatalog, MetadataCatalog

    import nuclei_d2  # noqa: F401  (imports done before the baseline RSS)
    from nuclei_d2.evaluation.evaluator import NucleiEvaluator
    from nuclei_d2.evaluation.metrics import compute_metrics
    from nuclei_d2.structures import label_map_to_instances, label_values
    from nuclei_d2.utils.io import write_label_map

    gt, pred, desc = _inputs()
    n = int(label_values(pred).size)
    scores = np.linspace(1.0, 0.5, n, dtype=np.float32)
    tmp = Path(tempfile.mkdtemp(prefix="bench_pred_mem_"))
    gt_file = write_label_map(tmp / "gt.png", gt)
    record = {"file_name": str(tmp / "tile.png"), "image_id": "tile", "height": gt.shape[0], "width": gt.shape[1],
              "label_file": str(gt_file)}
    DatasetCatalog.register("bench_pred_mem", lambda: [record])
    MetadataCatalog.get("bench_pred_mem")
    raw = _raw_rcnn(pred, scores) if path.startswith("rcnn") else None
    base = _rss_mb()
    t0 = time.perf_counter()
    if raw is not None:
        from detectron2.modeling.postprocessing import detector_postprocess

        from nuclei_d2.modeling.rcnn import crop_postprocess

        post = detector_postprocess if path == "rcnn-old" else crop_postprocess
        out = {"instances": post(raw, *gt.shape)}  # the R-CNN's output
        ev = NucleiEvaluator("bench_pred_mem", distributed=False, hausdorff=hausdorff)
        ev.process([{"image_id": "tile", "file_name": record["file_name"]}], [out])
        metrics = ev.records()[0]
    elif path == "old":
        inst = _old_label_map_to_instances(pred, scores)  # the dense model's output
        label = _old_instances_to_label_map(inst)  # the evaluator's painting
        metrics = compute_metrics(gt, label, 0.5, hausdorff=hausdorff)
    else:
        out = {"instances": label_map_to_instances(pred, scores), "label_map": pred}  # the dense model's output
        ev = NucleiEvaluator("bench_pred_mem", distributed=False, hausdorff=hausdorff)
        ev.process([{"image_id": "tile", "file_name": record["file_name"]}], [out])
        metrics = ev.records()[0]
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    keys = ["AJI", "AJI+", "PQ", "Dice1", "F1", "n_pred", "n_gt"]
    return {"path": path, "data": desc, "nuclei": n, "seconds": dt, "peak_mb": peak - base, "rss_base_mb": base,
            "metrics": {k: metrics[k] for k in keys if k in metrics}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hausdorff", action="store_true", help="also compute the object-level Hausdorff distance")
    ap.add_argument("--child", choices=["old", "new", "rcnn-old", "rcnn-new"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.hausdorff)))
        return 0
    rows = []
    for path in ("old", "new", "rcnn-old", "rcnn-new"):
        cmd = [sys.executable, __file__, "--child", path] + (["--hausdorff"] if args.hausdorff else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    old, new, rcnn_old, rcnn_new = rows
    print(f"Evaluating one tile: {old['data']}, {old['nuclei']} predicted nuclei "
          f"(Hausdorff {'on' if args.hausdorff else 'off'})\n")
    print("| path | peak memory above baseline (MB) | time (s) |")
    print("|---|---:|---:|")
    for r, name in ((old, "old: N x H x W pred_masks painted back"), (new, "new: crops -> label map")):
        print(f"| {name} | {r['peak_mb']:.0f} | {r['seconds']:.2f} |")
    print(f"| ratio old / new | {old['peak_mb'] / max(new['peak_mb'], 1e-3):.0f}x | "
          f"{old['seconds'] / max(new['seconds'], 1e-6):.1f}x |")
    for r, name in ((rcnn_old, "R-CNN old: detector_postprocess (full paste) + evaluation"),
                    (rcnn_new, "R-CNN new: crop_postprocess + evaluation")):
        print(f"| {name} | {r['peak_mb']:.0f} | {r['seconds']:.2f} |")
    print(f"| R-CNN ratio old / new | {rcnn_old['peak_mb'] / max(rcnn_new['peak_mb'], 1e-3):.0f}x | "
          f"{rcnn_old['seconds'] / max(rcnn_new['seconds'], 1e-6):.1f}x |")
    same = old["metrics"] == new["metrics"]
    rcnn_same = rcnn_old["metrics"] == rcnn_new["metrics"]
    print(f"\nmetrics identical: {'yes' if same else 'NO'} {new['metrics']}")
    if not same:
        print(f"old metrics: {old['metrics']}")
    print(f"R-CNN metrics identical: {'yes' if rcnn_same else 'NO'} {rcnn_new['metrics']}")
    if not rcnn_same:
        print(f"R-CNN old metrics: {rcnn_old['metrics']}")
    return 0 if same and rcnn_same else 1


if __name__ == "__main__":
    sys.exit(main())
