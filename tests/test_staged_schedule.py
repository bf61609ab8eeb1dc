"""The staged training schedule (nuclei_d2/engine/staged_schedule.py): parsing, stage boundaries, which parameters
get gradients and move, learning rates, and resuming mid-stage, with Detectron2's SimpleTrainer and LR scheduler."""

from __future__ import annotations

import copy

import pytest
import torch
from detectron2.engine import HookBase, SimpleTrainer
from detectron2.engine.hooks import LRScheduler
from detectron2.solver import LRMultiplier
from fvcore.common.param_scheduler import MultiStepParamScheduler
from torch import nn

from nuclei_d2.engine.staged_schedule import (
    StagedScheduleHook,
    apply_stage,
    build_staged_schedule_hook,
    parse_stages,
    stage_index,
)

TRAINABLE = [["input", "heads"], ["all"], ["res4", "res5", "heads"], ["heads"]]
MULTS = [2.0, 1.0, 0.5, 0.1]
BASE_LR = 0.01


class ToyRCNN(nn.Module):
    """Parameter names like Detectron2's GeneralizedRCNN + Mask R-CNN+'s input projection; a quadratic loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.input_proj = nn.Linear(5, 3)
        self.backbone = nn.Module()
        self.backbone.bottom_up = nn.Module()
        for name in ("stem", "res2", "res3", "res4", "res5"):
            setattr(self.backbone.bottom_up, name, nn.Linear(3, 3))
        self.backbone.fpn_lateral2 = nn.Linear(3, 3)
        self.proposal_generator = nn.Linear(3, 1)
        self.roi_heads = nn.Linear(3, 1)

    def forward(self, x):
        h = self.input_proj(x)
        for name in ("stem", "res2", "res3", "res4", "res5"):
            h = torch.tanh(getattr(self.backbone.bottom_up, name)(h))
        h = self.backbone.fpn_lateral2(h)
        return {"loss_rpn": (self.proposal_generator(h) - 1).pow(2).mean(),
                "loss_roi": (self.roi_heads(h) + 1).pow(2).mean()}


def data(skip: int = 0):
    """The same batch sequence for every run; ``skip`` drops the batches a resumed run has already used."""
    g = torch.Generator().manual_seed(1)
    i = 0
    while True:
        batch = torch.randn(8, 5, generator=g)
        if i >= skip:
            yield batch
        i += 1


class Recorder(HookBase):
    """Per iteration: lr used, parameters that got a gradient, parameters whose values changed."""

    def __init__(self):
        self.rows = []

    def before_step(self):
        self._before = {n: p.detach().clone() for n, p in self.trainer.model.named_parameters()}

    def after_step(self):
        model = self.trainer.model
        self.rows.append({
            "iter": self.trainer.iter,
            "lr": self.trainer.optimizer.param_groups[0]["lr"],
            "grad": {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.grad is not None},
            "moved": {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if not torch.equal(p, self._before[n])},
        })


def make_trainer(stages, model=None, steps=(3,), skip=0):
    model = model or ToyRCNN()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=BASE_LR)
    sched = LRMultiplier(opt, MultiStepParamScheduler([1.0, 0.5], milestones=list(steps), num_updates=100), 100)
    trainer = SimpleTrainer(model, data(skip), opt)
    rec = Recorder()
    trainer.register_hooks([StagedScheduleHook(stages), rec, LRScheduler(opt, sched)])
    return trainer, rec, sched


ALL = {"input_proj", "backbone.bottom_up.stem", "backbone.bottom_up.res2", "backbone.bottom_up.res3",
       "backbone.bottom_up.res4", "backbone.bottom_up.res5", "backbone.fpn_lateral2", "proposal_generator",
       "roi_heads"}
HEADS = {"backbone.fpn_lateral2", "proposal_generator", "roi_heads"}
EXPECTED = {1: {"input_proj"} | HEADS, 2: ALL, 3: {"backbone.bottom_up.res4", "backbone.bottom_up.res5"} | HEADS,
            4: HEADS}


def test_parse_and_index():
    stages = parse_stages([2, 3, 1, 2], TRAINABLE, MULTS)
    assert [(s.start, s.end) for s in stages] == [(0, 2), (2, 5), (5, 6), (6, None)]
    assert [stage_index(stages, i) for i in range(10)] == [0, 0, 1, 1, 1, 2, 3, 3, 3, 3]


@pytest.mark.parametrize("iters, trainable, mults, message", [
    ([2, 2], TRAINABLE, MULTS, "STAGE_ITERS has 2 stages but TRAINABLE has 4"),
    ([2, 0, 1, 1], TRAINABLE, MULTS, r"STAGE_ITERS\[1\] must be > 0"),
    ([1, 1], [["heads"], ["res[4"]], [1, 1], "neither a group alias"),
    ([1, 1], [["heads"], []], [1, 1], r"TRAINABLE\[1\] is empty"),
    ([1, 1], [["heads"], ["all"]], [1, 0], r"LR_MULTIPLIERS\[1\] must be > 0"),
])
def test_parse_errors(iters, trainable, mults, message):
    with pytest.raises(ValueError, match=message):
        parse_stages(iters, trainable, mults)


def test_stages_switch_at_the_right_iterations_with_gradients_and_lr():
    trainer, rec, _ = make_trainer(parse_stages([2, 3, 1, 2], TRAINABLE, MULTS))
    trainer.train(0, 8)
    stage_of = [1, 1, 2, 2, 2, 3, 4, 4]
    for row, s in zip(rec.rows, stage_of):
        assert row["grad"] == EXPECTED[s], f"iteration {row['iter']}"
        assert row["moved"] == EXPECTED[s], f"iteration {row['iter']}"
        factor = 1.0 if row["iter"] < 3 else 0.5  # the LR scheduler's own step at iteration 3
        assert row["lr"] == pytest.approx(BASE_LR * MULTS[s - 1] * factor), f"iteration {row['iter']}"
    assert trainer.storage.history("staged/stage").values()[-1][0] == 4.0


def test_resume_mid_stage_restores_stage_and_lr():
    stages = parse_stages([2, 3, 1, 2], TRAINABLE, MULTS)
    full, full_rec, _ = make_trainer(stages)
    full.train(0, 8)

    first, _, sched = make_trainer(stages)
    first.train(0, 4)  # stopped after iteration 3, in the middle of stage 2
    state = {"model": copy.deepcopy(first.model.state_dict()), "optim": copy.deepcopy(first.optimizer.state_dict()),
             "sched": copy.deepcopy(sched.state_dict())}

    model = ToyRCNN()
    model.load_state_dict(state["model"])
    resumed, rec, sched2 = make_trainer(stages, model=model, skip=4)
    resumed.optimizer.load_state_dict(state["optim"])
    sched2.load_state_dict(state["sched"])
    for p in model.parameters():  # as a fresh process would have them: everything trainable until a stage applies
        p.requires_grad_(True)
    resumed.train(4, 8)
    assert [r["iter"] for r in rec.rows] == [4, 5, 6, 7]
    for row, ref in zip(rec.rows, full_rec.rows[4:]):
        assert row["grad"] == ref["grad"] and row["moved"] == ref["moved"]
        assert row["lr"] == pytest.approx(ref["lr"])
    for (n, p), q in zip(resumed.model.named_parameters(), full.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_parameters_frozen_at_build_are_never_unfrozen():
    model = ToyRCNN()
    model.backbone.bottom_up.stem.requires_grad_(False)  # like MODEL.BACKBONE.FREEZE_AT
    trainer, rec, _ = make_trainer(parse_stages([1, 1], [["heads"], ["all"]], [1, 1]), model=model)
    trainer.train(0, 2)
    assert rec.rows[1]["grad"] == ALL - {"backbone.bottom_up.stem"}


def test_stage_matching_nothing_is_an_error():
    trainer, _, _ = make_trainer(parse_stages([1, 1], [["heads"], ["^no_such_module"]], [1, 1]))
    with pytest.raises(ValueError, match="stage 2 .* matches no trainable parameter"):
        trainer.train(0, 2)


def test_apply_stage_reports_unmatched_patterns():
    model = ToyRCNN()
    summary = apply_stage(model, parse_stages([1], [["heads", "res9"]], [1])[0])
    assert summary["unmatched"] == ["res9"]
    assert {n.rsplit(".", 1)[0] for n in summary["trainable"]} == HEADS


def test_hook_from_config():
    from conftest import tiny_cfg

    cfg = tiny_cfg("maskrcnn_plus-tiny.yaml")
    hook = build_staged_schedule_hook(cfg)
    assert [(s.start, s.end, s.lr_multiplier) for s in hook.stages] == [(0, 5, 2.0), (5, 10, 1.0), (10, 15, 0.5),
                                                                       (15, None, 0.1)]
    assert build_staged_schedule_hook(tiny_cfg("maskrcnn_baseline-tiny.yaml")) is None
