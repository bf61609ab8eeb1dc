"""Panoptic semantic-fusion Mask R-CNN (Liu et al., IJCAI 2019): mask generator shapes, paste-and-replace fusion,
gradients through the pasted masks, GCN branch, ablation switches, training and inference on CPU, train_net."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, REPO, tiny_cfg
from detectron2.data import DatasetCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY, MaskRCNNConvUpsampleHead
from detectron2.utils.events import EventStorage
from torch import nn

from nuclei_d2.data.mapper import NucleiDatasetMapper
from nuclei_d2.engine import build_optimizer
from nuclei_d2.modeling.dual_modal_mask_head import DualModalMaskHead
from nuclei_d2.modeling.gcn import GCNBlock, GCNSemanticHead
from nuclei_d2.modeling.panoptic_fusion import (
    PanopticFusionRCNN,
    PanopticFusionROIHeads,
    SemanticFeatureFusion,
    paste_and_replace,
    semantic_cross_entropy,
)

TINY = "panoptic_fusion-tiny.yaml"
# What turns a main-config (ResNet-101) file into the tiny model, for the ablation files.
TINY_OVERRIDES = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.FPN.OUT_CHANNELS", "64",
                  "MODEL.ROI_MASK_HEAD.CONV_DIM", "64", "MODEL.ROI_MASK_HEAD.DUAL_MODAL.FC_CONV_DIM", "32",
                  "MODEL.ROI_BOX_HEAD.FC_DIM", "256", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "500",
                  "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "128", "INPUT.CROP.SIZE", "[128, 128]",
                  "DATASETS.SYNTHETIC.IMAGE_SIZE", "192", "DATASETS.SYNTHETIC.NUM_TRAIN", "6",
                  "DATASETS.SYNTHETIC.NUM_TEST", "2"]


# ---------------------------------------------------------------------------------------------------------------------
# Dual-modal mask generator
# ---------------------------------------------------------------------------------------------------------------------
def test_dual_modal_mask_generator_shapes_follow_the_paper_table():
    """256x14x14 RoI -> 3 convs -> FC path (256, 128, FC 784, 1x28x28, duplicated 2x28x28) + upscaling path (256,
    1024, pixel shuffle 256x28x28, 1x1 2x28x28), summed. K = 2 as in the paper (maskrcnn-benchmark's classes)."""
    torch.manual_seed(0)
    head = DualModalMaskHead(ShapeSpec(channels=256, height=14, width=14), num_classes=2, conv_dim=256,
                             fc_conv_dim=128, num_shared_conv=3, conv_norm="GN")
    assert len(head.shared) == 3
    assert all(c.kernel_size == (3, 3) for c in [*head.shared, head.fc_conv1, head.fc_conv2, head.up_conv3,
                                                  head.up_conv4])
    assert head.up_conv5.kernel_size == (1, 1)
    assert (head.fc.in_features, head.fc.out_features) == (128 * 14 * 14, 784)
    shapes: dict[str, tuple[int, ...]] = {}
    names = ["shared", "fc_conv1", "fc_conv2", "fc", "up_conv3", "up_conv4", "pixel_shuffle", "up_conv5"]
    hooks = [getattr(head, n).register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape)))
             for n in names]
    x = torch.randn(5, 256, 14, 14)
    out = head.layers(x)
    for h in hooks:
        h.remove()
    assert shapes == {
        "shared": (5, 256, 14, 14), "fc_conv1": (5, 256, 14, 14), "fc_conv2": (5, 128, 14, 14), "fc": (5, 784),
        "up_conv3": (5, 256, 14, 14), "up_conv4": (5, 1024, 14, 14), "pixel_shuffle": (5, 256, 28, 28),
        "up_conv5": (5, 2, 28, 28),
    }
    assert out.shape == (5, 2, 28, 28)
    # The output is the pixel-wise sum of the two paths, and the FC prediction is the same in both channels.
    trunk = head.shared(x)
    fc = head.fc_path(trunk)
    assert torch.equal(fc[:, 0], fc[:, 1])
    torch.testing.assert_close(out, fc + head.upscale_path(trunk))
    # No batch norm anywhere in the head.
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in head.modules())


