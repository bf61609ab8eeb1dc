"""SOLVER.COMPILE: torch.compile of the dense networks in the training step (issue 24 lever).

The two trainings compile for real with inductor (its C++ backend): minutes on a slow CPU the first time, so they
are marked slow and keep to one small config each; inductor's cache goes to a temporary folder (or
``$TORCHINDUCTOR_CACHE_DIR`` when set). The other tests replace ``torch.compile`` and take seconds.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from conftest import tiny_cfg
from detectron2.data import DatasetCatalog
from detectron2.utils.events import EventStorage

from nuclei_d2.checkpoint import NucleiCheckpointer
from nuclei_d2.engine import RANDOM_INIT_OPTS, ConfigError, NucleiTrainer
from nuclei_d2.engine.compile import compile_for_training, compile_targets
from nuclei_d2.modeling import build_nuclei_model

NO_TEST = ["DATASETS.TRAIN", "('nuclei_synth_train',)", "DATASETS.TEST", "()"]
COMPILE = ["SOLVER.COMPILE.ENABLED", "True"]
# no dropout: inductor draws its own random numbers, so a step with dropout is not comparable with the eager one
NB = ["MODEL.UNET.DROPOUT", "0.0", "MODEL.CHANNELS_LAST", "True"]


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory):
    """Inductor's on-disk cache in this run's temporary folder, unless the caller chose one (warm local runs)."""
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if old is None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor"))
    yield
    if old is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)


def _compile_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "SOLVER.COMPILE" in
            r.getMessage()]


def _trainer(tmp_path, config: str, *opts: str) -> NucleiTrainer:
    torch.manual_seed(0)
    cfg = tiny_cfg(config, *RANDOM_INIT_OPTS, *NO_TEST, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(tmp_path), *opts)
    return NucleiTrainer(cfg)


def _finite_losses(trainer: NucleiTrainer) -> list[float]:
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) for v in losses)
    return losses


def _check_checkpoint_round_trip(trainer: NucleiTrainer, tmp_path) -> None:
    """model_final.pth of a compiled training has the eager model's keys and loads into an eager model; an eager
    model's checkpoint loads into the compiled one."""
    cfg = trainer.cfg
    saved = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    eager = build_nuclei_model(cfg)
    assert list(saved) == list(eager.state_dict()) == list(trainer.model.state_dict())  # no "_orig_mod." anywhere
    NucleiCheckpointer.from_config(eager, cfg).load(str(tmp_path / "model_final.pth"))
    assert all(torch.equal(v, saved[k]) for k, v in eager.state_dict().items())
    # and the other way: an eager model's checkpoint into the compiled trainer's model
    torch.manual_seed(1)
    other = build_nuclei_model(cfg)
    torch.save({"model": other.state_dict()}, tmp_path / "eager.pth")
    NucleiCheckpointer.from_config(trainer.model, cfg).load(str(tmp_path / "eager.pth"))
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in trainer.model.state_dict().items())


def test_targets_are_the_dense_networks_and_the_rcnn_backbone():
    def names(config: str) -> list[str]:
        return [n for n, _ in compile_targets(build_nuclei_model(tiny_cfg(config, *RANDOM_INIT_OPTS)))]

    assert names("nb_unet-tiny.yaml") == ["unet"]
    assert names("two_stage_unet-tiny.yaml") == ["seg_net", "dist_net"]  # the frozen one runs forward in stage 2
    assert names("brpnet-tiny.yaml") == ["tafe", "refine_small", "refine_large"]
    assert names("maskrcnn_baseline-tiny.yaml") == ["backbone"]  # RPN and RoI heads: data-dependent, eager


def test_bad_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="SOLVER.COMPILE.MODE must be one of default, reduce-overhead"):
        tiny_cfg("nb_unet-tiny.yaml", *COMPILE, "SOLVER.COMPILE.MODE", "fast")
    with pytest.raises(ConfigError, match="SOLVER.COMPILE.DYNAMIC must be one of auto, static, dynamic"):
        tiny_cfg("nb_unet-tiny.yaml", *COMPILE, "SOLVER.COMPILE.DYNAMIC", "maybe")


