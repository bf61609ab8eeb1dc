"""The README demo (tools/demo.py) end to end, and the predictor/overlay it uses."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from conftest import REPO, tiny_cfg
from PIL import Image

from nuclei_d2.inference import NucleiPredictor, draw_outlines, save_overlay


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
    for name in ("demo_overlay.png", "metrics_final.json", "demo_prediction_labels.png", "model_final.pth"):
        assert (out / name).is_file(), name
        assert str(out / name) in proc.stdout
    metrics = json.loads((out / "metrics_final.json").read_text())
    assert "segm" in metrics and "nuclei" in metrics
    assert 0.0 <= metrics["nuclei"]["AJI"] <= 1.0
    assert "synthetic" in proc.stdout


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
