"""BRP-Net (Chen et al., MICCAI 2020): DenseNet strides, TAFE modules, proposals, patch geometry, IoU-tau labels,
the warm-restart schedule, both training stages and train_net end to end with the -tiny configs."""

from __future__ import annotations

import math
import os
import subprocess

import numpy as np
import pytest
import torch
from conftest import CONFIGS, REPO, tiny_cfg

from nuclei_d2.modeling.brpnet import (
    TAFE,
    DenseNetEncoder,
    FeatureFusionModule,
    RefineNet,
    TaskSpecificEncoder,
    assemble_refined,
    assign_proposal_labels,
    build_patches,
    crop_resize,
    extract_proposals,
    paste_back,
    proposal_boxes,
    smooth_truncated_loss,
)
from nuclei_d2.solver import CosineWarmRestartsParamScheduler, build_brpnet_lr_scheduler


@pytest.fixture(autouse=True)
def _one_thread():
    """The CPU is shared: one intra-op thread is far faster than two oversubscribed ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _disk_label(shape, centres, radius):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    label = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        label[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = i
    return label


# ---- DenseNet ------------------------------------------------------------------------------------------------------
def test_densenet121_channels_and_strides():
    enc = DenseNetEncoder()  # the paper's: DenseNet-121, stride-1 stem, no max-pool
    assert enc.out_channels == [256, 512, 1024, 1024]
    assert enc.strides == [1, 2, 4, 8]
    tiny = DenseNetEncoder(3, growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2).eval()
    with torch.no_grad():
        feats = tiny(torch.randn(1, 3, 40, 24))
    assert [tuple(f.shape[-2:]) for f in feats] == [(40, 24), (20, 12), (10, 6), (5, 3)]
    assert [f.shape[1] for f in feats] == tiny.out_channels == [32, 32, 32, 32]


def test_densenet_loads_torchvision_state_dict(tmp_path):
    from torchvision.models import DenseNet

    tv = DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2)
    state = {k: v for k, v in tv.state_dict().items()}
    # the old torchvision key style ("norm.1") must load too
    old = {k.replace("denselayer1.norm1", "denselayer1.norm.1"): v for k, v in state.items()}
    path = tmp_path / "densenet.pth"
    torch.save(old, path)
    enc = DenseNetEncoder(4, growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2)
    missing = enc.load_torchvision_weights(str(path))
    own = enc.state_dict()
    assert torch.equal(own["features.denseblock1.denselayer1.norm1.weight"],
                       state["features.denseblock1.denselayer1.norm1.weight"])
    assert torch.equal(own["features.denseblock4.denselayer2.conv2.weight"],
                       state["features.denseblock4.denselayer2.conv2.weight"])
    assert torch.equal(own["features.conv0.weight"][:, :3], state["features.conv0.weight"])  # RGB part copied
    assert missing == []
    with pytest.raises(FileNotFoundError, match="not found"):
        enc.load_torchvision_weights(str(tmp_path / "nope.pth"))
    wrong = DenseNetEncoder(3, growth_rate=4, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2)
    with pytest.raises(ValueError, match="do not fit"):
        wrong.load_torchvision_weights(str(path))


# ---- TAFE modules ----------------------------------------------------------------------------------------------------
def test_task_specific_encoder_and_fusion_shapes():
    tse = TaskSpecificEncoder([8, 12, 16], width=6)
    f1, f2, f3 = torch.randn(2, 8, 16, 16), torch.randn(2, 12, 8, 8), torch.randn(2, 16, 4, 4)
    e1 = tse.level(0, f1, None)
    e2 = tse.level(1, f2, e1)
    e3 = tse.level(2, f3, e2)
    assert [tuple(e.shape) for e in (e1, e2, e3)] == [(2, 6, 16, 16), (2, 6, 8, 8), (2, 6, 4, 4)]
    ffm = FeatureFusionModule(6)
    s, b = torch.randn(2, 6, 8, 8), torch.randn(2, 6, 8, 8)
    s2, b2 = ffm(s, b)
    assert s2.shape == s.shape and b2.shape == b.shape
    # residual: with the fusion branch's last BN scaled to 0 the module is the identity
    for branch in (ffm.to_semantic, ffm.to_boundary):
        torch.nn.init.zeros_(branch[1].weight)
        torch.nn.init.zeros_(branch[1].bias)
    s3, b3 = ffm(s, b)
    assert torch.equal(s3, s) and torch.equal(b3, b)


def test_tafe_outputs_and_deep_supervision():
    enc = DenseNetEncoder(3, growth_rate=4, block_config=(1, 1, 1, 1), num_init_features=8, bn_size=2)
    net = TAFE(enc, width=8)
    out = net(torch.randn(2, 3, 32, 32))
    assert set(out) == {"semantic", "boundary"} | {f"{t}_ds{i}" for t in ("semantic", "boundary") for i in (1, 2, 3, 4)}
    assert all(tuple(v.shape) == (2, 1, 32, 32) for v in out.values())
    net.eval()
    assert set(net(torch.randn(1, 3, 16, 16))) == {"semantic", "boundary"}


def test_smooth_truncated_loss_matches_hand_values():
    gamma = 0.3
    for p in (0.9, 0.3, 0.1):
        logit = torch.tensor([math.log(p / (1 - p))])
        got = float(smooth_truncated_loss(logit, torch.ones(1), gamma=gamma))
        want = -math.log(p) if p >= gamma else -math.log(gamma) + 0.5 * (1 - p * p / gamma ** 2)
        assert got == pytest.approx(want, rel=1e-4)
    # bounded where cross-entropy explodes
    bound = -math.log(gamma) + 0.5 + 1e-6
    assert float(smooth_truncated_loss(torch.tensor([-30.0]), torch.ones(1), gamma=gamma)) < bound


# ---- proposals and patches -------------------------------------------------------------------------------------------
def _two_cells():
    """A 10 x 20 nucleus region split by a boundary band into two 8 x 8 interiors (hand-made maps)."""
    sem = np.zeros((20, 30), np.float32)
    sem[5:15, 5:25] = 1.0
    bnd = np.zeros_like(sem)
    bnd[5:15, 5:25] = 1.0
    bnd[6:14, 6:14] = 0.0
    bnd[6:14, 16:24] = 0.0
    return sem, bnd


def test_extract_proposals_splits_touching_nuclei_and_dilates():
    sem, bnd = _two_cells()
    label, scores = extract_proposals(sem, bnd, threshold=0.5, dilation=0)
    assert label.max() == 2
    assert (label == 1).sum() == 64 and (label == 2).sum() == 64
    assert np.all(label[6:14, 6:14] == 1) and np.all(label[6:14, 16:24] == 2)
    np.testing.assert_allclose(scores, [1.0, 1.0])
    grown, _ = extract_proposals(sem, bnd, threshold=0.5, dilation=1)
    assert (grown == 1).sum() == 64 + 4 * 8  # radius-1 Euclidean disk: a cross, no corners
    assert grown[10, 14] == 1 and grown[10, 15] == 2  # the two-pixel gap is shared, no overlap
    big, _ = extract_proposals(sem, bnd, dilation=3)
    assert big.max() == 2 and (big == 1).sum() > (grown == 1).sum()
    few, _ = extract_proposals(sem, bnd, min_size=65)
    assert few.max() == 0
    with pytest.raises(ValueError, match="one shape"):
        extract_proposals(sem, bnd[:5])


def test_extract_proposals_split_separates_a_seed_covering_two_touching_discs():
    """Two touching discs with no predicted boundary between them give one seed; the distance-watershed split cuts
    it at the neck into two proposals, and leaves a lone disc whole."""
    yy, xx = np.mgrid[:40, :60]
    pair = ((yy - 20) ** 2 + (xx - 18) ** 2 <= 81) | ((yy - 20) ** 2 + (xx - 34) ** 2 <= 81)
    sem = pair.astype(np.float32)
    bnd = np.zeros_like(sem)
    merged, _ = extract_proposals(sem, bnd, dilation=0)
    assert merged.max() == 1
    split, scores = extract_proposals(sem, bnd, dilation=0, split=True)
    assert split.max() == 2 and len(scores) == 2
    assert split[20, 18] != split[20, 34] and split[20, 18] > 0 and split[20, 34] > 0
    assert ((split > 0) == pair).all()  # the split only relabels the seed, it adds or drops no pixel
    lone = ((yy - 20) ** 2 + (xx - 30) ** 2 <= 100).astype(np.float32)
    one, _ = extract_proposals(lone, bnd, dilation=0, split=True)
    assert one.max() == 1
    empty, none = extract_proposals(np.zeros_like(sem), bnd, split=True)
    assert empty.max() == 0 and len(none) == 0


def test_proposal_boxes_are_centred_squares_with_margin():
    label = np.zeros((50, 50), np.int32)
    label[10:20, 30:34] = 1  # 10 x 4
    label[0:3, 0:3] = 3  # label 2 absent
    boxes = proposal_boxes(label, margin=12)
    assert boxes.tolist() == [[-2, 15, 34], [0, 0, 0], [-12, -12, 27]]


def test_crop_resize_paste_back_round_trip_is_exact():
    rng = np.random.default_rng(0)
    label = _disk_label((60, 70), [(20, 25), (50, 60), (5, 66)], 7)  # the third is cut by the image border
    boxes = proposal_boxes(label, margin=12)
    for size in (48, 176):
        for i, box in enumerate(boxes):
            mask = label == i + 1
            patch = crop_resize(mask.astype(np.float32), box, size)  # bilinear, as the network sees it
            values, (rows, cols) = paste_back(patch, box, label.shape)
            back = np.zeros(label.shape, bool)
            back[rows, cols] = values > 0.5
            assert np.array_equal(back, mask), (size, i)
    noise = rng.random((60, 70)) > 0.5  # any mask survives the nearest-neighbour round trip when upsampling
    box = np.array([10, 20, 30])
    values, (rows, cols) = paste_back(crop_resize(noise, box, 48, "nearest"), box, noise.shape, "nearest")
    assert np.array_equal(values.astype(bool), noise[rows, cols])


def test_assemble_refined_pastes_perfect_patches_back():
    label = _disk_label((64, 64), [(15, 15), (30, 44), (55, 10)], 6)
    boxes = proposal_boxes(label, margin=12)
    patches = [crop_resize((label == i + 1).astype(np.float32), b, 48) for i, b in enumerate(boxes)]
    out, scores = assemble_refined(patches, boxes, label.shape)
    assert np.array_equal(out, label)
    assert scores.shape == (3,) and np.all(scores > 0.5)
    patches[1][:] = 0.0  # a proposal the refinement rejects disappears
    out, _ = assemble_refined(patches, boxes, label.shape)
    assert out.max() == 2 and not out[30, 44]


def test_build_patches_groups_by_size_and_masks_outside_the_proposal():
    label = np.zeros((120, 120), np.int32)
    label[10:20, 10:20] = 1  # box side 10 + 24 = 34 <= 48: small
    label[40:100, 40:80] = 2  # side 84 > 48: large
    sem = (label > 0).astype(np.float32)
    bnd = np.zeros_like(sem)
    image = np.ones((3, 120, 120), np.float32)
    boxes = proposal_boxes(label, 12)
    gt = label.copy()
    patches = build_patches(image, sem, bnd, label, boxes, 48, 176, mask_dilation=2, gt=gt, matches=np.array([1, 0]))
    assert patches["small"]["input"].shape == (1, 5, 48, 48) and patches["large"]["input"].shape == (1, 5, 176, 176)
    assert patches["small"]["index"].tolist() == [0] and patches["large"]["index"].tolist() == [1]
    small = patches["small"]["input"][0]
    assert small[0, 0, 0] == 0.0 and small[0, 24, 24] == pytest.approx(1.0)  # zeroed far outside, kept inside
    assert patches["small"]["target"][0].sum() > 0 and patches["large"]["target"][0].sum() == 0  # unmatched: bg


def test_assign_proposal_labels_iou_tau():
    gt = np.zeros((10, 20), np.int32)
    gt[0:4, 0:4] = 7  # 16 px
    gt[5:10, 10:20] = 3  # 50 px
    prop = np.zeros_like(gt)
    prop[0:4, 0:3] = 1  # IoU 12/16 = 0.75 with 7
    prop[5:10, 10:14] = 2  # IoU 20/50 = 0.4 with 3
    prop[5:10, 14:20] = 4  # IoU 30/50 = 0.6 with 3 (label 3 of prop absent)
    assert assign_proposal_labels(prop, gt, 0.5).tolist() == [7, 0, 0, 3]
    assert assign_proposal_labels(prop, gt, 0.3).tolist() == [7, 3, 0, 3]
    assert assign_proposal_labels(prop, gt, 0.8).tolist() == [0, 0, 0, 0]
    assert assign_proposal_labels(prop, np.zeros_like(gt)).tolist() == [0, 0, 0, 0]


def test_refine_net_shapes():
    net = RefineNet(5, (4, 4, 8, 8), num_layers=2)
    assert tuple(net(torch.randn(3, 5, 24, 24)).shape) == (3, 1, 24, 24)
    with pytest.raises(ValueError, match="multiple of 8"):
        net(torch.randn(1, 5, 20, 20))


# ---- schedule --------------------------------------------------------------------------------------------------------
def test_cosine_warm_restarts_schedule():
    s = CosineWarmRestartsParamScheduler(first_period=10, max_iter=100, period_mult=2, peak_decay=0.5)
    at = lambda it: s(it / 100)  # noqa: E731
    assert at(0) == pytest.approx(1.0)
    assert at(5) == pytest.approx(0.5)  # half-way down the first cosine
    assert at(10) == pytest.approx(0.5)  # first restart at half the peak
    assert at(20) == pytest.approx(0.25)  # middle of the 20-iteration second period
    assert at(30) == pytest.approx(0.25)  # second restart at a quarter
    assert at(9.999) < 1e-6


# ---- the meta-architecture -------------------------------------------------------------------------------------------
def _batch(cfg, n=2, is_train=True):
    from detectron2.data import DatasetCatalog

    from nuclei_d2.data.mapper import NucleiDatasetMapper

    mapper = NucleiDatasetMapper(cfg, is_train=is_train)
    dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0] if is_train else cfg.DATASETS.TEST[0])
    out = []
    for d in dicts:
        m = mapper(d)
        if m is not None:
            out.append(m)
        if len(out) == n:
            return out
    raise AssertionError("no training inputs")


def test_stage1_training_step_updates_tafe_only():
    from detectron2.modeling import build_model

    cfg = tiny_cfg("brpnet-tiny.yaml")
    model = build_model(cfg).train()
    batch = _batch(cfg)
    losses = model(batch)
    assert set(losses) == {"loss_semantic", "loss_semantic_ds", "loss_boundary", "loss_boundary_ds"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and not any(p.requires_grad for p in model.refine_small.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    before = model.tafe.decoders["semantic"].head.weight.clone()
    sum(losses.values()).backward()
    opt.step()
    assert not torch.equal(before, model.tafe.decoders["semantic"].head.weight)


def test_stage2_loads_stage1_and_trains_refinement(tmp_path):
    from detectron2.modeling import build_model

    from nuclei_d2.data.targets import boundary_map

    cfg1 = tiny_cfg("brpnet-tiny.yaml")
    stage1 = build_model(cfg1)
    ckpt = tmp_path / "stage1.pth"
    torch.save({"model": stage1.state_dict()}, ckpt)
    cfg2 = tiny_cfg("brpnet_stage2-tiny.yaml", "MODEL.BRPNET.STAGE1.WEIGHTS", str(ckpt))
    model = build_model(cfg2).train()
    for k, v in stage1.tafe.state_dict().items():
        assert torch.equal(v, model.tafe.state_dict()[k]), k
    assert not model.tafe.training and not any(p.requires_grad for p in model.tafe.parameters())
    batch = _batch(cfg2)

    # An oracle TAFE (probabilities from the ground truth) so the proposals are the nuclei themselves.
    def oracle(x):
        maps = []
        for inp in batch:
            gt = inp["label_map"].numpy()
            m = torch.zeros(2, *x.shape[-2:])
            m[0, :gt.shape[0], :gt.shape[1]] = torch.from_numpy((gt > 0).astype(np.float32))
            m[1, :gt.shape[0], :gt.shape[1]] = torch.from_numpy(boundary_map(gt, 1).astype(np.float32))
            maps.append(m)
        return torch.stack(maps)

    model.dense_probs = oracle
    losses = model(batch)
    assert set(losses) == {"loss_refine_small", "loss_refine_large"}
    assert float(losses["loss_refine_small"].detach()) > 0
    tafe_before = {k: v.clone() for k, v in model.tafe.state_dict().items()}
    small_before = model.refine_small.head.weight.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sum(losses.values()).backward()
    opt.step()
    assert not torch.equal(small_before, model.refine_small.head.weight)
    assert all(torch.equal(v, model.tafe.state_dict()[k]) for k, v in tafe_before.items())

    # inference with the oracle on a mapped crop: the model contract, masks at the input size
    model.eval()
    gt = batch[0]["label_map"].numpy()
    h, w = gt.shape
    probs = torch.from_numpy(np.stack([(gt > 0), boundary_map(gt, 1)]).astype(np.float32))
    model.predict_probs = lambda image: probs
    out = model([{"image": batch[0]["image"], "height": h, "width": w}])[0]
    inst = out["instances"]
    assert inst.pred_masks.dtype == torch.bool and tuple(inst.pred_masks.shape[-2:]) == (h, w)
    assert set(model.timings) == {"stage1", "proposals", "stage2"}
    assert tuple(out["probs"].shape) == (2, h, w)
    model.inference_mode = "proposals"  # TAFE + post-processing: the oracle's nuclei (those above the min size)
    prop = model([{"image": batch[0]["image"], "height": h, "width": w}])[0]["instances"]
    assert len(prop) >= 1 and prop.pred_masks.shape == (len(prop), h, w)


def test_stage2_rejects_bad_stage1_checkpoint(tmp_path):
    from detectron2.modeling import build_model

    from nuclei_d2.config import build_cfg

    # the tools' setup_cfg stops at a missing file first (tests/test_checkpoint.py); the model says it too
    with pytest.raises(ValueError, match="STAGE1.WEIGHTS: weights file not found"):
        tiny_cfg("brpnet_stage2-tiny.yaml", "MODEL.BRPNET.STAGE1.WEIGHTS", str(tmp_path / "x.pth"))
    with pytest.raises(FileNotFoundError, match="STAGE1.WEIGHTS: file not found"):
        build_model(build_cfg(str(CONFIGS / "brpnet_stage2-tiny.yaml"),
                              ["MODEL.DEVICE", "cpu", "MODEL.BRPNET.STAGE1.WEIGHTS", str(tmp_path / "x.pth")]))
    torch.save({"model": {"other.weight": torch.zeros(1)}}, tmp_path / "y.pth")
    with pytest.raises(ValueError, match="no 'tafe"):
        build_model(tiny_cfg("brpnet_stage2-tiny.yaml", "MODEL.BRPNET.STAGE1.WEIGHTS", str(tmp_path / "y.pth")))


# ---- train_net end to end --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_net_both_stages(python, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(config, out, *opts):
        cmd = [python, str(REPO / "tools" / "train_net.py"), "--config-file", str(CONFIGS / config), "MODEL.DEVICE",
               "cpu", "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "100", *opts]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
        assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        return proc

    s1 = tmp_path / "s1"
    run("brpnet-tiny.yaml", s1)
    assert (s1 / "model_final.pth").is_file() and (s1 / "metrics_final.json").is_file()
    s2 = tmp_path / "s2"
    run("brpnet_stage2-tiny.yaml", s2, "MODEL.BRPNET.STAGE1.WEIGHTS", str(s1 / "model_final.pth"))
    assert (s2 / "model_final.pth").is_file()
    import json

    final = json.loads((s2 / "metrics_final.json").read_text())
    assert final, "no evaluation results"
    state = torch.load(s2 / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    s1_state = torch.load(s1 / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert torch.equal(state["tafe.decoders.semantic.head.weight"], s1_state["tafe.decoders.semantic.head.weight"])


def test_build_brpnet_lr_scheduler_follows_warm_restarts():

    cfg = tiny_cfg("brpnet-tiny.yaml", "SOLVER.MAX_ITER", "40", "SOLVER.WARMUP_ITERS", "0", "SOLVER.BASE_LR", "0.1",
                   "SOLVER.WARM_RESTARTS.FIRST_PERIOD", "10")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_brpnet_lr_scheduler(cfg, opt)
    lrs = []
    for _ in range(31):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.05)
    assert lrs[10] == pytest.approx(0.05)  # restart at half the peak
    assert lrs[30] == pytest.approx(0.025)
    assert lrs[9] < lrs[10]


def test_trainer_dispatches_to_warm_restarts_by_name():
    """configs/brpnet.yaml names the schedule; NucleiTrainer (not only the builder) must honour the name."""
    from nuclei_d2.engine.trainer import NucleiTrainer

    def lrs_of(name):
        cfg = tiny_cfg("brpnet-tiny.yaml", "SOLVER.MAX_ITER", "40", "SOLVER.WARMUP_ITERS", "0", "SOLVER.BASE_LR",
                       "0.1", "SOLVER.WARM_RESTARTS.FIRST_PERIOD", "10", "SOLVER.LR_SCHEDULER_NAME", name)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = NucleiTrainer.build_lr_scheduler(cfg, opt)
        out = []
        for _ in range(12):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    restarts, cosine = lrs_of("CosineWarmRestarts"), lrs_of("WarmupCosineLR")
    assert restarts[10] == pytest.approx(0.05) and restarts[9] < restarts[10]  # a restart at iteration 10
    assert cosine[10] < cosine[9]  # Detectron2's cosine keeps decaying


def test_paper_config_builds_and_runs():
    from detectron2.modeling import build_model

    model = build_model(tiny_cfg("brpnet.yaml")).eval()
    assert model.tafe.backbone.out_channels == [256, 512, 1024, 1024]
    assert model.small_size == 48 and model.large_size == 176 and model.margin == 12
    with torch.no_grad():
        probs = model.dense_probs(torch.zeros(1, 3, 20, 20))  # not a multiple of 8: padded inside
    assert tuple(probs.shape) == (1, 2, 20, 20) and float(probs.min()) >= 0 and float(probs.max()) <= 1


def test_proposal_split_is_set_from_the_config():
    """MODEL.BRPNET.PROPOSAL_SPLIT* reach the model's proposals (and tune_inference can grid them)."""
    from detectron2.modeling import build_model

    cfg = tiny_cfg("brpnet-tiny.yaml")
    cfg.defrost()
    cfg.MODEL.BRPNET.PROPOSAL_SPLIT = True
    cfg.MODEL.BRPNET.PROPOSAL_SPLIT_SIGMA_FACTOR = 0.5
    cfg.MODEL.BRPNET.PROPOSAL_DILATION = 0.0
    model = build_model(cfg).eval()
    assert model.proposal["split"] is True and model.proposal["split_sigma_factor"] == 0.5
    assert "MODEL.BRPNET.PROPOSAL_SPLIT" in model.postprocess_keys
    yy, xx = np.mgrid[:40, :60]
    pair = ((yy - 20) ** 2 + (xx - 18) ** 2 <= 81) | ((yy - 20) ** 2 + (xx - 34) ** 2 <= 81)
    label, _ = model.postprocess(np.stack([pair.astype(np.float32), np.zeros(pair.shape, np.float32)]))
    assert label.max() == 2
