"""The prediction product: Predictor with real tiny models, the batch runner (bad inputs, restart, shards), the CLI."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import tifffile
from conftest import CONFIGS, REPO, tiny_cfg
from PIL import Image
from scipy import ndimage

from nuclei_d2.inference import NucleiPredictor, Predictor, RunOptions, run_batch
from nuclei_d2.inference.merge import CropMasks
from nuclei_d2.inference.stitching import crops_from_label_map


def dark_blobs(tiles):
    out = []
    for t in tiles:
        lab, n = ndimage.label(t.mean(axis=2) < 150)
        out.append(crops_from_label_map(lab, np.full(n, 0.9) if n else None))
    return out


def blob_image(h=120, w=150, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 235, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(12):
        cy, cx = rng.integers(8, h - 8), rng.integers(8, w - 8)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = (80, 50, 140)
    return img


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(3):
        Image.fromarray(blob_image(seed=i)).save(d / f"img{i}.png")
    return d


def fake_predictor(**kw):
    return Predictor(tile_fn=dark_blobs, tile_size=64, overlap=24, progress=False, **kw)


def test_bad_inputs_are_reported_and_the_batch_goes_on(tmp_path, folder):
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "notes.gif").write_bytes(b"GIF89a")
    rgba = np.dstack([blob_image(seed=5), np.full((120, 150), 255, np.uint8)])
    Image.fromarray(rgba).save(folder / "rgba.png")
    tifffile.imwrite(folder / "deep.tif", blob_image(seed=6).astype(np.uint16) * 257, photometric="rgb")
    Image.fromarray(blob_image(seed=7)[:, :, 0]).save(folder / "grey.png")
    tifffile.imwrite(folder / "cube.tif", np.zeros((4, 5, 6, 7), np.uint8))
    inputs = [folder, folder / "notes.gif", tmp_path / "missing.png", str(tmp_path / "nothing*.png")]
    summary = run_batch(fake_predictor(), inputs, tmp_path / "out", RunOptions(outputs=["geojson", "csv"]))
    by_name = {r.input.rsplit("/", 1)[-1]: r for r in summary.results}
    assert {n for n, r in by_name.items() if r.status == "done"} == {"img0.png", "img1.png", "img2.png", "rgba.png",
                                                                      "deep.tif", "grey.png"}
    failed = {n: r.error for n, r in by_name.items() if r.status == "failed"}
    assert set(failed) == {"broken.png", "notes.gif", "missing.png", "nothing*.png", "cube.tif"}
    assert "broken.png: cannot read image" in failed["broken.png"]
    assert "unsupported image format '.gif'" in failed["notes.gif"]
    assert "cube.tif" in failed["cube.tif"] and "shape" in failed["cube.tif"]
    assert failed["missing.png"] == "file not found"
    assert any("RGBA" in w for w in by_name["rgba.png"].warnings)
    assert any("16-bit" in w for w in by_name["deep.tif"].warnings)
    assert any("greyscale" in w for w in by_name["grey.png"].warnings)
    # the 16-bit copy is segmented like the 8-bit one would be
    assert by_name["deep.tif"].nuclei > 0
    text = summary.format()
    assert "5 failed" in text and "FAILED" in text and "broken.png" in text
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["counts"] == {"done": 6, "skipped": 0, "failed": 5}


def test_restart_after_a_kill_skips_finished_files(tmp_path, folder):
    out = tmp_path / "out"
    opts = RunOptions(outputs=["geojson", "csv", "labels"])

    def killed(res):
        raise KeyboardInterrupt  # the process dies right after its first file

    with pytest.raises(KeyboardInterrupt):
        run_batch(fake_predictor(), [folder], out, opts, on_file_done=killed)
    done = sorted(p.name for p in out.glob("*.done.json"))
    assert done == ["img0.done.json"]
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("img0*")}
    # a half-written output of the killed file (a stray temp) must not count as done
    (out / ".img1.abc.tmp.geojson").write_text("{")
    summary = run_batch(fake_predictor(), [folder], out, opts)
    assert [r.status for r in summary.results] == ["skipped", "done", "done"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("img0*")} == first
    # a deleted output makes its file redo
    (out / "img2.geojson").unlink()
    summary = run_batch(fake_predictor(), [folder], out, opts)
    assert [r.status for r in summary.results] == ["skipped", "skipped", "done"]
    # more outputs requested than were written: redo
    summary = run_batch(fake_predictor(), [folder], out, RunOptions(outputs=["geojson", "overlay"]))
    assert [r.status for r in summary.results] == ["done", "done", "done"]


def test_shards_are_disjoint_and_cover_everything(tmp_path, folder):
    names = []
    for rank in range(2):
        s = run_batch(fake_predictor(), [folder], tmp_path / "out", RunOptions(outputs=["csv"]), rank=rank, world=2)
        names.append({r.input for r in s.results})
        assert (tmp_path / "out" / f"summary_rank{rank}.json").is_file()
    assert not names[0] & names[1]
    assert len(names[0] | names[1]) == 3


@pytest.mark.parametrize("config", ["maskrcnn_baseline-tiny.yaml", "two_stage_unet-tiny.yaml"])
def test_real_tiny_models_tiled(config):
    """Any model from a config: tiled prediction returns nuclei inside the image; the minimal API still works."""
    opts = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.6"] if "rcnn" in config else []
    cfg = tiny_cfg(config, *opts)
    img = blob_image(100, 140)
    pred = Predictor(cfg, tile_size=64, overlap=16, batch_size=2, progress=False)
    crops = pred.predict(img)
    assert isinstance(crops, CropMasks) and crops.image_size == (100, 140)
    if len(crops):
        assert (crops.boxes[:, 2] <= 140).all() and (crops.boxes[:, 3] <= 100).all()
        assert np.all(np.diff(crops.scores) <= 0)
    inst = NucleiPredictor(cfg)(img)
    assert inst.image_size == (100, 140) and inst.has("pred_masks")


def test_tta_from_config_is_used(tmp_path):
    cfg = tiny_cfg("two_stage_unet-tiny.yaml", "TEST.AUG.ENABLED", "True",
                   "TEST.AUG.TRANSFORMS", "['identity', 'hflip']")
    pred = Predictor(cfg, tile_size=64, overlap=16, progress=False)
    from nuclei_d2.inference import TestTimeWrapper

    assert isinstance(pred.model, TestTimeWrapper) and pred.model.num_predictions == 2
    assert pred.model.merge_mode == "probs"  # a dense model: maps averaged per tile, then post-processed
    assert isinstance(pred.predict(blob_image(70, 90)), CropMasks)


def test_cli_end_to_end(tmp_path, folder, python):
    (folder / "broken.png").write_bytes(b"xx")
    (folder / "img2.png").unlink()  # keep the subprocess short
    cmd = [python, str(REPO / "tools" / "predict.py"), "--config-file", str(CONFIGS / "two_stage_unet-tiny.yaml"),
           "--input", str(folder), "--output", str(tmp_path / "out"), "--outputs", "geojson", "csv", "coco",
           "labels", "overlay", "--tile-size", "96", "--overlap", "32", "--no-progress", "MODEL.DEVICE", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]  # one failure
    assert "2 done" in r.stdout and "1 failed" in r.stdout and "broken.png" in r.stdout
    for stem in ("img0", "img1"):
        for suffix in (".geojson", "_nuclei.csv", ".coco.json", "_labels.tif", "_overlay.png", ".done.json"):
            assert (tmp_path / "out" / f"{stem}{suffix}").is_file()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counts"] == {"done": 2, "skipped": 0, "failed": 1}
    bad = subprocess.run(cmd[:-2] + ["MODEL.NOT_A_KEY", "1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown config key" in bad.stderr
