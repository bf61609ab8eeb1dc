"""tools/convert_dataset.py end to end, run as users run it (a subprocess with the venv's python)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool
from PIL import Image

from nuclei_d2.utils.io import read_label_map

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "convert_dataset.py"


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=REPO, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.mark.slow
def test_labels_to_coco_and_back(tmp_path):
    (tmp_path / "im").mkdir()
    (tmp_path / "lab").mkdir()
    lab = np.zeros((20, 20), np.uint16)
    lab[1:5, 1:5] = 300
    lab[10:15, 3:9] = 7
    for stem, label in (("x", lab), ("y", np.zeros_like(lab))):
        Image.fromarray(np.zeros((20, 20, 4), np.uint8)).save(tmp_path / "im" / f"{stem}.png")  # RGBA
        Image.fromarray(label).save(tmp_path / "lab" / f"{stem}.png")
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"mine": {"train": ["x", "y"], "test": ["y"]}}))
    out = tmp_path / "train.json"
    proc = run("labels", "--images", str(tmp_path / "im"), "--labels", str(tmp_path / "lab"), "--out", str(out),
               "--split-file", str(splits), "--split", "mine/train", "--organ", "kidney")
    assert f"wrote {out}" in proc.stdout
    coco = json.loads(out.read_text())
    assert [im["organ"] for im in coco["images"]] == ["kidney", "kidney"]
    assert len(coco["annotations"]) == 2
    run("to-labels", "--json", str(out), "--out-dir", str(tmp_path / "back"), "--format", "tif")
    back = read_label_map(tmp_path / "back" / "x.tif")
    expected = np.zeros((20, 20), np.int32)
    expected[10:15, 3:9] = 1   # label 7 -> 1
    expected[1:5, 1:5] = 2     # label 300 -> 2
    np.testing.assert_array_equal(back, expected)
    assert not read_label_map(tmp_path / "back" / "y.tif").any()


@pytest.mark.slow
def test_bad_input_fails_cleanly_and_keeps_the_old_json(tmp_path):
    (tmp_path / "im").mkdir()
    (tmp_path / "xml").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "im" / "t.png")
    (tmp_path / "xml" / "t.xml").write_text('<Annotations><Region Id="1"><Vertex X="1" Y="1"/>')
    out = tmp_path / "x.json"
    out.write_text('{"old": true}')
    proc = run("monuseg-xml", "--images", str(tmp_path / "im"), "--xml", str(tmp_path / "xml"), "--out", str(out),
               "-q", check=False)
    assert proc.returncode == 2
    assert f"error: {tmp_path / 'xml' / 't.xml'}: malformed XML" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert out.read_text() == '{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["im", "x.json", "xml"]  # no temp file left behind


@pytest.mark.slow
@pytest.mark.real_data
def test_prepare_builtin_monuseg2018_and_dsb2018(shared_data, tmp_path):
    root = tmp_path / "datasets"
    start = time.perf_counter()
    proc = run("prepare-builtin", "monuseg2018", "--source", str(shared_data / "monuseg2018"), "--root", str(root),
               "-q")
    elapsed = time.perf_counter() - start
    for name in ("monuseg2018/monuseg2018_train", "kumar/kumar_train", "kumar/kumar_test_same",
                 "kumar/kumar_test_diff", "kumar/kumar_test"):
        assert f"wrote {root / name}.json" in proc.stdout
    run("prepare-builtin", "dsb2018", "--source", str(shared_data / "dsb2018_brightfield"), "--root", str(root), "-q")
    meta = json.loads((shared_data / "dsb2018_brightfield" / "metadata.json").read_text())
    for stage in ("stage1_train", "stage1_test"):
        coco = json.loads((root / "dsb2018" / f"dsb2018_{stage}.json").read_text())
        assert len(coco["images"]) == len(meta[stage])
        assert len(coco["annotations"]) == sum(v["n_nuclei_label"] for v in meta[stage].values())
    from detectron2.data import DatasetCatalog

    from nuclei_d2.data.datasets import register_all_builtin

    register_all_builtin(root, overwrite=True)
    try:
        assert len(DatasetCatalog.get("kumar_test_same")) == 8
        assert len(DatasetCatalog.get("dsb2018_stage1_test")) == len(meta["stage1_test"])
    finally:
        register_all_builtin(overwrite=True)
    print(f"prepare-builtin monuseg2018 (subprocess, incl. Python start-up): {elapsed:.1f} s")


def test_cli_in_process_mat_pannuke_dsb2018(tmp_path, capsys):
    """The other subcommands, through the same main() the tool calls (no interpreter start-up per case)."""
    import scipy.io

    main = load_tool("convert_dataset").main

    (tmp_path / "Images").mkdir()
    (tmp_path / "Labels").mkdir()
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "Images" / "a.png")
    inst = np.zeros((6, 6), np.int32)
    inst[0:2, 0:2] = 1
    inst[3:5, 3:5] = 2
    scipy.io.savemat(tmp_path / "Labels" / "a.mat", {"inst_map": inst, "inst_type": np.array([[2], [1]])})
    assert main(["mat", "--images", str(tmp_path / "Images"), "--labels", str(tmp_path / "Labels"), "--out",
                 str(tmp_path / "m.json"), "--type-key", "inst_type", "--type-names", "tumour,other", "-q"]) == 0
    coco = json.loads((tmp_path / "m.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["tumour", "other"]
    assert [a["category_id"] for a in coco["annotations"]] == [2, 1]

    np.save(tmp_path / "images.npy", np.zeros((1, 6, 6, 3)))
    masks = np.zeros((1, 6, 6, 6))
    masks[0, 1:3, 1:3, 1] = 3
    np.save(tmp_path / "masks.npy", masks)
    assert main(["pannuke", "--images", str(tmp_path / "images.npy"), "--masks", str(tmp_path / "masks.npy"),
                 "--out", str(tmp_path / "p" / "p.json"), "--keep-types", "-q"]) == 0
    assert (tmp_path / "p" / "p_images" / "00000.png").is_file()
    assert json.loads((tmp_path / "p" / "p.json").read_text())["annotations"][0]["category_id"] == 2

    stage = tmp_path / "stage1_test" / "img"
    (stage / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((5, 5, 4), np.uint8)).save(stage / "images" / "img.png")
    assert main(["dsb2018", "--images", str(tmp_path / "stage1_test"), "--out", str(tmp_path / "d.json"), "-q"]) == 2
    assert "masks folder not found (use --allow-unlabelled" in capsys.readouterr().err
    assert main(["dsb2018", "--images", str(tmp_path / "stage1_test"), "--out", str(tmp_path / "d.json"),
                 "--allow-unlabelled", "-q"]) == 0
    assert json.loads((tmp_path / "d.json").read_text())["annotations"] == []

    with pytest.raises(SystemExit) as usage:
        main(["prepare-builtin", "nonsense", "--source", "."])
    assert usage.value.code == 2 and "invalid choice: 'nonsense'" in capsys.readouterr().err


# ---- issue 22 ------------------------------------------------------------------------------------------------------

def _imported_modules(stderr: str) -> set[str]:
    """Top-level module names in ``python -X importtime`` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_help_and_usage_errors_import_nothing_heavy():
    """--help and argument errors come back in a fraction of a second: no torch, numpy or nuclei_d2 import."""
    for args, code in ((["--help"], 0), (["to-labels", "--help"], 0), (["to-labels", "--json", "x.json"], 2),
                       (["monuseg-xml", "--images", "a", "--xml", "b", "--out", "c.json", "--rasterize", "x"], 2),
                       (["prepare-builtin", "tnbc", "--source", ".", "--from-xml"], 2),
                       (["mat", "--images", "a", "--labels", "b", "--out", "c.json", "--type-key", "t"], 2)):
        proc = subprocess.run([sys.executable, "-X", "importtime", str(TOOL), *args], capture_output=True, text=True,
                              cwd=REPO, timeout=60)
        assert proc.returncode == code, (args, proc.stderr[-500:])
        heavy = _imported_modules(proc.stderr) & {"torch", "numpy", "nuclei_d2", "detectron2", "cv2", "tifffile"}
        assert not heavy, (args, heavy)
    assert "--rasterize {centers,fill-poly}" in run("monuseg-xml", "--help").stdout


