"""SOLVER.TIME_BUDGET: train for minutes, with the learning-rate schedule on a clock of training time (issue 24)."""

from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch
from conftest import tiny_cfg

from nuclei_d2.engine import RANDOM_INIT_OPTS, ConfigError, NucleiTrainer
from nuclei_d2.engine.time_budget import TimeBudgetHook, TrainingClock, build_time_budget

NB = "nb_unet-tiny.yaml"
NO_TEST = ["DATASETS.TRAIN", "('nuclei_synth_train',)", "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", "2"]
COSINE = ["SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR", "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()",
          "SOLVER.BASE_LR", "0.001"]


def _cosine(fraction: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * fraction))


def _scheduler(cfg):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    return NucleiTrainer.build_lr_scheduler(cfg, opt), opt


def test_learning_rate_follows_the_clock_or_the_iterations_whichever_is_ahead():
    cfg = tiny_cfg(NB, *COSINE, "SOLVER.MAX_ITER", "1000", "SOLVER.TIME_BUDGET.MINUTES", "2")
    base, opt = _scheduler(cfg)
    clock, sched = build_time_budget(cfg, base)
    assert clock.budget_seconds == 120
    for step, seconds in enumerate((0.0, 30.0, 60.0, 119.0, 500.0), start=1):  # far fewer steps than seconds
        clock.seconds = seconds
        opt.step()
        sched.step()
        lr = sched.optimizer.param_groups[0]["lr"]
        assert lr == pytest.approx(0.001 * _cosine(min(max(seconds / 120, step / 1000), 1.0)), abs=1e-12), seconds
    assert clock.spent and clock.fraction() == 1.0
    clock.seconds = 0.0
    for _ in range(500):  # half of MAX_ITER in no time (a fast machine): the iterations lead
        opt.step()
        sched.step()
    assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(0.001 * _cosine(505 / 1000), abs=1e-12)


def test_off_by_default_and_schedule_kept_without_lr_on_clock():
    cfg = tiny_cfg(NB, *COSINE, "SOLVER.MAX_ITER", "10")
    sched, _ = _scheduler(cfg)
    assert build_time_budget(cfg, sched) is None
    cfg = tiny_cfg(NB, *COSINE, "SOLVER.MAX_ITER", "10", "SOLVER.TIME_BUDGET.MINUTES", "1",
                   "SOLVER.TIME_BUDGET.LR_ON_CLOCK", "False")
    clock, same = build_time_budget(cfg, sched)
    assert same is sched and clock.budget_seconds == 60


def test_negative_budget_is_a_config_error():
    cfg = tiny_cfg(NB, "SOLVER.TIME_BUDGET.MINUTES", "-1")
    with pytest.raises(ConfigError, match="SOLVER.TIME_BUDGET.MINUTES must be >= 0"):
        build_time_budget(cfg, _scheduler(cfg)[0])
    with pytest.raises(ValueError, match="> 0 seconds"):
        TrainingClock(0)


def _trainer(tmp_path, max_iter: int, minutes: float, *opts: str) -> NucleiTrainer:
    cfg = tiny_cfg(NB, *NO_TEST, *COSINE, *RANDOM_INIT_OPTS, "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER",
                   str(max_iter), "SOLVER.CHECKPOINT_PERIOD", "100000", "SOLVER.TIME_BUDGET.MINUTES", str(minutes),
                   *opts)
    trainer = NucleiTrainer(cfg)
    hook = next(h for h in trainer._hooks if isinstance(h, TimeBudgetHook))
    ticks = itertools.count()
    hook.timer = lambda: float(next(ticks))  # every step lasts exactly 1 s: before_step, then after_step
    return trainer


def _iteration(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["iteration"]


@pytest.mark.slow
def test_training_ends_at_the_budget_with_the_decay_completed(tmp_path):
    trainer = _trainer(tmp_path, 1000, 0.1, "SOLVER.EMA.ENABLED", "True")  # 6 s of 1-s steps, MAX_ITER far away
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.iter == 6 and trainer.training_clock.seconds == 6
    assert _iteration(tmp_path / "model_final.pth") == 5  # Detectron2's numbering: the last step's index
    final = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["trainer"]["hooks"]["TimeBudgetHook"] == {"seconds": 6.0}  # what benchmarks/ensemble.py reports
    assert final["trainer"]["iteration"] == 5  # --resume from it starts at 6, as from Detectron2's model_final
    assert _iteration(tmp_path / "model_ema_final.pth") == 5
    lrs = [v for v, _ in trainer.storage.history("lr").values()]  # the lr each step trained with
    assert lrs == pytest.approx([0.001 * _cosine(k / 6) for k in range(6)], abs=1e-9)


@pytest.mark.slow
def test_max_iter_first_completes_the_schedule_on_iterations(tmp_path, caplog):
    trainer = _trainer(tmp_path, 3, 0.1)  # a fast machine: MAX_ITER after 3 of the 6 s
    trainer.resume_or_load(resume=False)
    with caplog.at_level(logging.INFO, logger="nuclei_d2.engine.time_budget"):
        trainer.train()
    assert "SOLVER.MAX_ITER (3) was reached after 0.05 of the 0.10 minutes" in caplog.text
    assert _iteration(tmp_path / "model_final.pth") == 2
    lrs = [v for v, _ in trainer.storage.history("lr").values()]  # MAX_ITER's share ran ahead of the clock's
    assert lrs == pytest.approx([0.001 * _cosine(k / 3) for k in range(3)], abs=1e-9)


@pytest.mark.slow
def test_resume_continues_the_clock(tmp_path):
    first = _trainer(tmp_path, 1000, 0.1, "SOLVER.CHECKPOINT_PERIOD", "3")
    first.resume_or_load(resume=False)
    first.train()
    (tmp_path / "last_checkpoint").write_text("model_0000002.pth")  # as if killed after 3 of the 6 s
    second = _trainer(tmp_path, 1000, 0.1)
    second.resume_or_load(resume=True)
    assert second.start_iter == 3 and second.training_clock.seconds == 3  # restored from the checkpoint
    second.train()
    assert second.iter == 6 and second.training_clock.seconds == 6
    assert _iteration(tmp_path / "model_final.pth") == 5
    lrs = [v for v, _ in second.storage.history("lr").values()]
    assert lrs == pytest.approx([0.001 * _cosine(k / 6) for k in (3, 4, 5)], abs=1e-9)


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step(python, tmp_path):
    """--num-gpus 2 on CPU: one clock for both ranks (the slowest step), so neither waits for the other forever."""
    import subprocess

    from conftest import CONFIGS, REPO

    out = tmp_path / "ddp"
    cmd = [python, str(REPO / "tools" / "train_net.py"), "--config-file", str(CONFIGS / "maskrcnn_baseline-tiny.yaml"),
           "--num-gpus", "2", "--dist-url", "auto", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out),
           "SOLVER.MAX_ITER", "2000", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.TIME_BUDGET.MINUTES", "0.02",
           "TEST.EVALUATORS", "['coco']"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = _iteration(out / "model_final.pth")
    assert 0 <= last < 1999  # stopped by the 1.2-second budget, not by MAX_ITER
    log = (out / "log.txt").read_text()
    assert f"training minutes spent at iteration {last + 1}: training ends" in log
