"""NucleiEvaluator: ground truth from label files or annotations, overlaps by score, organs, files, 2 processes."""

from __future__ import annotations

import csv
import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm

from nuclei_d2.engine import leave_process_group
from nuclei_d2.evaluation import METRIC_KEYS, NucleiEvaluator, aggregate_metrics, compute_metrics
from nuclei_d2.structures import label_map_to_annotations, label_map_to_instances
from nuclei_d2.utils.io import write_label_map

ORGANS = ["liver", "liver", "breast", "kidney", "kidney", "colon"]
TRAIN_ORGANS = ["Liver", "breast"]  # case differs on purpose: matching is case-insensitive


def _label_map(rng: np.random.Generator, shape=(48, 56), n=12) -> np.ndarray:
    """Non-overlapping random rectangles and discs labelled 1..n (some touching)."""
    h, w = shape
    out = np.zeros(shape, dtype=np.int32)
    yy, xx = np.mgrid[0:h, 0:w]
    k = 0
    for _ in range(n * 4):
        if k == n:
            break
        cy, cx, r = rng.integers(3, h - 3), rng.integers(3, w - 3), rng.integers(2, 6)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r if rng.random() < 0.5 else \
            (abs(yy - cy) <= r) & (abs(xx - cx) <= r - 1)
        if (out[m] != 0).mean() > 0.2:
            continue
        k += 1
        out[m & (out == 0)] = k
    return out


