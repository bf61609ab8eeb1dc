"""tools/train_net.py end to end on CPU: train, checkpoint, --resume, --eval-only, --num-gpus 2, bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import CONFIGS, REPO

pytestmark = pytest.mark.slow

TINY = str(CONFIGS / "maskrcnn_baseline-tiny.yaml")


def run_train_net(python, *args, check=True, timeout=600):
    cmd = [python, str(REPO / "tools" / "train_net.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained(python, tmp_path_factory):
    """Four iterations of the tiny baseline, checkpoint every 2 iterations."""
    out = tmp_path_factory.mktemp("train")
    run_train_net(python, "--config-file", TINY, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out),
                  "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVALUATORS", "['coco']")
    return out


def test_train_writes_checkpoints_and_metrics(trained):
    assert (trained / "model_final.pth").is_file()
    assert (trained / "model_0000001.pth").is_file()  # CHECKPOINT_PERIOD 2 -> after iteration index 1
    assert (trained / "last_checkpoint").read_text().strip() == "model_final.pth"
    records = read_metrics(trained)
    iters = [r["iteration"] for r in records if "total_loss" in r]
    assert iters and max(iters) == 3
    final = json.loads((trained / "metrics_final.json").read_text())
    assert "AP" in final["segm"]
    assert (trained / "config.yaml").is_file()


def test_resume_continues_from_last_checkpoint(python, trained, tmp_path):
    import shutil

    out = tmp_path / "resume"
    shutil.copytree(trained, out)
    (out / "last_checkpoint").write_text("model_0000001.pth")  # as if killed after iteration 1
    proc = run_train_net(python, "--config-file", TINY, "--resume", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out),
                         "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVALUATORS", "['coco']")
    log = proc.stdout + proc.stderr
    assert "Starting training from iteration 2" in log
    assert (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"


def test_eval_only(python, trained, tmp_path):
    out = tmp_path / "eval"
    run_train_net(python, "--config-file", TINY, "--eval-only", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out),
                  "MODEL.WEIGHTS", str(trained / "model_final.pth"), "TEST.EVALUATORS", "['coco']")
    final = json.loads((out / "metrics_final.json").read_text())
    assert set(final["segm"]) >= {"AP", "AP50"}
    assert not (out / "model_final.pth").exists()  # evaluation does not train


def test_two_cpu_processes(python, tmp_path):
    out = tmp_path / "ddp"
    proc = run_train_net(python, "--config-file", TINY, "--num-gpus", "2", "--dist-url", "auto",
                         "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "2",
                         "SOLVER.IMS_PER_BATCH", "2", "TEST.EVALUATORS", "['coco']")
    assert (out / "model_final.pth").is_file()
    assert "world size: 2" in (proc.stdout + proc.stderr) or "Rank of current process: 0. World size: 2" in (
        out / "log.txt").read_text()


@pytest.mark.parametrize("args, message", [
    (["SOLVER.MAX_ITERS", "3"], "unknown config key 'SOLVER.MAX_ITERS' (did you mean SOLVER.MAX_ITER"),
    (["MODEL.WEIGHTS", "/no/such/model.pth"], "weights file not found: '/no/such/model.pth'"),
    (["DATASETS.TRAIN", "('kumar_trian',)"], "dataset 'kumar_trian' is not registered"),
], ids=["unknown-key", "missing-weights", "unregistered-dataset"])
def test_bad_input_gives_a_clear_error(python, tmp_path, args, message):
    proc = run_train_net(python, "--config-file", TINY, "OUTPUT_DIR", str(tmp_path), *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
