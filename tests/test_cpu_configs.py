"""The CPU time-to-accuracy configs (issue 10) build, train a step and predict; the curve benchmark runs end to end."""

from __future__ import annotations

import csv
import json
import subprocess

import pytest
import torch
from conftest import CONFIGS, REPO, tiny_cfg
from detectron2.data import DatasetCatalog
from detectron2.utils.events import EventStorage

from nuclei_d2.data.mapper import NucleiDatasetMapper
from nuclei_d2.engine import build_optimizer
from nuclei_d2.modeling import build_nuclei_model

CPU_CONFIGS = sorted(p.name for p in CONFIGS.glob("*-cpu.yaml") if not p.name.endswith("-kumar-cpu.yaml"))
SYNTH = ["DATASETS.TRAIN", "('nuclei_synth_train',)", "DATASETS.TEST", "('nuclei_synth_test',)"]


def test_there_are_cpu_configs():
    assert {"maskrcnn_baseline-cpu.yaml", "maskrcnn_plus-cpu.yaml", "brpnet-cpu.yaml", "brpnet_stage2-cpu.yaml",
            "nb_unet-cpu.yaml", "panoptic_fusion-cpu.yaml", "two_stage_unet-cpu.yaml",
            "two_stage_unet_stage2-cpu.yaml"} <= set(CPU_CONFIGS)


@pytest.mark.parametrize("name", CPU_CONFIGS)
def test_cpu_config_trains_a_step_and_predicts(name):
    torch.manual_seed(0)
    from nuclei_d2.config import build_cfg
    from nuclei_d2.engine import RANDOM_INIT_OPTS

    assert build_cfg(str(CONFIGS / name)).DATASETS.TRAIN == ("kumar_train",)  # they target the Kumar split
    # stage-2 configs load their stage-1 model from a path; here the stage-1 part stays randomly initialised
    cfg = tiny_cfg(name, *SYNTH, *RANDOM_INIT_OPTS)
    model = build_nuclei_model(cfg)
    mapper = NucleiDatasetMapper(cfg, is_train=True)
    batch = [b for b in (mapper(d) for d in DatasetCatalog.get("nuclei_synth_train")[:3]) if b is not None][:2]
    optimizer = build_optimizer(cfg, model)
    model.train()
    with EventStorage(0):
        total = sum(model(batch).values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    model.eval()
    test_mapper = NucleiDatasetMapper(cfg, is_train=False)
    with torch.no_grad():
        out = model([test_mapper(DatasetCatalog.get("nuclei_synth_test")[0])])
    inst = out[0]["instances"]
    assert inst.pred_masks.shape[0] == len(inst.scores) and inst.pred_masks.dtype == torch.bool


@pytest.mark.slow
def test_time_to_accuracy_benchmark_writes_its_curve(python, tmp_path):
    out = tmp_path / "tta"
    cmd = [python, str(REPO / "benchmarks" / "time_to_accuracy.py"), "--config-file",
           str(CONFIGS / "maskrcnn_baseline-tiny.yaml"), "--minutes", "0.3", "--eval-every", "0.15",
           "--output-dir", str(out), "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "500", "SOLVER.STEPS", "(400,)",
           "TEST.EVALUATORS", "['nuclei']"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "curve.csv")))
    assert len(rows) >= 2  # every 0.15 min and at the budget
    minutes = [float(r["minutes"]) for r in rows]
    assert minutes == sorted(minutes) and minutes[-1] >= 0.3
    assert all(0 <= float(r["AJI"]) <= 1 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["floor"]["AJI"] > 0 and summary["final"]["iteration"] == int(rows[-1]["iteration"])
    assert (out / "curve.png").stat().st_size > 1000
    # stopped by the budget (not MAX_ITER), the last evaluated model is still saved
    final = torch.load(out / "train" / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] + 1 == summary["final"]["iteration"]