def test_dual_modal_head_from_config_is_registered_and_class_agnostic_for_nuclei():
    cfg = tiny_cfg(TINY)
    assert ROI_MASK_HEAD_REGISTRY.get("DualModalMaskHead") is DualModalMaskHead
    head = DualModalMaskHead(cfg, ShapeSpec(channels=64, height=14, width=14))
    assert head.num_classes == 1  # Detectron2 does not count the background (NUM_CLASSES 1 = nuclei)
    assert head.layers(torch.randn(3, 64, 14, 14)).shape == (3, 1, 28, 28)
    assert head.layers(torch.randn(0, 64, 14, 14)).shape == (0, 1, 28, 28)  # images without positive RoIs
    assert head.up_conv4.out_channels == 4 * 64 and head.fc.in_features == 32 * 14 * 14


# ---------------------------------------------------------------------------------------------------------------------
# Paste-and-replace fusion
# ---------------------------------------------------------------------------------------------------------------------
def const_masks(*values: float, side: int = 4, channels: int = 1) -> torch.Tensor:
    return torch.stack([torch.full((channels, side, side), float(v)) for v in values])


def test_paste_later_instance_overwrites_earlier():
    base = torch.zeros(1, 10, 10)
    boxes = torch.tensor([[1.0, 1.0, 6.0, 6.0], [4.0, 3.0, 9.0, 8.0]])
    out = paste_and_replace(base, const_masks(1.0, 2.0), boxes)
    expected = torch.zeros(1, 10, 10)
    expected[0, 1:6, 1:6] = 1.0
    expected[0, 3:8, 4:9] = 2.0  # the second box is pasted last and wins the overlap
    torch.testing.assert_close(out, expected)
    # Reversed order: now the first box wins the overlap.
    out_rev = paste_and_replace(base, const_masks(2.0, 1.0), boxes.flip(0))
    assert out_rev[0, 4, 4] == 1.0 and out_rev[0, 7, 8] == 2.0 and out_rev[0, 1, 1] == 1.0
    assert torch.equal(base, torch.zeros(1, 10, 10))  # not modified in place


def test_paste_is_a_bilinear_resize_of_the_mask_into_its_box():
    torch.manual_seed(0)
    mask = torch.randn(1, 2, 28, 28)
    base = torch.full((2, 40, 50), -7.0)
    out = paste_and_replace(base, mask, torch.tensor([[10.0, 5.0, 27.0, 36.0]]))
    ref = F.interpolate(mask, size=(31, 17), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out[:, 5:36, 10:27], ref)
    untouched = torch.ones(40, 50, dtype=torch.bool)
    untouched[5:36, 10:27] = False
    assert bool((out[:, untouched] == -7.0).all())


def test_paste_clips_boxes_at_the_image_border():
    torch.manual_seed(1)
    mask = torch.randn(1, 1, 8, 8)
    base = torch.zeros(1, 12, 12)
    # Box sticks out by 4 px left and 2 px below: the mask is resized to the FULL box, then cropped.
    out = paste_and_replace(base, mask, torch.tensor([[-4.0, 6.0, 4.0, 14.0]]))
    full = F.interpolate(mask, size=(8, 8), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out[:, 6:12, 0:4], full[:, 0:6, 4:8])
    assert out[:, :6].abs().sum() == 0 and out[:, :, 4:].abs().sum() == 0
    # The valid region (unpadded image) clips too: padding keeps F_0.
    out2 = paste_and_replace(torch.zeros(1, 16, 16), const_masks(3.0), torch.tensor([[8.0, 8.0, 16.0, 16.0]]),
                             image_size=(12, 10))
    assert out2[0, 8:12, 8:10].eq(3.0).all() and out2.sum() == 3.0 * 4 * 2
    # A box entirely outside the image pastes nothing.
    out3 = paste_and_replace(base, const_masks(5.0), torch.tensor([[20.0, 20.0, 30.0, 30.0]]))
    assert torch.equal(out3, base)