def test_tool_rasterize_choices_match_the_package():
    from nuclei_d2.data.converters.monuseg_xml import RASTERIZE_METHODS

    assert load_tool("convert_dataset").RASTERIZE == RASTERIZE_METHODS


def test_to_labels_bad_json_one_line_exit_2_nothing_written(tmp_path):
    """An annotation without image_id was a KeyError traceback; now one line naming the file, exit 2."""
    from nuclei_d2.structures import mask_crop_to_rle

    m = np.zeros((4, 4), bool)
    m[1:3, 1:3] = True
    rle = mask_crop_to_rle(m, 0, 0, 4, 4)
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4},
                       {"id": 2, "file_name": "b.png", "height": 4, "width": 4}],
            "annotations": [{"id": 1, "image_id": 1, "segmentation": rle, "area": 4.0},
                            {"id": 2, "segmentation": rle, "area": 4.0},
                            {"id": 3, "image_id": 5, "segmentation": rle, "area": 4.0}]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(coco))
    proc = run("to-labels", "--json", str(path), "--out-dir", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {path}: annotation 2 (#2 of 'annotations'): no image_id "
                                                   "(and 1 more problem(s) in the file)")
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]


def test_tool_output_errors_one_line_exit_2(tmp_path, capsys):
    """An output whose parent is a file, a read-only pseudo file system, a --out-dir that is a file: one line naming
    the path, exit 2, checked before the input is even read (the inputs here do not exist)."""
    main = load_tool("convert_dataset").main
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    cases = [
        (["labels", "--images", "nope", "--labels", "nope", "--out", str(blocker / "x.json")],
         f"error: {blocker / 'x.json'}: cannot create the output: {blocker} is a file, not a folder"),
        (["monuseg-xml", "--images", "nope", "--xml", "nope", "--out", "/proc/nuclei_d2_test.json"],
         "error: /proc/nuclei_d2_test.json: cannot write the output there (in /proc)"),
        (["to-labels", "--json", "nope.json", "--out-dir", str(blocker)],
         f"error: {blocker}: the label map folder is an existing file, not a folder"),
        (["to-labels", "--json", "nope.json", "--out-dir", str(tmp_path / "o"), "--type-dir", "/sys/nuclei_d2_test"],
         "error: /sys/nuclei_d2_test: cannot write the type map folder there (in /sys)"),
        (["pannuke", "--images", "nope.npy", "--masks", "nope.npy", "--out", str(tmp_path / "p.json"),
          "--image-dir", str(blocker / "png")], f"error: {blocker / 'png'}: cannot create the PanNuke image folder"),
        (["prepare-builtin", "tnbc", "--source", "nope", "--root", str(blocker)],
         f"error: {blocker}: the datasets root is an existing file"),
    ]
    for argv, message in cases:
        assert main([*argv, "-q"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_tool_truncated_tiff_and_rasterize(tmp_path, capsys):
    import tifffile

    main = load_tool("convert_dataset").main
    (tmp_path / "im").mkdir()
    (tmp_path / "xml").mkdir()
    tifffile.imwrite(tmp_path / "im" / "t.tif", np.full((12, 12, 3), 200, np.uint8))
    (tmp_path / "xml" / "t.xml").write_text(
        '<Annotations><Region Id="1"><Vertex X="3" Y="3"/><Vertex X="7" Y="3"/><Vertex X="7" Y="7"/>'
        '<Vertex X="3" Y="7"/></Region></Annotations>')
    args = ["monuseg-xml", "--images", str(tmp_path / "im"), "--xml", str(tmp_path / "xml"), "-q"]
    assert main([*args, "--out", str(tmp_path / "c.json")]) == 0
    assert main([*args, "--out", str(tmp_path / "f.json"), "--rasterize", "fill-poly"]) == 0
    areas = [json.loads((tmp_path / f"{n}.json").read_text())["annotations"][0]["area"] for n in ("c", "f")]
    assert areas == [16.0, 25.0]
    data = (tmp_path / "im" / "t.tif").read_bytes()
    (tmp_path / "im" / "t.tif").write_bytes(data[:-50])
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "cut.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'im' / 't.tif'}: truncated TIFF: page 0 needs") and err.count("\n") == 1
    assert not (tmp_path / "cut.json").exists()


def test_prepare_builtin_rasterize_is_not_ignored(tmp_path, capsys):
    """--rasterize when the training tiles come as label maps would change nothing: an error, not a silent no-op."""
    main = load_tool("convert_dataset").main
    for sub in ("train/images", "train/labels"):
        (tmp_path / "src" / sub).mkdir(parents=True)
    argv = ["prepare-builtin", "monuseg2018", "--source", str(tmp_path / "src"), "--root", str(tmp_path / "ds"),
            "--rasterize", "fill-poly", "-q"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'src' / 'train' / 'labels'}: the training tiles come as "
                                       "label maps here, so --rasterize would change nothing; add --from-xml to "
                                       "rasterize the XMLs\n")
    assert not (tmp_path / "ds").exists()
