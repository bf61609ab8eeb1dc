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

from nuclei_d2.evaluation import METRIC_KEYS, compare_predictions, compute_metrics, open_label_source, score_sources
from nuclei_d2.evaluation.offline import load_organ_map
from nuclei_d2.structures import label_map_to_annotations
from nuclei_d2.utils.io import write_label_map

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
    assert rows["AJI"]["n"] == 8 and rows["AJI"]["p_value"] < 0.05 and rows["AJI"]["better"] == "B"
    assert rows["AJI"]["mean_diff"] == pytest.approx(np.mean(b) - np.mean(a))
    d = np.subtract(b, a)  # issue 24: the standard error of the paired difference over images, beside its mean
    assert rows["AJI"]["se_diff"] == pytest.approx(d.std(ddof=1) / np.sqrt(d.size), rel=1e-12)
    assert rows["MDR"]["better"] in ("B", "n.s.")     # lower is better for error rates
    assert rows["Hausdorff_obj"]["better"] == "B"
    for r in rows.values():  # a set is named only where the difference is significant
        assert (r["better"] in ("A", "B")) == (r["p_value"] < 0.05)
    named = {r["metric"]: r for r in compare_predictions(rec_a, rec_b, names=("shifted", "clean"), alpha=0.001)}
    assert named["AJI"]["better"] == ("clean" if rows["AJI"]["p_value"] < 0.001 else "n.s.")
    same = {r["metric"]: r for r in compare_predictions(rec_a, rec_a)}
    assert same["AJI"]["p_value"] == 1.0 and same["AJI"]["better"] == "n.s."
    with pytest.raises(ValueError, match="different images"):
        compare_predictions(rec_a, rec_b[:-1])


