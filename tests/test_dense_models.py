"""NB and two-stage meta-architectures on CPU: training steps, losses by hand, freezing, tiled inference, train_net."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, REPO, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import nuclei_d2.modeling.dense_base as dense_base
from nuclei_d2.data.mapper import NucleiDatasetMapper
from nuclei_d2.engine import build_optimizer
from nuclei_d2.layers import edge_weight_map
from nuclei_d2.modeling import NucleusBoundaryUNet, TwoStageUNet

NB_TINY = "nb_unet-tiny.yaml"
TS_TINY = "two_stage_unet-tiny.yaml"


def train_batch(cfg, n=4):
    mapper = NucleiDatasetMapper(cfg, is_train=True)
    return [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:n]]


def inference_inputs(cfg):
    mapper = NucleiDatasetMapper(cfg, is_train=False)
    return [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TEST[0])]


def step(model, optimizer, batch):
    model.train()
    with EventStorage(0):
        losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    return losses


def check_outputs(outputs, inputs, n_probs):
    for out, inp in zip(outputs, inputs):
        inst = out["instances"]
        assert inst.image_size == (inp["height"], inp["width"])
        assert inst.pred_masks.dtype == torch.bool and inst.pred_masks.shape[1:] == (inp["height"], inp["width"])
        assert {"pred_masks", "pred_boxes", "scores", "pred_classes"} <= set(inst.get_fields())
        assert out["probs"].shape == (n_probs, inp["height"], inp["width"])
        # Masks do not overlap: they are the nuclei of the returned label map, instance i = label i + 1.
        label = out["label_map"]
        assert label.shape == (inp["height"], inp["width"]) and int(label.max()) == len(inst)
        for i in range(len(inst)):
            assert torch.equal(inst.pred_masks[i], label == i + 1)


def test_ternary_target_of_two_touching_squares_by_hand():
    """Two 5x5 nuclei sharing a side, boundary width 2: every pixel is within 2 px of the outside of its own nucleus
    (the other nucleus counts as outside) except each centre, so each nucleus is boundary around one inside pixel."""
    from nuclei_d2.data.targets import ternary_map

    lab = np.zeros((7, 12), dtype=np.int32)
    lab[1:6, 1:6], lab[1:6, 6:11] = 1, 2
    expected = np.where(lab > 0, 1, 0)
    expected[3, 3] = expected[3, 8] = 2
    assert ternary_map(lab, boundary_width=2).tolist() == expected.tolist()


@pytest.mark.parametrize("config", [NB_TINY, TS_TINY])
def test_mapper_emits_the_targets_the_configs_ask_for(config):
    """The configs' INPUT.TARGETS / BOUNDARY_WIDTH / ERODE_RADIUS reach the mapper: its targets are the target
    functions of its (augmented, cropped) label map."""
    from nuclei_d2.data.targets import distance_map, eroded_foreground, ternary_map

    # (the two-stage U-Net with TRAIN_STAGE 0: both U-Nets train, so both targets follow from the model)
    cfg = tiny_cfg(config, *(("MODEL.TWO_STAGE.TRAIN_STAGE", "0") if config == TS_TINY else ()))
    for d in train_batch(cfg, 2):
        label = d["label_map"].numpy()
        t = d["targets"]
        assert label.shape == tuple(d["image"].shape[-2:]) == (64, 64)
        if config == NB_TINY:
            assert set(t) == {"ternary", "edge_weight"}
            assert np.array_equal(t["ternary"].numpy(), ternary_map(label, cfg.INPUT.BOUNDARY_WIDTH))
            np.testing.assert_allclose(t["edge_weight"].numpy(), edge_weight_map((64, 64)))
        else:
            assert set(t) == {"eroded", "distance"}
            assert np.array_equal(t["eroded"].numpy(), eroded_foreground(label, cfg.INPUT.ERODE_RADIUS))
            np.testing.assert_allclose(t["distance"].numpy(), distance_map(label), rtol=1e-6)


def test_nb_training_step_and_inference():
    torch.manual_seed(0)
    cfg = tiny_cfg(NB_TINY)
    model = build_model(cfg)
    assert isinstance(model, NucleusBoundaryUNet) and model.unet.out_channels == 3
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.Adam)
    batch = train_batch(cfg)
    before = [p.detach().clone() for p in model.parameters()]
    losses = step(model, optimizer, batch)
    assert set(losses) == {"loss_ternary"} and torch.isfinite(losses["loss_ternary"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.eval()
    inputs = inference_inputs(cfg)
    with torch.no_grad():
        outputs = model(inputs)
    check_outputs(outputs, inputs, 3)
    torch.testing.assert_close(outputs[0]["probs"].sum(0), torch.ones(inputs[0]["height"], inputs[0]["width"]))


def test_nb_loss_is_the_edge_weighted_cross_entropy():
    torch.manual_seed(0)
    cfg = tiny_cfg(NB_TINY, "MODEL.UNET.DROPOUT", "0.0", "MODEL.NB.CLASS_WEIGHTS", "[1.0, 2.0, 0.5]")
    model = build_model(cfg)
    batch = train_batch(cfg, 2)
    model.train()
    loss = model(batch)["loss_ternary"]
    x = torch.stack([model.normalize(b["image"]) for b in batch])
    t = torch.stack([b["targets"]["ternary"] for b in batch]).long()
    w = torch.from_numpy(np.array(edge_weight_map(t.shape[-2:])))[None].expand_as(t)
    cw = torch.tensor([1.0, 2.0, 0.5])
    logp = F.log_softmax(model.unet(x), dim=1)
    ce = -logp.gather(1, t[:, None])[:, 0] * cw[t]
    expected = (ce * w).sum() / w.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # Without edge weighting, border pixels count as much as central ones.
    model.loss_weighting = "none"
    torch.testing.assert_close(model(batch)["loss_ternary"], ce.mean(), rtol=1e-5, atol=1e-6)


def test_padding_of_mixed_size_batches_is_masked_out():
    torch.manual_seed(0)
    cfg = tiny_cfg(NB_TINY, "MODEL.UNET.DROPOUT", "0.0")
    model = build_model(cfg)
    batch = train_batch(cfg, 2)
    small = dict(batch[1])
    small["image"] = batch[1]["image"][:, :40, :48]
    small["targets"] = {"ternary": batch[1]["targets"]["ternary"][:40, :48]}  # no edge_weight: made from the shape
    x, targets, valid = model.prepare_training_batch([batch[0], small])
    assert x.shape[-2:] == (64, 64) and valid[1].sum() == 40 * 48 and valid[0].all()
    assert (targets["ternary"][1, 40:] == 0).all()
    # The crop's own edge weight map (it depends on the shape only), not the padded batch's; 0 on padding.
    expected = torch.from_numpy(np.array(edge_weight_map((40, 48))))
    torch.testing.assert_close(targets["edge_weight"][1, :40, :48], expected)
    torch.testing.assert_close(targets["edge_weight"][0], batch[0]["targets"]["edge_weight"])
    assert (targets["edge_weight"][1, 40:] == 0).all()


def test_missing_target_is_a_clear_error():
    cfg = tiny_cfg(NB_TINY).clone()
    cfg.defrost()
    cfg.INPUT.TARGETS = ["foreground"]  # setup adds the model's targets: take them away by hand
    model = build_model(cfg)
    model.train()
    with pytest.raises(ValueError, match=r"needs the dense target\(s\) \['ternary'\].*INPUT.TARGETS"):
        model(train_batch(cfg, 1))


def test_wrong_number_of_input_channels_is_a_clear_error():
    cfg = tiny_cfg(NB_TINY, "INPUT.EXTRA_CHANNELS", "['hematoxylin']")
    with pytest.raises(ValueError, match="PIXEL_MEAN / PIXEL_STD have 3 / 3 entries but the input has 4"):
        build_model(cfg)


def test_large_images_go_through_tiles_and_results_come_back_at_the_original_size(monkeypatch):
    torch.manual_seed(0)
    cfg = tiny_cfg(NB_TINY)
    model = build_model(cfg).eval()
    calls = []
    real = dense_base.tile_predict

    def spy(fn, image, patch, stride, weight, batch_size, progress=False):
        calls.append((tuple(image.shape), patch, stride, weight, batch_size))
        return real(fn, image, patch, stride, weight, batch_size, progress=progress)

    monkeypatch.setattr(dense_base, "tile_predict", spy)
    image = torch.rand(3, 150, 100) * 255
    with torch.no_grad():
        out = model([{"image": image, "height": 150, "width": 100}])[0]
        assert calls == [((3, 150, 100), 64, 32, "edge", 8)]
        assert out["probs"].shape == (3, 150, 100)
        # An image no larger than the patch runs whole.
        model([{"image": image[:, :64, :64], "height": 64, "width": 64}])
        assert len(calls) == 1
        # The mapper resized the image (INPUT.MIN_SIZE_TEST): probabilities and masks go back to height x width.
        out = model([{"image": image[:, :75, :50], "height": 150, "width": 100}])[0]
    assert out["probs"].shape == (3, 150, 100) and out["instances"].image_size == (150, 100)
    # With tiling off the whole image runs at once (and gives a map of the same size).
    model.tiling = type(model.tiling)(enabled=False)
    with torch.no_grad():
        assert model.predict_probs(image).shape == (3, 150, 100)
    assert len(calls) == 2


def test_two_stage_stage1_trains_the_segmentation_unet_only():
    torch.manual_seed(0)
    cfg = tiny_cfg(TS_TINY)
    model = build_model(cfg)
    assert isinstance(model, TwoStageUNet) and model.train_stage == 1
    assert not any(p.requires_grad for p in model.dist_net.parameters())
    optimizer = build_optimizer(cfg, model)
    n_opt = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.seg_net.parameters())
    seg0 = [p.detach().clone() for p in model.seg_net.parameters()]
    dist0 = [p.detach().clone() for p in model.dist_net.parameters()]
    losses = step(model, optimizer, train_batch(cfg))
    assert set(losses) == {"loss_bce", "loss_dice"} and all(torch.isfinite(v) for v in losses.values())
    assert any(not torch.equal(a, b) for a, b in zip(seg0, model.seg_net.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(dist0, model.dist_net.parameters()))
    model.eval()
    inputs = inference_inputs(cfg)
    with torch.no_grad():
        check_outputs(model(inputs), inputs, 1)  # "components" inference: the foreground only


def test_two_stage_losses_by_hand():
    torch.manual_seed(0)
    cfg = tiny_cfg(TS_TINY, "MODEL.UNET.DROPOUT", "0.0", "MODEL.TWO_STAGE.TRAIN_STAGE", "0")
    model = build_model(cfg)
    batch = train_batch(cfg, 2)
    model.train()
    losses = model(batch)
    x = torch.stack([model.normalize(b["image"]) for b in batch])
    t = torch.stack([b["targets"]["eroded"] for b in batch]).float()
    d = torch.stack([b["targets"]["distance"] for b in batch])
    logits = model.seg_net(x)[:, 0]
    p = torch.sigmoid(logits)
    torch.testing.assert_close(losses["loss_bce"], 0.5 * F.binary_cross_entropy_with_logits(logits, t))
    torch.testing.assert_close(losses["loss_dice"], 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))
    torch.testing.assert_close(losses["loss_distance"], F.mse_loss(model.dist_net(x)[:, 0], d))


def test_two_stage_stage2_loads_stage1_and_keeps_it_frozen(tmp_path):
    torch.manual_seed(0)
    cfg1 = tiny_cfg(TS_TINY)
    stage1 = build_model(cfg1)
    step(stage1, build_optimizer(cfg1, stage1), train_batch(cfg1))
    DetectionCheckpointer(stage1, save_dir=str(tmp_path)).save("stage1")
    cfg2 = tiny_cfg("two_stage_unet_stage2-tiny.yaml", "MODEL.TWO_STAGE.STAGE1.WEIGHTS", str(tmp_path / "stage1.pth"))
    stage2 = build_model(cfg2)  # the stage-1 U-Net is loaded through the sub-model spec
    seg1 = stage1.seg_net.state_dict()
    assert all(torch.equal(v, stage2.seg_net.state_dict()[k]) for k, v in seg1.items())
    assert not any(p.requires_grad for p in stage2.seg_net.parameters())
    dist0 = [p.detach().clone() for p in stage2.dist_net.parameters()]
    losses = step(stage2, build_optimizer(cfg2, stage2), train_batch(cfg2))
    assert set(losses) == {"loss_distance"}
    assert all(torch.equal(v, stage2.seg_net.state_dict()[k]) for k, v in seg1.items())
    assert any(not torch.equal(a, b) for a, b in zip(dist0, stage2.dist_net.parameters()))
    assert not stage2.seg_net.training and stage2.dist_net.training  # the frozen net stays in eval mode
    stage2.eval()
    inputs = inference_inputs(cfg2)
    with torch.no_grad():
        check_outputs(stage2(inputs), inputs, 2)  # foreground + distance, watershed inference


# ---- tools/train_net.py end to end ------------------------------------------------------------------------------


def run_train_net(python, *args):
    cmd = [python, str(REPO / "tools" / "train_net.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    return proc


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_train_net_nb_tiny(python, tmp_path):
    out = tmp_path / "nb"
    ok(run_train_net(python, "--config-file", str(CONFIGS / NB_TINY), "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out),
                     "SOLVER.MAX_ITER", "4"))
    assert (out / "model_final.pth").is_file()
    final = json.loads((out / "metrics_final.json").read_text())
    assert {"AJI", "F1", "Dice1", "MDR", "FDR", "USR", "OSR"} <= set(final["nuclei"])
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    assert any("total_loss" in r for r in records)


@pytest.mark.slow
def test_train_net_two_stage_tiny_stage1_then_stage2(python, tmp_path):
    s1, s2 = tmp_path / "stage1", tmp_path / "stage2"
    ok(run_train_net(python, "--config-file", str(CONFIGS / TS_TINY), "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(s1),
                     "SOLVER.MAX_ITER", "4"))
    ok(run_train_net(python, "--config-file", str(CONFIGS / "two_stage_unet_stage2-tiny.yaml"), "MODEL.DEVICE", "cpu",
                     "OUTPUT_DIR", str(s2), "MODEL.TWO_STAGE.STAGE1.WEIGHTS", str(s1 / "model_final.pth"),
                     "SOLVER.MAX_ITER", "4"))
    w1 = torch.load(s1 / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    w2 = torch.load(s2 / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    seg = [k for k in w1 if k.startswith("seg_net.")]
    dist = [k for k in w1 if k.startswith("dist_net.") and k.endswith("weight")]
    assert seg and dist
    assert all(torch.equal(w1[k], w2[k]) for k in seg)  # stage 2 started from stage 1 and kept it frozen
    assert any(not torch.equal(w1[k], w2[k]) for k in dist)  # and trained the distance U-Net
    assert "AJI" in json.loads((s2 / "metrics_final.json").read_text())["nuclei"]


@pytest.mark.slow
def test_stage2_without_stage1_weights_is_a_clear_error(python, tmp_path):
    proc = run_train_net(python, "--config-file", str(CONFIGS / "two_stage_unet_stage2-tiny.yaml"), "MODEL.DEVICE",
                         "cpu", "OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", str(tmp_path / "missing.pth"))
    assert proc.returncode == 2
    assert "weights file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_dense_output_is_crops_whatever_the_number_of_nuclei():
    """No MAX_MASK_GB guard any more (issue 23): the output holds crops; pred_masks are built only when read."""
    cfg = tiny_cfg(NB_TINY)
    model = build_model(cfg).eval()
    assert not hasattr(model, "max_mask_gb") and "MAX_MASK_GB" not in cfg.MODEL.DENSE
    probs = torch.zeros(3, 40, 40)
    probs[2, 5:10, 5:10] = probs[2, 20:30, 20:30] = 1.0
    instances, label = model.postprocess_probs(probs)
    assert len(instances) == 2 and label.max() == 2
    assert "pred_masks" not in instances._fields and len(instances.pred_nuclei) == 2
    assert torch.equal(instances.pred_masks[1], torch.from_numpy(label == 2))
