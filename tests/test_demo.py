"""The README demo (tools/demo.py) end to end, and the predictor/overlay it uses."""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, tiny_cfg
from PIL import Image

from nuclei_d2 import model_zoo
from nuclei_d2.config import build_cfg
from nuclei_d2.engine import NucleiTrainer
from nuclei_d2.engine.demo import count_nuclei, demo_cfg
from nuclei_d2.inference import NucleiPredictor, draw_outlines, save_overlay


def _as_data(cfg) -> dict:
    """A config as plain data (its YAML read back), so equal configs compare equal whatever YAML anchors it uses."""
    return yaml.safe_load(cfg.dump())


def test_outlines_and_overlay(tmp_path):
    image = np.full((20, 30, 3), 200, np.uint8)
    label = np.zeros((20, 30), np.int32)
    label[5:10, 5:10] = 1
    out = draw_outlines(image, label, (0, 255, 0))
    assert (out[5, 5] == [0, 255, 0]).all() and (out[7, 7] == 200).all() and (out[0, 0] == 200).all()
    path = save_overlay(tmp_path / "o.png", image, label, gt_label=label)
    assert np.asarray(Image.open(path)).shape == (20, 64, 3)  # prediction | 4 px gap | ground truth


def test_predictor_accepts_grey_and_rgba():
    predictor = NucleiPredictor(tiny_cfg())  # random weights: only shapes are checked
    for image in (np.zeros((48, 40), np.uint8), np.zeros((48, 40, 4), np.uint8)):
        inst = predictor(image)
        assert inst.image_size == (48, 40) and inst.pred_masks.shape[1:] == (48, 40)


@pytest.mark.slow
def test_demo_writes_overlay_metrics_and_prints_paths(python, tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([python, str(REPO / "tools" / "demo.py"), "--output", str(out), "--iters", "3"],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for name in ("demo_overlay.png", "metrics_final.json", "demo_prediction_labels.png", "model_final.pth",
                 "config.yaml"):
        assert (out / name).is_file(), name
        assert str(out / name) in proc.stdout
    metrics = json.loads((out / "metrics_final.json").read_text())
    assert "segm" in metrics and "nuclei" in metrics
    assert 0.0 <= metrics["nuclei"]["AJI"] <= 1.0
    assert "synthetic" in proc.stdout

    # Footprint: one checkpoint, the model's weights alone (the optimizer state tripled it), everything < 200 MB.
    assert [p.name for p in out.glob("model_*.pth")] == ["model_final.pth"]
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert total < 200e6, f"{total / 1e6:.0f} MB"
    ckpt = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert set(ckpt) <= {"model", "iteration"} and ckpt["iteration"] == 2

    # config.yaml beside the weights rebuilds the very config the demo trained, and the weights fit its model.
    saved = build_cfg(str(out / "config.yaml"))
    assert _as_data(saved) == _as_data(demo_cfg(str(REPO / "configs" / "maskrcnn_baseline-tiny.yaml"), out, 3))
    model = NucleiTrainer.build_model(saved)
    incompatible = model.load_state_dict(ckpt["model"], strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys

    # The nucleus count printed is the number of nuclei in the label map written (not its maximum id).
    label = np.asarray(Image.open(out / "demo_prediction_labels.png"))
    printed = int(re.search(r"predicted (\d+) nuclei", proc.stdout).group(1))
    assert printed == len(np.unique(label[label > 0]))

    # Then the shipped zoo's flagship on the same tile: overlay, GeoJSON, CSV and the command for one's own image.
    lead = model_zoo.flagship(model_zoo.manifest.PACKAGE_ZOO)
    if lead is None:
        assert "no flagship entry" in proc.stdout
    else:
        (marker,) = (out / "zoo").glob("*.done.json")
        stem = marker.name[: -len(".done.json")]
        for name in (f"{stem}.geojson", f"{stem}_nuclei.csv", f"{stem}_overlay.png"):
            assert (out / "zoo" / name).is_file() and str(out / "zoo" / name) in proc.stdout, name
        assert f"tools/predict.py --model {lead} --input YOUR_IMAGE_OR_SLIDE" in proc.stdout


def test_count_nuclei_counts_labels_not_the_largest_id():
    label = np.zeros((8, 8), np.int32)
    label[0, 0], label[1, 1], label[2, 2] = 3, 64, 64  # ids 1, 2, 4..63 covered by later instances
    assert count_nuclei(label) == 2 and count_nuclei(np.zeros((4, 4), np.uint16)) == 0


def test_demo_keeps_only_the_final_checkpoint():
    cfg = demo_cfg(str(REPO / "configs" / "maskrcnn_baseline-tiny.yaml"), "unused", 150)  # the config saves every 10
    assert cfg.SOLVER.MAX_ITER == 150 and cfg.SOLVER.CHECKPOINT_PERIOD > 150
    assert demo_cfg(str(REPO / "configs" / "maskrcnn_baseline-tiny.yaml"), "unused", 150,
                    ["SOLVER.CHECKPOINT_PERIOD", "50"]).SOLVER.CHECKPOINT_PERIOD == 50  # the user's choice wins


def test_trainer_writes_its_config_beside_the_weights(tmp_path):
    """Every training run (train_net, the demo, benchmarks) leaves OUTPUT_DIR/config.yaml, loadable to its config."""
    cfg = tiny_cfg("maskrcnn_baseline-tiny.yaml", "OUTPUT_DIR", str(tmp_path / "run"), "SOLVER.MAX_ITER", "1")
    trainer = NucleiTrainer(cfg)
    names = [p.name for p in (tmp_path / "run").iterdir()]
    assert "config.yaml" in names and not [n for n in names if n.startswith(".")], names  # no temporary file left
    assert _as_data(build_cfg(str(tmp_path / "run" / "config.yaml"))) == _as_data(trainer.cfg)


def test_demo_drops_lr_steps_at_or_past_its_last_iteration():
    from nuclei_d2.engine.defaults import setup_cfg
    from nuclei_d2.engine.demo import _steps_within

    config = str(REPO / "configs" / "maskrcnn_baseline-tiny.yaml")  # SOLVER.STEPS (1000,)
    opts = ["SOLVER.MAX_ITER", "1000"]
    override = _steps_within(config, opts, 1000)
    assert override == ["SOLVER.STEPS", "()"]
    assert setup_cfg(config, override + opts).SOLVER.STEPS == ()  # without the override: refused (step == MAX_ITER)
    assert _steps_within(config, ["SOLVER.MAX_ITER", "1500"], 1500) == []  # a step inside the run is kept
    # A user's own SOLVER.STEPS is what gets filtered (and, coming later in the overrides, wins).
    assert _steps_within(config, ["SOLVER.STEPS", "(100, 2000)"], 1000) == ["SOLVER.STEPS", "(100,)"]