def test_main_writes_outputs(folders, capsys):
    from conftest import load_tool

    root, _ = folders
    out = root / "out"
    code = load_tool("evaluate").main(["--gt", str(root / "gt"), "--pred", str(root / "a"), "--pred-b", str(root / "b"),
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
    assert {"mean_shifted", "mean_clean", "mean_diff_clean_minus_shifted",
            "se_diff_clean_minus_shifted"} <= set(comp[0])
    assert "SE of mean diff" in text
    assert {r["better"] for r in comp} <= {"shifted", "clean", "n.s.", ""}
    results_b = json.loads((out / "results_b.json").read_text())
    assert results_b["settings"]["name"] == "clean" and results_b["summary"]["all"]["n_images"] == 8
    assert (out / "per_image_b.csv").is_file()


def test_main_reports_bad_input(folders, capsys):
    from conftest import load_tool

    main = load_tool("evaluate").main
    root, _ = folders
    assert main(["--gt", str(root / "gt"), "--pred", str(root / "missing_dir")]) == 2
    assert "missing_dir" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # an argument error: argparse's exit 2, before any import of torch
        main(["--gt", str(root / "gt"), "--pred", str(root / "a"), "--iou-threshold", "1"])
    assert e.value.code == 2 and "--iou-threshold" in capsys.readouterr().err


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


# ---- issue 22: duplicates, all-or-nothing, predict's folder, output checks, significance, --help without torch -----
def _evaluate(argv, capsys):
    """Run tools/evaluate.py in process; returns (exit code, stdout, stderr)."""
    from conftest import load_tool

    code = load_tool("evaluate").main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, err)


def test_duplicate_coco_image_ids_are_refused(folders, capsys):
    root, maps = folders
    gt = _coco(maps, 0)
    for k in (3, 5):  # three images share id 101 (their annotations too): two would be scored against nothing
        for a in gt["annotations"]:
            if a["image_id"] == gt["images"][k]["id"]:
                a["image_id"] = 101
        gt["images"][k]["id"] = 101
    (root / "gt.json").write_text(json.dumps(gt))
    code, _, err = _evaluate(["--gt", root / "gt.json", "--pred", root / "a", "--output-dir", root / "out"], capsys)
    assert code == 2
    _one_line_error(err, "gt.json", "101")
    assert not (root / "out").exists()
    # a COCO dataset JSON given as the prediction is checked the same way
    (root / "gt.json").write_text(json.dumps(_coco(maps, 0)))
    pred = _coco(maps, 1)
    for a in pred["annotations"]:
        if a["image_id"] == pred["images"][2]["id"]:
            a["image_id"] = pred["images"][6]["id"]
    pred["images"][2]["id"] = pred["images"][6]["id"]
    (root / "pred.json").write_text(json.dumps(pred))
    code, _, err = _evaluate(["--gt", root / "gt.json", "--pred", root / "pred.json"], capsys)
    assert code == 2
    _one_line_error(err, "pred.json", str(pred["images"][6]["id"]))


def test_two_files_for_one_image_are_ambiguous(folders, capsys):
    root, maps = folders
    write_label_map(root / "a" / "img0_labels.png", maps["img0"][1])  # a/ already has img0.tif
    code, _, err = _evaluate(["--gt", root / "gt", "--pred", root / "a"], capsys)
    assert code == 2
    _one_line_error(err, "img0.tif", "img0_labels.png", "'img0'")


def test_bad_second_set_writes_nothing(folders, capsys):
    root, _ = folders
    out = root / "out"
    (img5,) = (root / "b").glob("img5.*")
    img5.write_bytes(b"not a label map")  # found when B is scored, after A
    code, _, err = _evaluate(["--gt", root / "gt", "--pred", root / "a", "--pred-b", root / "b", "--output-dir", out,
                              "--quiet"], capsys)
    assert code == 2
    _one_line_error(err, img5.name)
    assert not out.exists() or not any(out.iterdir())
    # a --pred-b that misses an image stops the run before A is even scored
    img5.unlink()
    code, _, err = _evaluate(["--gt", root / "gt", "--pred", root / "a", "--pred-b", root / "b", "--output-dir", out,
                              "--quiet"], capsys)
    assert code == 2
    _one_line_error(err, "img5")
    assert not out.exists() or not any(out.iterdir())
    # so does an organ file that is a folder (an OS error: one line naming it, no traceback)
    write_label_map(root / "b" / "img5.npy", np.zeros((40, 44), np.int32))
    (root / "organs_dir").mkdir()
    code, _, err = _evaluate(["--gt", root / "gt", "--pred", root / "a", "--pred-b", root / "b", "--organs",
                              root / "organs_dir", "--output-dir", out, "--quiet"], capsys)
    assert code == 2
    _one_line_error(err, "organs_dir")
    assert not out.exists() or not any(out.iterdir())


def _predict_style_folder(root: Path, maps: dict, which: int, suffixes=(".tif", ".png", ".npy")) -> Path:
    """A folder laid out like tools/predict.py's output (names from OUTPUT_KINDS), with every other kind of file."""
    from nuclei_d2.inference.run import OUTPUT_KINDS

    d = root / f"predict_{which}"
    d.mkdir()
    for i, (stem, arrays) in enumerate(maps.items()):
        suffix = suffixes[i % len(suffixes)]
        write_label_map(d / OUTPUT_KINDS["labels"].format(stem=stem, label_suffix=suffix), arrays[which])
        rgb = np.zeros((*arrays[which].shape, 3), np.uint8)
        from PIL import Image

        Image.fromarray(rgb).save(d / OUTPUT_KINDS["overlay"].format(stem=stem))
        (d / OUTPUT_KINDS["geojson"].format(stem=stem)).write_text('{"type": "FeatureCollection", "features": []}')
        (d / OUTPUT_KINDS["csv"].format(stem=stem)).write_text("id,area\n")
        (d / OUTPUT_KINDS["coco"].format(stem=stem)).write_text("[]")
        (d / f"{stem}.done.json").write_text("{}")
    (d / "summary.json").write_text('{"counts": {}}')
    return d


def test_predict_output_folder_is_matched_to_ground_truth(folders, capsys):
    root, maps = folders
    pred = _predict_style_folder(root, maps, 1)
    code, out, err = _evaluate(["--gt", root / "gt", "--pred", pred, "--output-dir", root / "out", "--quiet"],
                               capsys)
    assert code == 0, err
    assert "warn" not in err.lower()  # overlays, GeoJSON, CSV, summary.json: not predictions without ground truth
    with open(root / "out" / "per_image.csv") as f:
        rows = {r["image"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(maps)
    for name, (g, a, _) in maps.items():
        assert float(rows[name]["AJI"]) == pytest.approx(compute_metrics(g, a)["AJI"])


def test_no_match_is_an_error_whatever_missing_says(folders, capsys):
    root, maps = folders
    other = root / "other"
    for i, (g, _, _) in enumerate(maps.values()):
        write_label_map(other / f"tile{i}.png", g)
    for missing in ("error", "empty"):
        code, out, err = _evaluate(["--gt", root / "gt", "--pred", other, "--missing", missing,
                                    "--output-dir", root / "out", "--quiet"], capsys)
        assert code == 2, (missing, out)
        _one_line_error(err, str(other), "no prediction matched")
        assert not (root / "out").exists()


def test_output_location_is_checked_before_scoring(folders, capsys):
    root, maps = folders
    # a prediction whose size is wrong only shows when it is scored: the output error must come first
    write_label_map(root / "a" / "img7.png", np.zeros((5, 5), np.int32))
    for f in (root / "a").glob("img7.*"):
        if f.suffix != ".png":
            f.unlink()
    a_file = root / "a_file.txt"
    a_file.write_text("x")
    for bad in (a_file, a_file / "sub", a_file / "sub" / "deeper"):
        code, _, err = _evaluate(["--gt", root / "gt", "--pred", root / "a", "--output-dir", bad, "--quiet"], capsys)
        assert code == 2
        _one_line_error(err, str(bad))
        assert "img7" not in err
    # an output file name that is taken by a folder
    (root / "out" / "per_image.csv").mkdir(parents=True)
    code, _, err = _evaluate(["--gt", root / "gt", "--pred", root / "a", "--output-dir", root / "out"], capsys)
    assert code == 2
    _one_line_error(err, "per_image.csv")


@pytest.mark.skipif(getattr(__import__("os"), "geteuid", lambda: 0)() == 0, reason="root ignores file permissions")
def test_unreadable_or_unwritable_paths(folders, capsys):
    import os

    root, _ = folders
    locked = root / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        code, _, err = _evaluate(["--gt", root / "gt", "--pred", root / "a", "--output-dir", locked / "out"], capsys)
        assert code == 2
        _one_line_error(err, str(locked))
    finally:
        os.chmod(locked, 0o700)
    (root / "organs.json").chmod(0o000)
    code, _, err = _evaluate(["--gt", root / "gt", "--pred", root / "a", "--organs", root / "organs.json"], capsys)
    assert code == 2
    _one_line_error(err, "organs.json")


def test_better_only_when_significant_and_names_everywhere(folders, capsys):
    root, maps = folders
    # three images: B better on each, but a Wilcoxon test of 3 pairs cannot reach p < 0.05 (its smallest p is 0.25)
    for d in ("gt", "a", "b"):
        for f in (root / d).iterdir():
            if f.stem not in ("img0", "img1", "img2"):
                f.unlink()
    out = root / "out"
    code, text, err = _evaluate(["--gt", root / "gt", "--pred", root / "a", "--pred-b", root / "b", "--names",
                                 "shifted", "clean", "--output-dir", out, "--quiet"], capsys)
    assert code == 0, err
    with open(out / "comparison.csv") as f:
        reader = csv.DictReader(f)
        comp = {r["metric"]: r for r in reader}
        header = reader.fieldnames
    assert "mean_shifted" in header and "mean_clean" in header and not {"mean_a", "mean_b"} & set(header)
    assert float(comp["AJI"]["p_value"]) >= 0.05
    assert {r["better"] for r in comp.values()} <= {"n.s.", ""}
    table = text[text.index("clean vs shifted"):]
    assert "n.s." in table and "| clean " not in table.split("\n", 1)[1].replace("mean clean", "")
    # at a looser --alpha the same gap is significant: the better set is named, in the CSV and the table
    code, text, err = _evaluate(["--gt", root / "gt", "--pred", root / "a", "--pred-b", root / "b", "--names",
                                 "shifted", "clean", "--alpha", "0.3", "--output-dir", out, "--quiet"], capsys)
    assert code == 0, err
    with open(out / "comparison.csv") as f:
        comp = {r["metric"]: r for r in csv.DictReader(f)}
    assert comp["AJI"]["better"] == "clean" and float(comp["AJI"]["p_value"]) < 0.3


def test_help_and_argument_errors_do_not_import_torch(tmp_path):
    tool = str(REPO / "tools" / "evaluate.py")
    for argv, code in ((["--help"], 0), (["--gt", "x"], 2), (["--gt", "x", "--pred", "y", "--iou-threshold", "1"], 2),
                       (["--gt", "x", "--pred", "y", "--pred-b", "z", "--names", "m", "m"], 2),
                       (["--gt", "x", "--pred", "y", "--alpha", "0"], 2), (["--compare", "a.csv"], 2),
                       (["--compare", "a.csv", "b.csv", "--summary", "c.csv"], 2),
                       (["--compare", "a.csv", "b.csv", "--gt", "x"], 2), (["--summary", "c.csv", "--pred", "y"], 2)):
        proc = subprocess.run([sys.executable, "-X", "importtime", tool, *argv], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == code, (argv, proc.stderr[-2000:])
        imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import ")]
        assert not any(m.split(".")[0] in ("torch", "nuclei_d2", "detectron2", "numpy") for m in imported), argv
        if code == 2:
            assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_predict_output_folder_end_to_end(tmp_path, python):
    """tools/predict.py on two synthetic tiles, then tools/evaluate.py on its output folder as it is."""
    from PIL import Image
    from scipy import ndimage

    from nuclei_d2.engine.defaults import RANDOM_INIT_OPTS

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):
        img = np.full((96, 112, 3), 235, np.uint8)
        yy, xx = np.mgrid[0:96, 0:112]
        for _ in range(8):
            cy, cx = rng.integers(8, 88), rng.integers(8, 104)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = (80, 50, 140)
        Image.fromarray(img).save(images / f"tile{i}.png")
        write_label_map(labels / f"tile{i}.png", ndimage.label(img.mean(axis=2) < 150)[0])
    out = tmp_path / "predicted"
    cmd = [python, str(REPO / "tools" / "predict.py"), "--config-file", str(REPO / "configs" /
           "two_stage_unet-tiny.yaml"), "--input", str(images), "--output", str(out), "--outputs", "labels",
           "overlay", "geojson", "csv", "--tile-size", "96", "--overlap", "32", "--no-progress",
           "MODEL.DEVICE", "cpu", *RANDOM_INIT_OPTS]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*_labels.tif")) == ["tile0_labels.tif", "tile1_labels.tif"]
    assert (out / "tile0_overlay.png").is_file() and (out / "summary.json").is_file()
    r = subprocess.run([python, str(REPO / "tools" / "evaluate.py"), "--gt", str(labels), "--pred", str(out),
                        "--output-dir", str(tmp_path / "scores"), "--quiet", "--no-hausdorff"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(2 images;" in r.stdout
    with open(tmp_path / "scores" / "per_image.csv") as f:
        assert sorted(row["image"] for row in csv.DictReader(f)) == ["tile0", "tile1"]


# ---- issue 24: is a difference real? --compare / --summary on per-image CSVs already written ----------------------

# 7 tiles; B - A on AJI is positive on 6 and slightly negative on the smallest-magnitude one (W = 1, exact p 4/128)
_A = {"AJI": [0.52, 0.61, 0.47, 0.58, 0.66, 0.55, 0.49], "PQ": [0.50, 0.55, 0.45, 0.52, 0.60, 0.48, 0.44],
      "Dice1": [0.80, 0.81, 0.78, 0.79, 0.83, 0.77, 0.76], "F1": [0.70, 0.72, 0.68, 0.71, 0.75, 0.69, 0.66]}
_B = {"AJI": ["0.530", "0.635", "0.465", "0.598", "0.691", "0.557", "0.502"],
      "PQ": ["0.51", "0.54", "0.47", "0.52", "0.58", "0.49", "0.43"],
      "Dice1": ["0.80", "0.81", "0.78", "0.79", "0.83", "0.77", "0.76"],
      "F1": ["0.71", "0.70", "nan", "0.73", "0.74", "0.70", "0.67"]}
_TILES = [f"TCGA-{i}" for i in range(7)]
_TILE_ORGANS = ["liver", "liver", "kidney", "kidney", "bladder", "bladder", "brain"]


def _hand_csv(path: Path, values: dict, order=range(7), drop=(), extra_row=None) -> Path:
    """A minimal per-image CSV (image, organ, organ_seen and the four headline metrics), rows in ``order``."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "organ", "organ_seen", *[k for k in values if k not in drop]])
        for i in order:
            w.writerow([_TILES[i], _TILE_ORGANS[i], str(_TILE_ORGANS[i] in ("liver", "kidney")),
                        *[values[k][i] for k in values if k not in drop]])
        if extra_row:
            w.writerow(extra_row)
    return path


def test_compare_csvs_means_se_and_wilcoxon_are_exact(tmp_path, capsys):
    import statistics

    a_csv = _hand_csv(tmp_path / "raw.csv", {k: [repr(v) for v in vs] for k, vs in _A.items()})
    b_csv = _hand_csv(tmp_path / "ema.csv", _B, order=[3, 6, 0, 5, 1, 4, 2])  # matched by name, not by row
    out = tmp_path / "cmp"
    code, text, err = _evaluate(["--compare", a_csv, b_csv, "--names", "raw", "ema", "--output-dir", out], capsys)
    assert code == 0, err
    assert "ema vs raw" in text and "SE of mean diff" in text and "7 images" in text
    with open(out / "comparison.csv") as f:
        comp = {r["metric"]: r for r in csv.DictReader(f)}
    assert list(comp) == ["AJI", "PQ", "Dice1", "F1"]
    for k, row in comp.items():
        a, b = np.array(_A[k]), np.array([float(v) for v in _B[k]])
        ok = ~np.isnan(b)
        a, b = a[ok], b[ok]
        d = list(b - a)
        assert int(row["n"]) == len(d)
        assert float(row["mean_raw"]) == pytest.approx(statistics.fmean(a), rel=1e-12)
        assert float(row["mean_ema"]) == pytest.approx(statistics.fmean(b), rel=1e-12)
        assert float(row["mean_diff_ema_minus_raw"]) == pytest.approx(statistics.fmean(d), rel=1e-12)
        assert float(row["median_diff_ema_minus_raw"]) == pytest.approx(statistics.median(d), rel=1e-12)
        if k == "Dice1":  # identical: the test is undefined, p reported as 1
            assert float(row["se_diff_ema_minus_raw"]) == 0.0 and float(row["p_value"]) == 1.0
            assert row["better"] == "n.s."
            continue
        assert float(row["se_diff_ema_minus_raw"]) == pytest.approx(statistics.stdev(d) / len(d) ** 0.5, rel=1e-12)
        want = scipy.stats.wilcoxon(a, b)
        assert float(row["statistic"]) == want.statistic and float(row["p_value"]) == pytest.approx(want.pvalue)
    assert float(comp["AJI"]["statistic"]) == 1.0 and float(comp["AJI"]["p_value"]) == pytest.approx(4 / 128)
    assert comp["AJI"]["better"] == "ema" and comp["PQ"]["better"] == "n.s." and int(comp["F1"]["n"]) == 6
    # --metrics picks columns; a stricter --alpha turns the AJI gain into n.s.
    code, text, err = _evaluate(["--compare", a_csv, b_csv, "--metrics", "AJI", "--alpha", "0.01"], capsys)
    assert code == 0, err
    table = text[text.index("B vs A"):]
    assert "| AJI " in table and "| PQ " not in table and "n.s." in table


def test_compare_csvs_refuses_bad_input_writing_nothing(tmp_path, capsys):
    a_csv = _hand_csv(tmp_path / "a.csv", _A)
    out = tmp_path / "cmp"
    cases = [  # (file B, extra arguments, words the one-line error must contain)
        (_hand_csv(tmp_path / "missing.csv", _B, order=range(6)), [], ("missing.csv", "TCGA-6")),
        (_hand_csv(tmp_path / "extra.csv", _B, extra_row=["TCGA-9", "", "", "0.5", "0.5", "0.5", "0.5"]), [],
         ("a.csv", "TCGA-9")),
        (_hand_csv(tmp_path / "dup.csv", _B, order=[0, 1, 2, 3, 4, 5, 6, 2]), [], ("dup.csv", "TCGA-2", "twice")),
        (_hand_csv(tmp_path / "nopq.csv", _B, drop=("PQ",)), [], ("nopq.csv", "PQ")),
        (_hand_csv(tmp_path / "b.csv", _B), ["--metrics", "AJI+"], ("a.csv", "AJI+")),  # A is read first
        (_hand_csv(tmp_path / "b.csv", _B), ["--metrics", "AJl"], ("--metrics", "AJl")),
        (_hand_csv(tmp_path / "text.csv", {**_B, "AJI": ["0.5", "high", *_B["AJI"][2:]]}), [],
         ("text.csv", "line 3", "AJI", "high")),
        (tmp_path / "absent.csv", [], ("absent.csv",)),
    ]
    for b_csv, extra, words in cases:
        code, text, err = _evaluate(["--compare", a_csv, b_csv, "--output-dir", out, *extra], capsys)
        assert code == 2, (b_csv, extra, text)
        _one_line_error(err, *words)
        assert not out.exists(), b_csv
    (tmp_path / "noimage.csv").write_text("name,AJI,PQ,Dice1,F1\nx,1,1,1,1\n")
    code, _, err = _evaluate(["--summary", tmp_path / "noimage.csv", "--output-dir", out], capsys)
    assert code == 2 and not out.exists()
    _one_line_error(err, "noimage.csv", "image")


def test_compare_and_summary_read_the_evaluators_csvs(folders, capsys):
    """Per-image CSVs as NucleiEvaluator (extra image_id, file_name columns) and tools/evaluate.py write them."""
    import statistics

    from nuclei_d2.evaluation.report import write_records_csv

    root, _ = folders
    gt = open_label_source(root / "gt")
    organs = load_organ_map(root / "organs.json")
    rec_a, rec_b = (score_sources(gt, open_label_source(root / s), organs=organs, train_organs=["liver", "breast"],
                                  progress=False) for s in ("a", "b"))
    evaluator_style = [{**r, "image_id": str(i), "file_name": f"/data/{r['image']}.png"} for i, r in enumerate(rec_a)]
    a_csv = write_records_csv(root / "inference" / "nuclei_per_image.csv", evaluator_style,
                              extra_keys=("image_id", "file_name"))
    b_csv = write_records_csv(root / "per_image_b.csv", list(reversed(rec_b)))
    keys = ("AJI", "AJI+", "PQ", "Dice1", "F1", "Hausdorff_obj", "MDR")
    out = root / "cmp"
    code, text, err = _evaluate(["--compare", a_csv, b_csv, "--metrics", *keys, "--output-dir", out], capsys)
    assert code == 0, err
    with open(out / "comparison.csv") as f:
        comp = list(csv.DictReader(f))
    want = compare_predictions(rec_a, rec_b, keys)
    assert [r["metric"] for r in comp] == list(keys)
    for got, w in zip(comp, want):  # the CSV round trip loses nothing (floats are written with repr)
        for col, value in zip(("mean_A", "mean_B", "mean_diff_B_minus_A", "se_diff_B_minus_A", "p_value", "better"),
                              (w["mean_a"], w["mean_b"], w["mean_diff"], w["se_diff"], w["p_value"], w["better"])):
            assert got[col] == str(value), (w["metric"], col)
    # --summary: mean +- SE over images, overall, seen / unseen organs and per organ
    code, text, err = _evaluate(["--summary", a_csv, "--output-dir", out], capsys)
    assert code == 0, err
    assert "unseen organs" in text and "organ: kidney" in text and "±" in text
    with open(out / "summary.csv") as f:
        summ = {r["group"]: r for r in csv.DictReader(f)}
    aji = [r["AJI"] for r in rec_a]
    kidney = [r["AJI"] for r in rec_a if r["organ"] == "kidney"]
    assert float(summ["all"]["AJI"]) == pytest.approx(statistics.fmean(aji), rel=1e-12)
    assert float(summ["all"]["AJI_se"]) == pytest.approx(statistics.stdev(aji) / len(aji) ** 0.5, rel=1e-12)
    assert int(summ["organ: kidney"]["n_images"]) == 2
    assert float(summ["organ: kidney"]["AJI_se"]) == pytest.approx(statistics.stdev(kidney) / 2 ** 0.5, rel=1e-12)
    assert int(summ["seen organs"]["n_images"]) + int(summ["unseen organs"]["n_images"]) == 8
    assert list(summ["all"])[:4] == ["group", "n_images", "AJI", "AJI_se"]