def test_paste_with_no_predictions_returns_the_base_map():
    base = torch.randn(2, 6, 7, requires_grad=True)
    out = paste_and_replace(base, torch.zeros(0, 2, 28, 28), torch.zeros(0, 4))
    assert torch.equal(out, base)
    out.sum().backward()
    assert torch.equal(base.grad, torch.ones(2, 6, 7))
    with pytest.raises(ValueError, match="boxes must be"):
        paste_and_replace(base, torch.zeros(1, 2, 28, 28), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="masks must be"):
        paste_and_replace(base, torch.zeros(1, 1, 28, 28), torch.zeros(1, 4))


def test_paste_gradients_reach_only_visible_mask_pixels():
    masks = const_masks(1.0, 2.0, 3.0).requires_grad_(True)
    base = torch.zeros(1, 10, 10, requires_grad=True)
    # Mask 0 is completely covered by mask 2 (pasted later): it must get no gradient.
    boxes = torch.tensor([[2.0, 2.0, 4.0, 4.0], [6.0, 6.0, 9.0, 9.0], [1.0, 1.0, 5.0, 5.0]])
    out = paste_and_replace(base, masks, boxes)
    out.sum().backward()
    g = masks.grad.sum(dim=(1, 2, 3))
    assert g[0] == 0
    # The bilinear weights of each pasted pixel sum to 1: a mask's total gradient is its visible pixel count.
    torch.testing.assert_close(g[1:], torch.tensor([9.0, 16.0]))
    assert base.grad.sum() == 100 - 9 - 16 and base.grad[0, 2, 2] == 0


def test_paste_is_fast_enough_for_hundreds_of_instances():
    import time

    torch.manual_seed(0)
    n = 600
    xy = torch.rand(n, 2) * 980
    wh = 8 + torch.rand(n, 2) * 30
    boxes = torch.cat([xy, xy + wh], dim=1)
    masks = torch.randn(n, 2, 28, 28, requires_grad=True)
    base = torch.zeros(2, 1000, 1000, requires_grad=True)
    t = time.perf_counter()
    out = paste_and_replace(base, masks, boxes)
    out.sum().backward()
    assert time.perf_counter() - t < 5.0  # ~0.3 s here; a per-instance full-map loop would take far longer
    assert masks.grad.abs().sum() > 0


