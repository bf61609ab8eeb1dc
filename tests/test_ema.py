"""SOLVER.EMA: an exponential moving average of the weights, kept by a training hook (issue 24 lever)."""

from __future__ import annotations

import csv
import json
import subprocess

import pytest
import torch
from conftest import CONFIGS, REPO, load_tool, tiny_cfg
from detectron2.engine import hooks

from nuclei_d2.checkpoint import NucleiCheckpointer
from nuclei_d2.engine import RANDOM_INIT_OPTS, ConfigError, NucleiTrainer, setup_cfg
from nuclei_d2.engine.ema import EMAHook, ModelEMA, ema_decay, ema_hook_of

NB = "nb_unet-tiny.yaml"
SYNTH = ["DATASETS.TRAIN", "('nuclei_synth_train',)", "DATASETS.TEST", "('nuclei_synth_test',)"]
NO_TEST = ["DATASETS.TRAIN", "('nuclei_synth_train',)", "DATASETS.TEST", "()"]


def _toy() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))


def _set(model: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k.endswith("num_batches_tracked"):
                v.fill_(int(value * 10))
            elif "running_var" not in k:  # running_var stays 1: a buffer that never changes
                v.fill_(value)


@pytest.mark.parametrize("warmup", [True, False])
def test_average_equals_the_hand_computed_one(warmup):
    model = _toy()
    _set(model, 1.0)
    ema = ModelEMA(model, decay=0.9, warmup=warmup)
    expected, n = 1.0, 0
    for value in (3.0, -2.0, 0.5):
        _set(model, value)
        ema.update()
        d = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
        assert d == ema_decay(0.9, n, warmup)
        expected = d * expected + (1 - d) * value
        n += 1
    assert ema.updates == 3
    for k, v in ema.state.items():
        if k.endswith("num_batches_tracked"):
            assert v.item() == 5  # integer buffers are copied
        elif "running_var" in k:
            assert torch.equal(v, torch.ones(2))  # a constant stays bit for bit
        else:  # parameters and BatchNorm running_mean are averaged
            assert torch.allclose(v, torch.full_like(v, expected), atol=1e-6), k
    assert ema_decay(0.999, 0, True) == 0.1 and ema_decay(0.999, 10**6, True) == 0.999


def test_swapped_into_puts_the_raw_weights_back_even_on_error():
    model = _toy()
    _set(model, 1.0)
    ema = ModelEMA(model, decay=0.5)
    _set(model, 4.0)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError):
        with ema.swapped_into(model):
            assert torch.equal(model[0].weight, torch.ones(2, 2))
            raise RuntimeError("evaluation failed")
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())


def _train(tmp_path, max_iter: int, *opts: str, config: str = NB) -> NucleiTrainer:
    torch.manual_seed(0)
    cfg = tiny_cfg(config, *RANDOM_INIT_OPTS, "SOLVER.MAX_ITER", str(max_iter), "SOLVER.IMS_PER_BATCH", "2",
                   "OUTPUT_DIR", str(tmp_path), *opts)
    trainer = NucleiTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


def _load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_training_writes_averaged_weights_that_load_and_evaluate(tmp_path, capsys):
    trainer = _train(tmp_path, 3, *SYNTH, "SOLVER.EMA.ENABLED", "True", "SOLVER.EMA.DECAY", "0.9",
                     "TEST.NUCLEI_EVAL.HAUSDORFF", "False")
    names = [type(h).__name__ for h in trainer._hooks]
    assert names.index("EMAHook") < names.index("PeriodicCheckpointer") < names.index("EvalHook")
    assert names.count("EvalHook") == 2  # the raw weights', then the average's
    raw, ema = _load(tmp_path / "model_final.pth"), _load(tmp_path / "model_ema_final.pth")
    assert ema["model"].keys() == raw["model"].keys()
    assert ema["iteration"] == raw["iteration"] == 2  # the last step, 0-based
    assert ema["ema"] == {"decay": 0.9, "warmup": True, "updates": 3}
    floats = [k for k, v in raw["model"].items() if v.is_floating_point()]
    assert any(not torch.equal(ema["model"][k], raw["model"][k]) for k in floats)  # really an average
    # it loads through the safe checkpointer with its fit check, into a fresh model
    model = NucleiTrainer.build_model(trainer.cfg)
    NucleiCheckpointer.from_config(model, trainer.cfg).load(str(tmp_path / "model_ema_final.pth"))
    assert all(torch.equal(v, ema["model"][k]) for k, v in model.state_dict().items())
    # evaluation during training ran on both: the average's results under OUTPUT_DIR/ema and as ema/... scalars
    assert "AJI" in json.loads((tmp_path / "metrics_final.json").read_text())["nuclei"]
    assert "AJI" in json.loads((tmp_path / "ema" / "metrics_final.json").read_text())["nuclei"]
    assert "ema/nuclei/AJI" in trainer.storage.latest() and "nuclei/AJI" in trainer.storage.latest()
    # and the evaluation left the raw weights in the model
    assert all(torch.equal(v, raw["model"][k]) for k, v in trainer.model.state_dict().items())
    # train_net --eval-only evaluates the averaged weights like any model_final.pth
    out = tmp_path / "eval_ema"
    code = load_tool("train_net").main(["--config-file", str(tmp_path / "config.yaml"), "--eval-only",
                                        "OUTPUT_DIR", str(out), "MODEL.WEIGHTS", str(tmp_path / "model_ema_final.pth")])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert "AJI" in json.loads((out / "metrics_final.json").read_text())["nuclei"]


