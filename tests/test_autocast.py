"""SOLVER.AMP on CPU: every method trains under bfloat16 autocast with the real NucleiTrainer (issue 24 lever)."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIGS, tiny_cfg
from detectron2.engine import SimpleTrainer

from nuclei_d2.engine import RANDOM_INIT_OPTS, NucleiTrainer
from nuclei_d2.engine.autocast import AutocastTrainer, amp_dtype, build_train_loop

TINY = sorted(p.name for p in CONFIGS.glob("*-tiny.yaml"))
SYNTH = ["DATASETS.TRAIN", "('nuclei_synth_train',)", "DATASETS.TEST", "('nuclei_synth_test',)"]


def test_amp_dtype_resolves_and_refuses_float16_on_cpu():
    assert amp_dtype("auto", "cpu") == torch.bfloat16
    assert amp_dtype("auto", "cuda") == torch.float16
    assert amp_dtype("BFloat16", "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="float16 needs CUDA"):
        amp_dtype("float16", "cpu")
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION must be"):
        amp_dtype("fp8", "cpu")


def test_amp_off_is_detectron2s_simple_trainer(tmp_path):
    trainer = NucleiTrainer(tiny_cfg("nb_unet-tiny.yaml", *SYNTH, *RANDOM_INIT_OPTS, "SOLVER.MAX_ITER", "1",
                                     "OUTPUT_DIR", str(tmp_path)))
    assert type(trainer._trainer) is SimpleTrainer
    assert build_train_loop(trainer.cfg, trainer.model, [], trainer.optimizer).__class__ is SimpleTrainer


@pytest.mark.parametrize("name", TINY)
def test_every_method_trains_under_bfloat16_autocast(name, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(name, *SYNTH, *RANDOM_INIT_OPTS, "SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", "2",
                   "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path))  # training only
    trainer = NucleiTrainer(cfg)
    assert isinstance(trainer._trainer, AutocastTrainer) and trainer._trainer.dtype == torch.bfloat16
    conv_dtypes: set[torch.dtype] = set()
    convs = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d)]
    handles = [c.register_forward_hook(lambda m, i, o: conv_dtypes.add(o.dtype)) for c in convs]
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if v.is_floating_point()}
    trainer.train()
    for h in handles:
        h.remove()
    assert torch.bfloat16 in conv_dtypes  # the convolutions really ran in bfloat16
    after = trainer.model.state_dict()
    assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())  # master weights fp32
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the optimizer stepped
    losses = trainer.storage.history("total_loss").values()
    assert losses and all(torch.isfinite(torch.tensor(v)) for v, _ in losses)


@pytest.mark.parametrize("precision, expected", [("auto", SimpleTrainer), ("bfloat16", AutocastTrainer)])
def test_cpu_without_native_bfloat16_trains_float32_unless_forced(precision, expected, monkeypatch, caplog):
    """The CPU configs turn AMP on; on a CPU that would emulate bfloat16 (slower), "auto" falls back to float32."""
    import nuclei_d2.engine.autocast as autocast

    cfg = tiny_cfg("nb_unet-tiny.yaml", *SYNTH, *RANDOM_INIT_OPTS, "SOLVER.AMP.ENABLED", "True",
                   "SOLVER.AMP.PRECISION", precision)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monkeypatch.setattr(autocast, "cpu_has_native_bfloat16", lambda: False)
    with caplog.at_level("WARNING", logger=autocast.__name__):
        loop = build_train_loop(cfg, model, [], optimizer)
    assert type(loop) is expected
    assert "no native bfloat16" in caplog.text
    assert ("training in float32" in caplog.text) == (precision == "auto")
    monkeypatch.setattr(autocast, "cpu_has_native_bfloat16", lambda: True)
    assert type(build_train_loop(cfg, model, [], optimizer)) is AutocastTrainer  # native: bfloat16 either way
