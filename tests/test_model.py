"""The tiny baseline builds, takes a training step and predicts Instances with masks (CPU)."""

from __future__ import annotations

import torch
from conftest import tiny_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from nuclei_d2.data.mapper import NucleiDatasetMapper
from nuclei_d2.engine import build_optimizer


def test_train_step_and_inference():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg)
    assert model.device.type == "cpu"
    mapper = NucleiDatasetMapper(cfg, is_train=True)
    batch = [mapper(d) for d in DatasetCatalog.get("nuclei_synth_train")[:2]]
    assert all(b is not None and len(b["instances"]) > 0 for b in batch)
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    model.train()
    with EventStorage(0):
        losses = model(batch)
        assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    model.eval()
    test_mapper = NucleiDatasetMapper(cfg, is_train=False)
    d = test_mapper(DatasetCatalog.get("nuclei_synth_test")[0])
    with torch.no_grad():
        out = model([d])[0]["instances"]
    assert out.image_size == (d["height"], d["width"])
    assert out.has("pred_masks") and out.has("scores") and out.has("pred_classes")
    assert out.pred_masks.shape[1:] == (d["height"], d["width"])