def _prediction(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pred = np.zeros_like(gt)
    dy, dx = rng.integers(-1, 2, size=2)
    h, w = gt.shape
    pred[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = gt[max(-dy, 0):h - max(dy, 0),
                                                                    max(-dx, 0):w - max(dx, 0)]
    values = [v for v in np.unique(pred) if v]
    if len(values) > 3:
        pred[pred == values[0]] = 0           # a miss
        pred[pred == values[1]] = values[2]   # a merge
    pred[0:3, 0:3] = pred.max() + 1           # a false positive (may cover a nucleus in the corner)
    return pred


def make_dataset(root: Path, name: str, n_images: int = 6) -> list[dict]:
    """Write label files and return dataset dicts; images alternate label_file / annotations ground truth."""
    rng = np.random.default_rng(7)
    dicts = []
    for i in range(n_images):
        gt = _label_map(rng)
        pred = _prediction(gt, rng)
        np.save(root / f"pred_{i}.npy", pred)
        d = {"file_name": str(root / f"tile_{i}.png"), "image_id": i, "height": gt.shape[0], "width": gt.shape[1],
             "organ": ORGANS[i % len(ORGANS)]}
        if i % 2 == 0:
            write_label_map(root / f"tile_{i}_label.png", gt)
            d["label_file"] = str(root / f"tile_{i}_label.png")
            d["annotations"] = []  # label_file wins: an empty annotation list must not be used
        else:
            np.save(root / f"gt_{i}.npy", gt)  # only for the test's own expectations
            d["annotations"] = label_map_to_annotations(gt)
        if i == 5:
            d["organ_seen"] = True  # explicit flag beats train_organs (colon is not in it)
        dicts.append(d)
    (root / "dataset.json").write_text(json.dumps(dicts))
    return dicts


def register(root: Path, name: str) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: json.loads((root / "dataset.json").read_text()))
    MetadataCatalog.get(name).set(thing_classes=["nucleus"], evaluator_type="nuclei", train_organs=TRAIN_ORGANS)


def gt_of(root: Path, d: dict) -> np.ndarray:
    if d.get("label_file"):
        from PIL import Image

        return np.array(Image.open(d["label_file"])).astype(np.int32)
    return np.load(root / f"gt_{d['image_id']}.npy")


def model_io(root: Path, d: dict) -> tuple[dict, dict]:
    """What inference_on_dataset hands the evaluator: the mapped input (no annotations) and the model output."""
    pred = np.load(root / f"pred_{d['image_id']}.npy")
    n = int((np.unique(pred) != 0).sum())
    inst = label_map_to_instances(pred, scores=np.linspace(0.9, 0.5, n))
    inp = {"file_name": d["file_name"], "image_id": d["image_id"], "height": d["height"], "width": d["width"]}
    return inp, {"instances": inst}


# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def dataset(tmp_path):
    name = f"nuclei_eval_test_{tmp_path.name}"
    dicts = make_dataset(tmp_path, name)
    register(tmp_path, name)
    yield tmp_path, name, dicts
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_evaluator_scores_every_image_and_writes_files(dataset):
    root, name, dicts = dataset
    out_dir = root / "out"
    ev = NucleiEvaluator(name, output_dir=str(out_dir))
    ev.reset()
    for d in dicts:
        inp, out = model_io(root, d)
        ev.process([inp], [out])
    res = ev.evaluate()
    assert list(res) == ["nuclei"]
    r = res["nuclei"]
    assert all(isinstance(v, float) for v in r.values())

    expected = [compute_metrics(gt_of(root, d), np.load(root / f"pred_{d['image_id']}.npy")) for d in dicts]
    agg = aggregate_metrics(expected)
    for k in METRIC_KEYS:
        assert r[k] == pytest.approx(agg["mean"][k], rel=1e-12), k
        assert r[f"{k}-pooled"] == pytest.approx(agg["pooled"][k], rel=1e-12), k
    assert r["n_images"] == 6.0
    # Organs and seen/unseen: liver, breast (in train_organs) and colon (organ_seen=True) are seen; kidney is not.
    seen = [e for e, d in zip(expected, dicts) if d["organ"] != "kidney"]
    unseen = [e for e, d in zip(expected, dicts) if d["organ"] == "kidney"]
    assert r["n_images-seen"] == 4.0 and r["n_images-unseen"] == 2.0
    assert r["AJI-unseen"] == pytest.approx(aggregate_metrics(unseen)["mean"]["AJI"])
    assert r["PQ-seen"] == pytest.approx(aggregate_metrics(seen)["mean"]["PQ"])
    assert r["AJI-liver"] == pytest.approx(np.mean([expected[0]["AJI"], expected[1]["AJI"]]))
    assert r["n_images-kidney"] == 2.0

    with open(out_dir / "nuclei_per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["image"] for row in rows] == [f"tile_{i}" for i in range(6)]
    assert {"image", "organ", "organ_seen", "AJI", "AJI+", "PQ", "Dice2", "MDR", "n_gt", "TP"} <= set(rows[0])
    assert float(rows[3]["AJI"]) == pytest.approx(expected[3]["AJI"])
    assert rows[3]["organ_seen"] == "False" and rows[5]["organ_seen"] == "True"
    payload = json.loads((out_dir / "nuclei_results.json").read_text())
    assert payload["settings"]["iou_threshold"] == 0.5
    assert payload["summary"]["all"]["n_images"] == 6
    assert payload["summary"]["organs"]["kidney"]["n_images"] == 2
    assert len(payload["per_image"]) == 6
    assert not list(out_dir.glob(".*tmp*"))  # no temporary files left behind


def test_results_work_with_detectron2_reporting(dataset):
    from detectron2.evaluation import print_csv_format
    from detectron2.evaluation.testing import flatten_results_dict
    from detectron2.utils.events import EventStorage

    root, name, dicts = dataset
    ev = NucleiEvaluator(name)
    for d in dicts[:2]:
        inp, out = model_io(root, d)
        ev.process([inp], [out])
    res = ev.evaluate()
    print_csv_format(res)
    with EventStorage(0) as storage:
        storage.put_scalars(**flatten_results_dict(res), smoothing_hint=False)
        assert storage.latest()["nuclei/AJI"][0] == res["nuclei"]["AJI"]


def test_overlapping_masks_go_to_the_higher_score(dataset):
    root, name, _ = dataset
    # GT: a 4x4 nucleus A and, right of it, a 4x3 nucleus B. Prediction: A exactly (score 0.9) and a low-scoring
    # 4x7 mask covering A and B (score 0.4). Painted by score, the prediction equals the GT: every score is perfect.
    gt = np.zeros((10, 12), dtype=np.int32)
    gt[2:6, 1:5] = 1
    gt[2:6, 5:8] = 2
    masks = torch.zeros((2, 10, 12), dtype=torch.bool)
    masks[0, 2:6, 1:8] = True   # big, low score, listed first
    masks[1, 2:6, 1:5] = True   # small, high score
    inst = Instances((10, 12), pred_masks=masks, scores=torch.tensor([0.4, 0.9]),
                     pred_boxes=Boxes(torch.tensor([[1.0, 2, 8, 6], [1, 2, 5, 6]])),
                     pred_classes=torch.zeros(2, dtype=torch.int64))
    d = {"file_name": str(root / "overlap.png"), "image_id": "overlap", "height": 10, "width": 12,
         "annotations": label_map_to_annotations(gt)}
    ev = NucleiEvaluator(name)
    ev.process([d], [{"instances": inst}])  # not in the catalog: the input dict itself is the ground truth
    r = ev.evaluate()["nuclei"]
    assert r["AJI"] == 1.0 and r["PQ"] == 1.0 and r["n_images"] == 1.0
    # With the scores swapped the big mask wins everywhere: the two nuclei are merged into one prediction.
    inst.scores = torch.tensor([0.9, 0.4])
    ev.reset()
    ev.process([d], [{"instances": inst}])
    r = ev.evaluate()["nuclei"]
    assert r["USR"] == 1.0 and r["AJI"] == pytest.approx((16 + 12) / (28 + 28))


def test_score_threshold_and_empty_predictions(dataset):
    root, name, dicts = dataset
    d = dicts[1]
    inp, out = model_io(root, d)
    ev = NucleiEvaluator(name, score_threshold=0.95)  # drops every instance (scores <= 0.9)
    ev.process([inp], [out])
    r = ev.evaluate()["nuclei"]
    assert r["AJI"] == 0.0 and r["MDR"] == 1.0 and r["FDR"] == 0.0
    assert math.isclose(r["Hausdorff_obj"], math.hypot(d["height"], d["width"]))


def test_errors_name_the_image(dataset):
    root, name, dicts = dataset
    inp, out = model_io(root, dicts[0])
    small = Instances((8, 8), pred_masks=torch.zeros((0, 8, 8), dtype=torch.bool), scores=torch.zeros(0))
    ev = NucleiEvaluator(name)
    with pytest.raises(ValueError, match="tile_0.*8x8"):
        ev.process([inp], [{"instances": small}])
    with pytest.raises(KeyError, match="instances"):
        ev.process([inp], [{"sem_seg": None}])
    bare = {"file_name": str(root / "nowhere.png"), "image_id": "nowhere", "height": 8, "width": 8}
    with pytest.raises(KeyError, match="nowhere.*neither 'label_file' nor 'annotations'"):
        ev.process([bare], [{"instances": small}])
    assert NucleiEvaluator(name).evaluate() == {}  # nothing processed
    with pytest.raises(ValueError, match="iou_threshold"):
        NucleiEvaluator(name, iou_threshold=1.5)


# ---------------------------------------------------------------------------------------------------------------------
# Two processes (Detectron2's launch on the gloo backend, CPU)
# ---------------------------------------------------------------------------------------------------------------------


def _worker(root: str, name: str, out_name: str) -> None:
    """Run in every process: score this rank's share of the images, then evaluate (rank 0 writes the results)."""
    root_p = Path(root)
    register(root_p, name)
    dicts = json.loads((root_p / "dataset.json").read_text())
    rank, world = comm.get_rank(), comm.get_world_size()
    mine = dicts[rank::world]
    if rank % 2:
        mine = mine[::-1]  # another order on the other rank: results must not depend on it
    ev = NucleiEvaluator(name, output_dir=str(root_p / out_name))
    ev.reset()
    for d in mine:
        inp, out = model_io(root_p, d)
        ev.process([inp], [out])
    n_scored = len(ev.records())
    res = ev.evaluate()
    threads_in_group = _threads()
    leave_process_group()  # as tools/train_net.py does: a rank leaving early could abort the other
    (root_p / f"{out_name}_rank{rank}.json").write_text(json.dumps({
        "world": world, "n_scored": n_scored, "results": res, "threads": [threads_in_group, _threads()]}))


def _threads() -> int | None:
    """Threads of this process, C++ ones included (gloo's); None where /proc is not there."""
    task = Path("/proc/self/task")
    return len(list(task.iterdir())) if task.is_dir() else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_same_numbers_as_one(dataset):
    from detectron2.engine import launch

    root, name, _ = dataset
    launch(_worker, 1, args=(str(root), name, "single"))
    launch(_worker, 2, dist_url=f"tcp://127.0.0.1:{_free_port()}", args=(str(root), name, "dist"))

    single = json.loads((root / "single_rank0.json").read_text())
    rank0 = json.loads((root / "dist_rank0.json").read_text())
    rank1 = json.loads((root / "dist_rank1.json").read_text())
    assert single["world"] == 1 and rank0["world"] == 2
    assert rank1["results"] == {}                       # only the main process reports
    assert rank0["n_scored"] == rank1["n_scored"] == 3   # each image scored once, by the rank that ran it
    assert rank0["results"] == single["results"]       # exactly equal, not approximately
    assert rank0["results"]["nuclei"]["n_images"] == 6.0
    assert (root / "dist" / "nuclei_per_image.csv").read_bytes() == (root / "single" / "nuclei_per_image.csv"
                                                                      ).read_bytes()
    # Leaving the group joined gloo's threads (Detectron2's comm held the group past destroy_process_group, and
    # threads left to the interpreter's exit sometimes aborted the process: SIGABRT after the work was done).
    for r in (rank0, rank1):
        during, after = r["threads"]
        if during is not None:
            assert after < during, r["threads"]
