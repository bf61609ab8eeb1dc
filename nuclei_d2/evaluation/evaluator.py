"""``NucleiEvaluator``: AJI, AJI+, PQ, Dice, F1, Hausdorff, MDR/FDR/USR/OSR of a Detectron2 model, distributed.

Works like Detectron2's own evaluators (``COCOEvaluator``, ``SemSegEvaluator``): ``inference_on_dataset`` calls
:meth:`reset`, :meth:`process` per batch on every process and :meth:`evaluate` once. Each process scores the images
it ran (so each image is scored exactly once and label maps never travel between processes); only the small
per-image results are gathered on the main process (``detectron2.utils.comm.gather``), put back in dataset order
and aggregated there, so one process and several give identical numbers.

Prediction label map: the model's nuclei (:func:`nuclei_d2.structures.nuclei_of`: the ``pred_nuclei`` crops of
nuclei-d2's models and test-time wrapper, or an R-CNN's ``pred_masks`` cropped) painted crop by crop by
:meth:`nuclei_d2.structures.CropMasks.to_label_map` under :data:`nuclei_d2.structures.OVERLAP_RULE` (where masks
overlap, a pixel goes to the instance with the highest score; ties: the instance listed first). No ``N x H x W``
mask stack is built: memory follows the nuclei, not their number times the image.

Ground truth, per dataset dict (looked up in ``DatasetCatalog`` by ``image_id``, else ``file_name``; the mapped input
dict is used when the image is not in the catalog):

* ``label_file`` when present (read with :func:`nuclei_d2.utils.io.read_label_map`), else
* ``annotations`` (RLE or polygons; ``iscrowd`` ones skipped, as the nuclei mapper does) painted with
  :func:`nuclei_d2.structures.annotations_to_label_map`.

Organs: the dict's optional ``organ``. Seen/unseen: the dict's ``organ_seen`` (bool) if present, else whether the
organ is in the dataset metadata's ``train_organs`` (case-insensitive), else unknown (no seen/unseen rows).
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ..structures import OVERLAP_RULE, annotations_to_label_map, nuclei_of
from ..utils.io import read_label_map
from .metrics import compute_metrics
from .report import flat_results, format_summary_table, is_seen, summarize, write_records_csv, write_results_json

__all__ = ["NucleiEvaluator", "load_ground_truth"]

logger = logging.getLogger(__name__)


def load_ground_truth(record: dict[str, Any], shape: tuple[int, int] | None = None) -> np.ndarray:
    """Ground-truth label map of a dataset dict: its ``label_file`` if present, else its ``annotations``.

    Args:
        shape: expected ``(height, width)``; defaults to the dict's ``height``/``width``.
    """
    name = record.get("file_name", record.get("image_id", "<image>"))
    if shape is None and "height" in record and "width" in record:
        shape = (int(record["height"]), int(record["width"]))
    if record.get("label_file"):
        return read_label_map(record["label_file"], shape=shape)
    if "annotations" in record:
        if shape is None:
            raise ValueError(f"{name}: dataset dict has annotations but no height/width to paint them into")
        annos = [a for a in record["annotations"] if not a.get("iscrowd", 0)]
        missing = [i for i, a in enumerate(annos) if "segmentation" not in a]
        if missing:
            raise ValueError(f"{name}: annotations {missing[:5]} have no 'segmentation'; nucleus metrics need masks")
        try:
            return annotations_to_label_map(annos, *shape)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{name}: cannot paint its annotations into a label map: {e}") from e
    raise KeyError(f"{name}: dataset dict has neither 'label_file' nor 'annotations': no ground truth to score")


def _image_name(record: dict[str, Any]) -> str:
    if record.get("file_name"):
        return Path(str(record["file_name"])).stem
    return str(record.get("image_id", "<image>"))


class NucleiEvaluator(DatasetEvaluator):
    """Nucleus instance-segmentation metrics of a registered dataset (see the module docstring for the rules).

    ``evaluate()`` returns ``{"nuclei": {"AJI": ..., "AJI+": ..., "PQ": ..., "Dice1": ..., ...}}`` (floats: means over
    images; ``-pooled``, ``-seen``, ``-unseen`` and per-organ variants, see
    :func:`nuclei_d2.evaluation.report.flat_results`) on the main process and ``{}`` on the others. With
    ``output_dir`` it writes ``nuclei_per_image.csv`` and ``nuclei_results.json`` there (atomically) and logs a
    summary table.
    """

    def __init__(self, dataset_name: str, output_dir: str | None = None, distributed: bool = True,
                 iou_threshold: float = 0.5, *, hausdorff: bool = True, score_threshold: float = 0.0,
                 task_name: str = "nuclei"):
        """
        Args:
            dataset_name: a dataset registered in ``DatasetCatalog``.
            output_dir: where to write the per-image CSV and the JSON summary (None: write nothing).
            distributed: gather results from all processes (False: evaluate this process' images only).
            iou_threshold: IoU a pair must exceed for F1/precision/recall (PQ always uses 0.5).
            hausdorff: compute the object-level Hausdorff distance (the slowest metric).
            score_threshold: ignore predicted instances scoring below this (0 keeps all the model returned).
            task_name: key of the results dict.
        """
        if not 0.0 <= float(iou_threshold) < 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}")
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        self._iou_threshold = float(iou_threshold)
        self._hausdorff = hausdorff
        self._score_threshold = float(score_threshold)
        self._task = task_name
        meta = MetadataCatalog.get(dataset_name)
        train_organs = meta.get("train_organs", None)
        self._train_organs = list(train_organs) if train_organs is not None else None
        self._catalog: dict[Any, tuple[int, dict[str, Any]]] | None = None
        self._records: list[dict[str, Any]] = []

    # -- dataset lookup --------------------------------------------------------------------------------------------

    def _index(self) -> dict[Any, tuple[int, dict[str, Any]]]:
        if self._catalog is None:
            index: dict[Any, tuple[int, dict[str, Any]]] = {}
            for pos, d in enumerate(DatasetCatalog.get(self._dataset_name)):
                if "image_id" in d:
                    index.setdefault(("image_id", d["image_id"]), (pos, d))
                if "file_name" in d:
                    index.setdefault(("file_name", d["file_name"]), (pos, d))
            self._catalog = index
        return self._catalog

    def _lookup(self, inp: dict[str, Any]) -> tuple[int | None, dict[str, Any]]:
        index = self._index()
        for key in ("image_id", "file_name"):
            if key in inp and (key, inp[key]) in index:
                return index[(key, inp[key])]
        return None, inp

    # -- DatasetEvaluator API --------------------------------------------------------------------------------------

    def reset(self) -> None:
        self._records = []

    def process(self, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
        for inp, out in zip(inputs, outputs):
            self._records.append(self._score(inp, out))

    def _score(self, inp: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
        pos, record = self._lookup(inp)
        name = _image_name(record)
        if "instances" not in out:
            raise KeyError(f"{name}: model output has no 'instances' (keys: {sorted(out)})")
        inst = out["instances"].to("cpu")
        h, w = inst.image_size
        height, width = int(record.get("height", inp.get("height", h))), int(record.get("width", inp.get("width", w)))
        if (h, w) != (height, width):
            raise ValueError(f"{name}: predictions are {h}x{w} but the image is {height}x{width}; the model must "
                             "return instances at the original resolution (detector_postprocess)")
        try:
            nuclei = nuclei_of(inst)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e
        if self._score_threshold > 0:
            nuclei = nuclei.select(np.flatnonzero(nuclei.scores >= self._score_threshold))
        pred = nuclei.to_label_map()
        gt = load_ground_truth(record, shape=(height, width))
        metrics = compute_metrics(gt, pred, self._iou_threshold, hausdorff=self._hausdorff)
        organ = record.get("organ")
        return {
            "image": name,
            "organ": None if organ is None else str(organ),
            "organ_seen": is_seen(organ, record.get("organ_seen"), self._train_organs),
            **metrics,
            "image_id": str(record.get("image_id", "")),
            "file_name": str(record.get("file_name", "")),
            "_order": pos,
        }

    def _gathered(self) -> list[dict[str, Any]] | None:
        if self._distributed and comm.get_world_size() > 1:
            comm.synchronize()
            parts = comm.gather(self._records, dst=0)
            if not comm.is_main_process():
                return None
            records = list(itertools.chain(*parts))
        else:
            records = list(self._records)
        # Dataset order (images not in the catalog last, by name) and one record per image, whatever the sharding.
        records.sort(key=lambda r: (0, r["_order"], "") if r["_order"] is not None else (1, 0, r["image"]))
        unique: list[dict[str, Any]] = []
        done: set[tuple[str, str, str]] = set()
        for r in records:
            key = (r["image_id"], r["file_name"], r["image"])
            if key not in done:
                done.add(key)
                unique.append(r)
        return unique

    def evaluate(self) -> dict[str, dict[str, float]]:
        records = self._gathered()
        if records is None:
            return {}
        if not records:
            logger.warning(f"[NucleiEvaluator] {self._dataset_name}: no predictions were processed")
            return {}
        per_image = [{k: v for k, v in r.items() if k != "_order"} for r in records]
        summary = summarize(per_image)
        table = format_summary_table(summary)
        logger.info(f"Nucleus metrics on {self._dataset_name} ({len(per_image)} images; F1/precision/recall at IoU > "
                    f"{self._iou_threshold:g}, PQ at IoU > 0.5):\n{table}")
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            csv_path = write_records_csv(os.path.join(self._output_dir, "nuclei_per_image.csv"), per_image,
                                         extra_keys=("image_id", "file_name"))
            settings = {"dataset": self._dataset_name, "iou_threshold": self._iou_threshold, "pq_iou_threshold": 0.5,
                        "hausdorff": self._hausdorff, "score_threshold": self._score_threshold,
                        "train_organs": self._train_organs,
                        "overlaps": OVERLAP_RULE}
            json_path = write_results_json(os.path.join(self._output_dir, "nuclei_results.json"), per_image, summary,
                                           settings)
            logger.info(f"Per-image nucleus metrics written to {csv_path} and {json_path}")
        return OrderedDict({self._task: flat_results(summary)})

    def records(self) -> list[dict[str, Any]]:
        """This process' per-image results so far (copies)."""
        return copy.deepcopy(self._records)