@pytest.mark.slow
def test_decay_zero_keeps_the_final_weights(tmp_path):
    _train(tmp_path, 2, *NO_TEST, "SOLVER.EMA.ENABLED", "True", "SOLVER.EMA.DECAY", "0.0")
    raw, ema = _load(tmp_path / "model_final.pth")["model"], _load(tmp_path / "model_ema_final.pth")["model"]
    assert ema.keys() == raw.keys() and all(torch.equal(ema[k], raw[k]) for k in raw)


@pytest.mark.slow
def test_resume_continues_the_average(tmp_path):
    opts = [*NO_TEST, "SOLVER.EMA.ENABLED", "True", "SOLVER.EMA.DECAY", "0.9"]
    first = _train(tmp_path, 3, *opts)
    saved = _load(tmp_path / "model_final.pth")["trainer"]["hooks"]["EMAHook"]
    assert saved["updates"] == 3
    assert any(not torch.equal(v, first.model.state_dict()[k]) for k, v in saved["model"].items())  # the average

    torch.manual_seed(0)
    cfg = tiny_cfg(NB, *RANDOM_INIT_OPTS, "SOLVER.MAX_ITER", "5", "SOLVER.IMS_PER_BATCH", "2",
                   "OUTPUT_DIR", str(tmp_path), *opts)
    trainer = NucleiTrainer(cfg)
    trainer.resume_or_load(resume=True)
    hook = ema_hook_of(trainer)
    assert trainer.start_iter == 3 and hook.ema is not None and hook.ema.updates == 3
    assert all(torch.equal(hook.ema.state[k], v) for k, v in saved["model"].items())
    trainer.train()
    assert _load(tmp_path / "model_ema_final.pth")["ema"]["updates"] == 5  # 3 before the resume + 2 after


@pytest.mark.slow
def test_disabled_adds_no_hook_and_no_file(tmp_path):
    trainer = _train(tmp_path, 1, *NO_TEST)
    assert ema_hook_of(trainer) is None and not any(isinstance(h, EMAHook) for h in trainer._hooks)
    assert sum(isinstance(h, hooks.EvalHook) for h in trainer._hooks) == 1
    assert (tmp_path / "model_final.pth").exists() and not (tmp_path / "model_ema_final.pth").exists()
    assert not (tmp_path / "ema").exists()


def test_decay_outside_zero_one_is_a_config_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"SOLVER.EMA.DECAY must be in \[0, 1\)"):
        setup_cfg(str(CONFIGS / NB), [*NO_TEST, "SOLVER.EMA.ENABLED", "True", "SOLVER.EMA.DECAY", "1.0"])
    setup_cfg(str(CONFIGS / NB), [*NO_TEST, "SOLVER.EMA.DECAY", "1.0"])  # unused when EMA is off
    code = load_tool("train_net").main(["--config-file", str(CONFIGS / NB), *NO_TEST, "OUTPUT_DIR", str(tmp_path),
                                        "SOLVER.EMA.ENABLED", "True", "SOLVER.EMA.DECAY", "-0.5"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and "SOLVER.EMA.DECAY must be in [0, 1)" in err[0]
    assert not (tmp_path / "model_final.pth").exists()


@pytest.mark.slow
def test_time_to_accuracy_benchmark_evaluates_both_weights(python, tmp_path):
    out = tmp_path / "tta"
    cmd = [python, str(REPO / "benchmarks" / "time_to_accuracy.py"), "--config-file", str(CONFIGS / NB),
           "--minutes", "0.05", "--eval-every", "0.05", "--floor-config", "", "--output-dir", str(out),
           *SYNTH, "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "10000", "SOLVER.IMS_PER_BATCH", "2",
           "TEST.NUCLEI_EVAL.HAUSDORFF", "False", "SOLVER.EMA.ENABLED", "True"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = list(csv.DictReader(open(out / "curve.csv")))
    ema = list(csv.DictReader(open(out / "curve_ema.csv")))
    assert raw and len(ema) == len(raw) and list(ema[0]) == list(raw[0])  # same points, same columns
    assert [r["iteration"] for r in ema] == [r["iteration"] for r in raw]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_ema"]["iteration"] == summary["final"]["iteration"]
    final = _load(out / "train" / "model_final.pth")
    ema_final = _load(out / "train" / "model_ema_final.pth")
    assert ema_final["iteration"] == final["iteration"] and ema_final["model"].keys() == final["model"].keys()
    assert "EMA of the weights" in proc.stdout


TINY = sorted(p.name for p in CONFIGS.glob("*-tiny.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_every_method_trains_with_the_average_and_loads_it(name, tmp_path):
    """Any config (R-CNNs with FrozenBN, U-Nets, BRP-Net, the two-stage models): 2 steps, then the average loads."""
    trainer = _train(tmp_path, 2, *NO_TEST, "SOLVER.EMA.ENABLED", "True", config=name)
    ema = _load(tmp_path / "model_ema_final.pth")["model"]
    model = NucleiTrainer.build_model(trainer.cfg)
    NucleiCheckpointer.from_config(model, trainer.cfg).load(str(tmp_path / "model_ema_final.pth"))  # fit check
    state = model.state_dict()
    assert state.keys() == ema.keys() and all(torch.equal(v, ema[k]) for k, v in state.items())