def _raises_on_call(*args, **kwargs):
    def compiled(*a, **k):
        raise RuntimeError("InductorError: InvalidCxxCompiler: No working C++ compiler found\nmore lines")
    return compiled


def _raises_now(*args, **kwargs):
    raise RuntimeError("torch.compile is not supported here")


@pytest.mark.parametrize("fake_compile", [_raises_now, _raises_on_call], ids=["at-compile", "at-first-call"])
def test_a_failing_compilation_warns_once_and_trains_eager(fake_compile, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch, "compile", fake_compile)
    caplog.set_level(logging.WARNING)
    trainer = _trainer(tmp_path, "nb_unet-tiny.yaml", *COMPILE, "SOLVER.IMS_PER_BATCH", "2")
    trainer.train()
    _finite_losses(trainer)
    warnings = _compile_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "unet" in warnings[0] and "training continues eager" in warnings[0] and "\n" not in warnings[0]
    state = trainer.model._training_compile
    assert not state.active and state.failure


def test_a_real_error_in_the_network_is_raised_not_swallowed(monkeypatch, caplog):
    class Net(torch.nn.Module):
        compile_modules = ("conv",)

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 1, 1)

    monkeypatch.setattr(torch, "compile", _raises_on_call)
    model = Net().train()
    keys = list(model.state_dict())
    state = compile_for_training(model)
    assert state.names == ["conv"] and list(model.state_dict()) == keys
    with pytest.raises(RuntimeError, match="expected input"):
        model.conv(torch.zeros(1, 5, 4, 4))  # wrong channel count: eager raises it too
    assert state.active and not _compile_warnings(caplog)
    state.remove()
    assert "forward" not in vars(model.conv)


@pytest.mark.slow
def test_compiled_unet_step_equals_eager_and_trains(tmp_path, inductor_cache):
    cfg = tiny_cfg("nb_unet-tiny.yaml", *RANDOM_INIT_OPTS, *NO_TEST, *NB)
    from nuclei_d2.data.mapper import NucleiDatasetMapper

    torch.manual_seed(0)
    mapper = NucleiDatasetMapper(cfg, is_train=True)
    batch = [mapper(d) for d in DatasetCatalog.get("nuclei_synth_train")[: cfg.SOLVER.IMS_PER_BATCH]]
    model = build_nuclei_model(cfg).train()

    def step() -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with EventStorage():
            loss = sum(model(batch).values())
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = step()
    state = compile_for_training(model)
    compiled_loss, compiled_grads = step()
    assert state.active and state.names == ["unet"], state.failure
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-4)
    for g, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5)
    assert state.compiled_calls == {"unet": 1}
    # evaluation stays eager: the compiled forward is not called in eval mode
    model.eval()
    with torch.no_grad():
        assert model.unet(torch.zeros(1, 3, 64, 64)).shape[1] == 3
    assert state.compiled_calls == {"unet": 1}

    # a 2-iteration training with the real trainer (same graph: inductor's cache), checkpoint round trip
    trainer = _trainer(tmp_path, "nb_unet-tiny.yaml", *COMPILE, *NB)
    trainer.resume_or_load(resume=False)
    trainer.train()
    _finite_losses(trainer)
    state = trainer.model._training_compile
    assert state.active and state.compiled_calls == {"unet": 2}, state.failure
    _check_checkpoint_round_trip(trainer, tmp_path)


@pytest.mark.slow
def test_compiled_rcnn_backbone_trains_under_bfloat16_autocast(tmp_path, inductor_cache, caplog):
    caplog.set_level(logging.WARNING)
    trainer = _trainer(tmp_path, "maskrcnn_baseline-tiny.yaml", *COMPILE, "SOLVER.AMP.ENABLED", "True")
    trainer.resume_or_load(resume=False)
    seen: set[torch.dtype] = set()
    trainer.model.backbone.register_forward_hook(lambda m, i, o: seen.update(v.dtype for v in o.values()))
    trainer.train()
    _finite_losses(trainer)
    state = trainer.model._training_compile
    assert state.active and state.compiled_calls == {"backbone": 2} and not _compile_warnings(caplog), state.failure
    assert seen == {torch.bfloat16}  # the compiled FPN ran under autocast
    _check_checkpoint_round_trip(trainer, tmp_path)
