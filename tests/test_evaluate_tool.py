"""tools/evaluate.py and the functions behind it: folders, COCO JSON / results, missing images, paired Wilcoxon."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from nuclei_d2.data.io import write_label_map
from nuclei_d2.evaluation import METRIC_KEYS, compare_predictions, compute_metrics, open_label_source, score_sources
from nuclei_d2.evaluation.offline import load_organ_map, main
from nuclei_d2.structures import label_map_to_annotations

REPO = Path(__file__).resolve().parents[1]
ORGANS = {"img0": "liver", "img1": "liver", "img2": "breast", "img3": "kidney", "img4": "kidney", "img5": "colon",
          "img6": "colon", "img7": "breast"}


def _gt(rng: np.random.Generator, shape=(40, 44)) -> np.ndarray:
    """Up to 9 square nuclei on a 3x3 grid with random sizes and jitter."""
    out = np.zeros(shape, dtype=np.int32)
    k = 0
    for r in range(3):
        for c in range(3):
            if rng.random() < 0.15:
                continue
            s = int(rng.integers(4, 9))
            y, x = 2 + 13 * r + int(rng.integers(0, 3)), 2 + 14 * c + int(rng.integers(0, 3))
            k += 1
            out[y:y + s, x:x + s] = k
    return out


def _worse(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pred = np.roll(gt, int(rng.integers(1, 3)), axis=1)
    values = [v for v in np.unique(pred) if v]
    if values:
        pred[pred == values[-1]] = 0
    return pred


def _better(gt: np.ndarray) -> np.ndarray:
    pred = gt.copy()
    pred[:, :1] = 0  # nearly perfect
    return pred


@pytest.fixture()
def folders(tmp_path):
    """gt/, a/ (worse) and b/ (better) folders of 8 label maps in mixed formats, matched by stem."""
    rng = np.random.default_rng(0)
    maps = {}
    for i in range(8):
        gt = _gt(rng)
        maps[f"img{i}"] = (gt, _worse(gt, rng), _better(gt))
    suffixes = [".png", ".tif", ".npy"]
    for i, (name, (gt, a, b)) in enumerate(maps.items()):
        write_label_map(tmp_path / "gt" / f"{name}{suffixes[i % 3]}", gt)
        write_label_map(tmp_path / "a" / f"{name}{suffixes[(i + 1) % 3]}", a)
        write_label_map(tmp_path / "b" / f"{name}{suffixes[(i + 2) % 3]}", b)
    (tmp_path / "organs.json").write_text(json.dumps({k: {"organ": v} for k, v in ORGANS.items()}))
    return tmp_path, maps


def _coco(maps: dict, which: int, results: bool = False):
    images, annos = [], []
    for i, (name, arrays) in enumerate(maps.items()):
        lab = arrays[which]
        images.append({"id": 100 + i, "file_name": f"tiles/{name}.tif", "height": lab.shape[0],
                       "width": lab.shape[1], "organ": ORGANS[name]})
        for k, a in enumerate(label_map_to_annotations(lab)):
            a = {**a, "image_id": 100 + i, "id": len(annos) + 1}
            a.pop("bbox_mode")
            if results:
                a = {"image_id": a["image_id"], "segmentation": a["segmentation"], "category_id": 1,
                     "score": 0.9 - 0.01 * k}
            annos.append(a)
    if results:
        return annos
    return {"images": images, "annotations": annos, "categories": [{"id": 0, "name": "nucleus"}]}


def test_folders_matched_by_stem(folders):
    root, maps = folders
    gt = open_label_source(root / "gt")
    pred = open_label_source(root / "a")
    assert gt.kind == "folder" and sorted(gt.names) == sorted(maps)
    records = score_sources(gt, pred, progress=False, organs=load_organ_map(root / "organs.json"),
                            train_organs=["liver", "breast"])
    assert [r["image"] for r in records] == sorted(maps)
    for r in records:
        g, a, _ = maps[r["image"]]
        want = compute_metrics(g, a)
        assert all(r[k] == pytest.approx(want[k]) for k in METRIC_KEYS)
        assert r["organ"] == ORGANS[r["image"]]
        assert r["organ_seen"] == (ORGANS[r["image"]] in ("liver", "breast"))


def test_coco_dataset_and_results_files(folders):
    root, maps = folders
    (root / "gt.json").write_text(json.dumps(_coco(maps, 0)))
    results = _coco(maps, 1, results=True)
    # A large, low-scoring detection over img0: it must lose every pixel it shares with higher-scoring ones.
    big = label_map_to_annotations(np.pad(np.ones((30, 30), np.int32), ((0, 10), (0, 14))))[0]["segmentation"]
    results.append({"image_id": 100, "segmentation": big, "category_id": 1, "score": 0.01})
    (root / "results.json").write_text(json.dumps(results))
    gt = open_label_source(root / "gt.json")
    assert gt.kind == "coco" and gt.organs["img3"] == "kidney"
    pred = open_label_source(root / "results.json", reference=gt)
    records = {r["image"]: r for r in score_sources(gt, pred, progress=False)}
    for name, (g, a, _) in maps.items():
        if name == "img0":
            continue
        assert records[name]["AJI"] == pytest.approx(compute_metrics(g, a)["AJI"])
        assert records[name]["organ"] == ORGANS[name]
    # img0: the big detection only keeps pixels no other detection claims.
    g0, a0, _ = maps["img0"]
    expected = a0.copy()
    region = np.zeros_like(a0, dtype=bool)
    region[:30, :30] = True
    expected[region & (a0 == 0)] = a0.max() + 1
    assert records["img0"]["AJI"] == pytest.approx(compute_metrics(g0, expected)["AJI"])
    # min_score drops it again.
    pred = open_label_source(root / "results.json", reference=gt, min_score=0.05)
    r0 = score_sources(gt, pred, progress=False)[0]
    assert r0["AJI"] == pytest.approx(compute_metrics(g0, a0)["AJI"])


def test_bad_sources_raise_clear_errors(folders):
    root, maps = folders
    (root / "results.json").write_text(json.dumps(_coco(maps, 1, results=True)))
    with pytest.raises(ValueError, match="results.json.*COCO dataset JSON"):
        open_label_source(root / "results.json", reference=open_label_source(root / "gt"))
    (root / "gt.json").write_text(json.dumps(_coco(maps, 0)))
    bad = _coco(maps, 1, results=True)
    bad[0]["image_id"] = 999
    (root / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="bad.json.*999"):
        open_label_source(root / "bad.json", reference=open_label_source(root / "gt.json"))
    (root / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="junk.json.*not valid JSON"):
        open_label_source(root / "junk.json")
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*no label maps"):
        open_label_source(root / "empty")
    with pytest.raises(FileNotFoundError, match="nope"):
        open_label_source(root / "nope")
    write_label_map(root / "a" / "img0.png", maps["img0"][1])  # img0 now exists twice in a/
    with pytest.raises(ValueError, match="two label maps for image 'img0'"):
        open_label_source(root / "a")


def test_missing_predictions(folders):
    root, maps = folders
    for f in (root / "b").glob("img7.*"):
        f.unlink()
    gt, pred = open_label_source(root / "gt"), open_label_source(root / "b")
    with pytest.raises(ValueError, match="no prediction for 1 of 8.*img7"):
        score_sources(gt, pred, progress=False)
    records = score_sources(gt, pred, missing="empty", progress=False)
    assert records[-1]["image"] == "img7" and records[-1]["AJI"] == 0.0 and records[-1]["MDR"] == 1.0


def test_paired_wilcoxon_comparison(folders):
    root, maps = folders
    gt = open_label_source(root / "gt")
    rec_a = score_sources(gt, open_label_source(root / "a"), progress=False)
    rec_b = score_sources(gt, open_label_source(root / "b"), progress=False)
    rows = {r["metric"]: r for r in compare_predictions(rec_a, rec_b)}
    assert set(rows) == set(METRIC_KEYS)
    a = [r["AJI"] for r in rec_a]
    b = [r["AJI"] for r in rec_b]
    want = scipy.stats.wilcoxon(a, b)
    assert rows["AJI"]["p_value"] == pytest.approx(want.pvalue)
    assert rows["AJI"]["statistic"] == pytest.approx(want.statistic)
    assert rows["AJI"]["n"] == 8 and rows["AJI"]["better"] == "B"
    assert rows["AJI"]["mean_diff"] == pytest.approx(np.mean(b) - np.mean(a))
    assert rows["MDR"]["better"] in ("B", "=")        # lower is better for error rates
    assert rows["Hausdorff_obj"]["better"] == "B"
    same = {r["metric"]: r for r in compare_predictions(rec_a, rec_a)}
    assert same["AJI"]["p_value"] == 1.0 and same["AJI"]["better"] == "="
    with pytest.raises(ValueError, match="different images"):
        compare_predictions(rec_a, rec_b[:-1])


def test_main_writes_outputs(folders, capsys):
    root, _ = folders
    out = root / "out"
    code = main(["--gt", str(root / "gt"), "--pred", str(root / "a"), "--pred-b", str(root / "b"),
                 "--names", "shifted", "clean", "--organs", str(root / "organs.json"), "--train-organs",
                 "liver,breast", "--output-dir", str(out), "--quiet"])
    assert code == 0
    text = capsys.readouterr().out
    assert "clean vs shifted" in text and "organ: kidney" in text and "unseen organs" in text
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {"image", "organ", "organ_seen", "AJI", "PQ", "Hausdorff_obj", "n_gt"} <= set(rows[0])
    with open(out / "comparison.csv") as f:
        comp = list(csv.DictReader(f))
    assert [r["metric"] for r in comp] == list(METRIC_KEYS) and "p_value" in comp[0]
    results_b = json.loads((out / "results_b.json").read_text())
    assert results_b["settings"]["name"] == "clean" and results_b["summary"]["all"]["n_images"] == 8
    assert (out / "per_image_b.csv").is_file()


def test_main_reports_bad_input(folders, capsys):
    root, _ = folders
    assert main(["--gt", str(root / "gt"), "--pred", str(root / "missing_dir")]) == 2
    assert "missing_dir" in capsys.readouterr().err
    assert main(["--gt", str(root / "gt"), "--pred", str(root / "a"), "--iou-threshold", "1"]) == 2


@pytest.mark.slow
def test_script_runs_as_a_file(folders):
    root, _ = folders
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), "--gt", str(root / "gt"), "--pred",
                           str(root / "a"), "--quiet", "--no-hausdorff"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "AJI" in proc.stdout and "all (pooled)" in proc.stdout
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), "--gt", str(root / "gt"), "--pred",
                           str(root / "nothing_here")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "nothing_here" in proc.stderr