def test_feature_fusion_map_is_f0_with_masks_pasted():
    torch.manual_seed(0)
    fusion = SemanticFeatureFusion(in_channels=8, in_stride=4)
    feat = torch.randn(2, 8, 5, 6)
    f0 = fusion.initial_map(feat)
    assert f0.shape == (2, 2, 20, 24)
    # Upsample-then-1x1-conv (the paper's order) equals 1x1-conv-then-upsample.
    up = F.interpolate(feat, size=(20, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(f0, fusion.conv(up), atol=1e-5, rtol=1e-5)
    logits = [torch.full((1, 28, 28), 4.0), torch.zeros(0, 28, 28)]
    boxes = [torch.tensor([[2.0, 3.0, 10.0, 9.0]]), torch.zeros(0, 4)]
    fused = fusion(feat, logits, boxes, [(20, 24), (20, 24)])
    assert torch.equal(fused[1], f0[1])  # no instances: F_N = F_0
    assert fused[0, 0, 3:9, 2:10].eq(0).all() and fused[0, 1, 3:9, 2:10].eq(4.0).all()  # (0, l): softmax = sigmoid
    torch.testing.assert_close(fused[0, :, :3], f0[0, :, :3])


def test_semantic_cross_entropy_ignores_padding():
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1] = torch.tensor([[2.0, -2.0], [0.0, 50.0]])
    target = torch.tensor([[[1, 0], [1, 255]]])
    expected = (F.softplus(torch.tensor(-2.0)) * 2 + F.softplus(torch.tensor(0.0))) / 3
    torch.testing.assert_close(semantic_cross_entropy(logits, target), expected)
    assert semantic_cross_entropy(logits, torch.full((1, 2, 2), 255)) == 0


# ---------------------------------------------------------------------------------------------------------------------
# GCN semantic branch
# ---------------------------------------------------------------------------------------------------------------------
def test_gcn_block_is_a_large_kernel_from_separable_convs():
    blk = GCNBlock(16, 2, kernel_size=5)
    kernels = sorted(tuple(m.kernel_size) for m in blk.modules() if isinstance(m, nn.Conv2d))
    assert kernels == [(1, 5), (1, 5), (5, 1), (5, 1)]
    # Receptive field 5x5: an impulse spreads over exactly a 5x5 square (here with positive weights).
    for m in blk.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.constant_(m.weight, 1.0)
            nn.init.zeros_(m.bias)
    x = torch.zeros(1, 16, 11, 11)
    x[0, 0, 5, 5] = 1.0
    support = blk(x)[0, 0] != 0
    assert support.sum() == 25 and support[3:8, 3:8].all()
    with pytest.raises(ValueError, match="odd"):
        GCNBlock(4, 2, kernel_size=4)


def test_gcn_semantic_head_outputs_input_size_logits():
    shapes = {f"p{i}": ShapeSpec(channels=16, stride=2 ** i) for i in range(2, 7)}
    head = GCNSemanticHead(shapes, in_features=["p5", "p2", "p4", "p3"], channels=2, kernel_size=5)
    assert head.in_features == ["p2", "p3", "p4", "p5"]
    feats = {f"p{i}": torch.randn(2, 16, 64 // 2 ** i, 96 // 2 ** i) for i in range(2, 7)}
    assert head(feats).shape == (2, 2, 64, 96)
    assert head(feats, output_size=(64, 96)).shape == (2, 2, 64, 96)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in head.modules())
    with pytest.raises(ValueError, match="not among the backbone"):
        GCNSemanticHead(shapes, in_features=["p2", "res9"])


# ---------------------------------------------------------------------------------------------------------------------
# The meta-architecture
# ---------------------------------------------------------------------------------------------------------------------
def train_batch(cfg, n: int = 2, start: int = 0) -> list[dict]:
    mapper = NucleiDatasetMapper(cfg, is_train=True)
    records = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    batch = [mapper(records[(start + i) % len(records)]) for i in range(n)]
    # the targets the model trains on (the foreground map of its semantic losses; none for the rows without them)
    wanted = set(PanopticFusionRCNN.required_targets_of(cfg))
    assert wanted <= {"foreground"} and all(b is not None and wanted <= set(b.get("targets", {})) for b in batch)
    return batch


def test_gradients_reach_the_mask_head_through_the_fused_semantic_loss():
    torch.manual_seed(0)
    cfg = tiny_cfg(TINY, "MODEL.PANOPTIC_FUSION.SEMANTIC_BRANCH", "False")
    model = build_model(cfg)
    model.train()
    with EventStorage(0):
        losses = model(train_batch(cfg))
    assert "loss_semseg2" in losses and "loss_semseg1" not in losses
    losses["loss_semseg2"].backward()  # L_semseg2 alone
    head = model.roi_heads.mask_head
    for name in ("up_conv5", "fc", "shared"):
        grads = [p.grad for p in getattr(head, name).parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name
    assert model.feature_fusion.conv.weight.grad.abs().sum() > 0  # F_0 is trained too
    assert all(p.grad is None for p in model.roi_heads.box_predictor.parameters())  # the box branch is not


def test_training_step_and_inference_on_cpu():
    torch.manual_seed(0)
    cfg = tiny_cfg(TINY)
    model = build_model(cfg)
    assert isinstance(model, PanopticFusionRCNN) and isinstance(model.roi_heads, PanopticFusionROIHeads)
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.9
    model.train()
    with EventStorage(0):
        losses = model(train_batch(cfg))
        assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc",
                               "loss_semseg1", "loss_semseg2"}
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad  # every part (incl. GCN branch and F_0 conv) is trained
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    model.eval()
    d = NucleiDatasetMapper(cfg, is_train=False)(DatasetCatalog.get(cfg.DATASETS.TEST[0])[0])
    calls = []
    model.semantic_branch.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = model([d])[0]["instances"]
    assert not calls  # the semantic branch is training-only
    assert out.image_size == (d["height"], d["width"])
    assert out.pred_masks.dtype == torch.bool and out.pred_masks.shape[1:] == (d["height"], d["width"])
    assert out.has("scores") and out.has("pred_classes") and out.has("pred_boxes")


def test_missing_foreground_target_gives_a_clear_error():
    cfg = tiny_cfg(TINY).clone()
    cfg.defrost()
    cfg.INPUT.TARGETS = []  # setup adds the model's targets: take them away by hand
    model = build_model(cfg)
    model.train()
    batch = train_batch(tiny_cfg(TINY))
    for b in batch:
        del b["targets"]
    with EventStorage(0), pytest.raises(ValueError, match="add it to INPUT.TARGETS"):
        model(batch)


def test_feature_fusion_requires_the_fusion_roi_heads():
    with pytest.raises(ValueError, match="PanopticFusionROIHeads"):
        build_model(tiny_cfg(TINY, "MODEL.ROI_HEADS.NAME", "StandardROIHeads"))


ABLATION = {  # row of the paper's Table 3 -> (semantic branch, feature fusion, mask head)
    "baseline": (False, False, MaskRCNNConvUpsampleHead),
    "ab1": (False, True, MaskRCNNConvUpsampleHead),
    "ab2": (True, True, MaskRCNNConvUpsampleHead),
    "ab3": (True, False, MaskRCNNConvUpsampleHead),
    "proposed": (True, True, DualModalMaskHead),
}


@pytest.mark.parametrize("row", list(ABLATION))
def test_ablation_configs_build_the_right_modules(row):
    name = "panoptic_fusion.yaml" if row == "proposed" else f"panoptic_fusion-ablation-{row}.yaml"
    assert tiny_cfg(name).MODEL.RESNETS.DEPTH == 101  # the ablation files keep the paper's backbone
    cfg = tiny_cfg(name, *TINY_OVERRIDES)
    semantic, fusion, head_cls = ABLATION[row]
    torch.manual_seed(0)
    model = build_model(cfg)
    assert (model.semantic_branch is not None) == semantic
    assert (model.feature_fusion is not None) == fusion
    assert type(model.roi_heads.mask_head) is head_cls
    if semantic:
        assert isinstance(model.semantic_branch, GCNSemanticHead)
    model.train()
    with EventStorage(0):
        losses = model(train_batch(cfg))
    assert ("loss_semseg1" in losses) == semantic and ("loss_semseg2" in losses) == fusion
    assert all(torch.isfinite(v) for v in losses.values())


def test_main_config_is_the_papers_setup():
    cfg = tiny_cfg("panoptic_fusion.yaml")
    assert cfg.MODEL.META_ARCHITECTURE == "PanopticFusionRCNN"
    assert cfg.MODEL.RESNETS.DEPTH == 101 and cfg.MODEL.RPN.IN_FEATURES == ["p2", "p3", "p4", "p5", "p6"]
    assert cfg.MODEL.ROI_MASK_HEAD.NAME == "DualModalMaskHead" and cfg.MODEL.ROI_MASK_HEAD.NORM == "GN"
    assert (cfg.SOLVER.OPTIMIZER, cfg.SOLVER.MOMENTUM, cfg.SOLVER.WEIGHT_DECAY) == ("SGD", 0.9, 1e-4)
    assert (cfg.SOLVER.WARMUP_METHOD, cfg.SOLVER.WARMUP_ITERS) == ("linear", 500)
    assert cfg.MODEL.PANOPTIC_FUSION.SEM_SEG1_WEIGHT == cfg.MODEL.PANOPTIC_FUSION.SEM_SEG2_WEIGHT == 1.0
    assert cfg.MODEL.PANOPTIC_FUSION.GCN.KERNEL_SIZE == 5 and "foreground" in cfg.INPUT.TARGETS


@pytest.mark.slow
def test_train_net_end_to_end_with_the_tiny_config(python, tmp_path):
    out = tmp_path / "train"
    cmd = [python, str(REPO / "tools" / "train_net.py"), "--config-file", str(CONFIGS / TINY), "MODEL.DEVICE", "cpu",
           "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "100",
           "TEST.EVALUATORS", "['coco']"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "model_final.pth").is_file()
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    train = [r for r in records if "total_loss" in r]
    assert max(r["iteration"] for r in train) == 3
    assert all("loss_semseg1" in r and "loss_semseg2" in r for r in train)
    final = json.loads((out / "metrics_final.json").read_text())
    assert "AP" in final["segm"]
