"""Mask R-CNN+ (nuclei_d2/modeling/maskrcnn_plus.py, two_stage_unet.py): the five-channel model, its 1x1 input
projection, the distance U-Net (training, loading, filling the channel at inference), gradients in stage 1, the
configs, and end to end with tools/train_net.py: staged training, --resume mid-stage, --eval-only with TTA and an
ensemble."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, REPO, tiny_cfg, train_batch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from nuclei_d2.config import build_cfg
from nuclei_d2.data.mapper import NucleiDatasetMapper
from nuclei_d2.engine.staged_schedule import apply_stage, build_staged_schedule_hook
from nuclei_d2.inference.test_time import predict_crops
from nuclei_d2.modeling.maskrcnn_plus import DISTANCE_NET, MaskRCNNPlus, build_distance_net
from nuclei_d2.modeling.submodel import SubModel
from nuclei_d2.modeling.two_stage_unet import TwoStageUNet
from nuclei_d2.structures import CropMasks

TINY = "maskrcnn_plus-tiny.yaml"


def mapped_test_input(cfg):
    return NucleiDatasetMapper(cfg, is_train=False)(DatasetCatalog.get(cfg.DATASETS.TEST[0])[0])


@pytest.fixture(scope="module")
def cfg():
    return tiny_cfg(TINY, "TEST.DETECTIONS_PER_IMAGE", "50")  # an untrained model detects noise: keep tests quick


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return build_model(cfg)


# ---- the model ----------------------------------------------------------------------------------------------------


def test_builds_five_channel_model(model):
    assert isinstance(model, MaskRCNNPlus)
    assert model.channel_names == ("red", "green", "blue", "hematoxylin", "distance")
    assert tuple(model.input_proj.weight.shape) == (3, 5, 1, 1)
    w = model.input_proj.weight[:, :, 0, 0]
    assert torch.equal(w, torch.tensor([[1.0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0], [0, 0, 1.0, 0, 0]]))  # "rgb" init
    assert model.backbone.bottom_up.stem.conv1.weight.shape[1] == 3  # a standard 3-channel backbone
    assert isinstance(model.distance_unet, TwoStageUNet)
    assert model.distance_channels == [0, 1, 2]
    assert not any(p.requires_grad for p in model.distance_unet.parameters())
    model.train()
    assert not model.distance_unet.training  # frozen: eval mode even while training
    model.eval()


def test_pixel_stats_must_match_channels():
    cfg = tiny_cfg(TINY, "INPUT.EXTRA_CHANNELS", "['hematoxylin']")
    with pytest.raises(ValueError, match="PIXEL_MEAN / PIXEL_STD have 5 / 5 entries but the input has 4 channels"):
        build_model(cfg)


def test_rgb_only_without_projection_is_the_baseline_mask_rcnn():
    cfg = tiny_cfg(TINY, "INPUT.EXTRA_CHANNELS", "[]", "MODEL.PIXEL_MEAN", "[172.0, 120.1, 158.2]",
                   "MODEL.PIXEL_STD", "[55.6, 58.8, 47.0]", "MODEL.MASKRCNN_PLUS.INPUT_PROJECTION", "False")
    plus = build_model(cfg)
    assert plus.input_proj is None and plus.distance_unet is None
    base = build_model(tiny_cfg("maskrcnn_baseline-tiny.yaml"))
    shapes = {k: tuple(v.shape) for k, v in plus.state_dict().items() if k != "distance_trained"}
    assert shapes == {k: tuple(v.shape) for k, v in base.state_dict().items()}


def test_trains_and_stage_one_trains_the_projection_not_the_backbone(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    stage1 = build_staged_schedule_hook(cfg).stages[0]
    apply_stage(model, stage1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = train_batch(cfg)
    assert batch[0]["image"].shape[0] == 5
    assert batch[0]["image"][4].max() > 0  # the ground-truth distance channel in training
    with EventStorage(0):
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["input_proj.weight"] is not None and grads["input_proj.weight"].abs().sum() > 0
    # the extra channels' weights learn too (they start at 0)
    assert grads["input_proj.weight"][:, 3:].abs().sum() > 0
    assert all(g is None for n, g in grads.items() if n.startswith("backbone.bottom_up."))
    assert all(g is None for n, g in grads.items() if n.startswith("distance_unet."))
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("roi_heads."))
    opt.step()
    after = dict(model.named_parameters())
    assert not torch.equal(before["input_proj.weight"], after["input_proj.weight"])
    assert all(torch.equal(before[n], after[n]) for n in before if n.startswith("backbone.bottom_up."))


def test_inference_fills_the_distance_channel(cfg, model):
    model.eval()
    inp = mapped_test_input(cfg)
    assert inp["image"].shape[0] == 5 and inp["image"][4].abs().sum() == 0  # the mapper gives zeros at inference
    filled = model.fill_distance(inp["image"])
    expected = model.distance_unet.predict_distance(inp["image"][:3]) * 255.0
    assert torch.allclose(filled[4], expected)
    assert torch.equal(filled[:4], inp["image"][:4])
    assert 0 <= float(filled[4].min()) and float(filled[4].max()) <= 255

    calls = []
    original = model.fill_distance

    def spy(image):
        calls.append(tuple(image.shape))
        return original(image)

    model.fill_distance = spy
    try:
        with torch.no_grad():
            out = model([inp, inp])
        assert len(calls) == 2
        model.train()
        with EventStorage(0):
            model(train_batch(cfg))
        assert len(calls) == 2  # training uses the ground-truth channel
    finally:
        del model.fill_distance
        model.eval()
    inst = out[0]["instances"]
    assert inst.image_size == (inp["height"], inp["width"])
    assert inst.pred_masks.dtype == torch.bool


def test_untrained_distance_unet_is_refused_at_inference(cfg):
    strict = build_model(tiny_cfg(TINY, "MODEL.MASKRCNN_PLUS.ALLOW_UNTRAINED_DISTANCE", "False"))
    strict.eval()
    with pytest.raises(RuntimeError, match="needs a trained distance U-Net"), torch.no_grad():
        strict([mapped_test_input(cfg)])


def save_distance_unet(path: Path, seed: int) -> TwoStageUNet:
    torch.manual_seed(seed)
    net, _ = build_distance_net(SubModel(DISTANCE_NET, str(CONFIGS / "distance_unet-tiny.yaml")))
    torch.save({"model": net.state_dict(), "iteration": 3}, path)
    return net


def test_distance_weights_load_and_win_over_model_weights(tmp_path):
    dist = save_distance_unet(tmp_path / "dist.pth", seed=1)
    opts = ["MODEL.MASKRCNN_PLUS.DISTANCE_NET.WEIGHTS", str(tmp_path / "dist.pth"),
            "MODEL.MASKRCNN_PLUS.ALLOW_UNTRAINED_DISTANCE", "False"]
    model = build_model(tiny_cfg(TINY, *opts))
    assert bool(model.distance_trained)
    for (n, p), q in zip(model.distance_unet.state_dict().items(), dist.state_dict().values()):
        assert torch.equal(p, q), n

    # A Mask R-CNN+ checkpoint with other distance U-Net weights (e.g. from pre-training) and other heads.
    torch.manual_seed(7)
    other = build_model(tiny_cfg(TINY))
    with torch.no_grad():
        for p in other.distance_unet.parameters():
            p.add_(1.0)
    DetectionCheckpointer(other, save_dir=str(tmp_path)).save("other")
    DetectionCheckpointer(model).load(str(tmp_path / "other.pth"))
    for (n, p), q in zip(model.distance_unet.state_dict().items(), dist.state_dict().values()):
        assert torch.equal(p, q), f"{n} was overwritten by MODEL.WEIGHTS"
    assert torch.equal(model.roi_heads.box_predictor.cls_score.weight, other.roi_heads.box_predictor.cls_score.weight)

    # Without DISTANCE_NET.WEIGHTS the checkpoint's distance U-Net is used (a self-contained Mask R-CNN+ checkpoint).
    plain = build_model(tiny_cfg(TINY))
    DetectionCheckpointer(plain).load(str(tmp_path / "other.pth"))
    for (n, p), q in zip(plain.distance_unet.state_dict().items(), other.distance_unet.state_dict().values()):
        assert torch.equal(p, q), n


def test_wrong_distance_weights_give_a_clear_error(tmp_path):
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, tmp_path / "not_a_unet.pth")
    with pytest.raises(ValueError, match="not_a_unet.pth does not match the distance U-Net"):
        build_model(tiny_cfg(TINY, "MODEL.MASKRCNN_PLUS.DISTANCE_NET.WEIGHTS", str(tmp_path / "not_a_unet.pth")))
    # the tools' setup_cfg stops at a missing file first (tests/test_checkpoint.py); the model says it too
    with pytest.raises(ValueError, match="DISTANCE_NET.WEIGHTS: weights file not found: '/no/such.pth'"):
        tiny_cfg(TINY, "MODEL.MASKRCNN_PLUS.DISTANCE_NET.WEIGHTS", "/no/such.pth")
    with pytest.raises(FileNotFoundError, match="DISTANCE_NET.WEIGHTS: file not found: '/no/such.pth'"):
        build_model(build_cfg(str(CONFIGS / TINY), ["MODEL.DEVICE", "cpu", "MODEL.MASKRCNN_PLUS.DISTANCE_NET.WEIGHTS",
                                                    "/no/such.pth"]))
    with pytest.raises(ValueError, match="describes a 'NucleiRCNN'"):
        build_model(tiny_cfg(TINY, "MODEL.MASKRCNN_PLUS.DISTANCE_NET.CONFIG", str(CONFIGS / "maskrcnn_baseline.yaml")))


# ---- the distance U-Net -------------------------------------------------------------------------------------------


def test_distance_unet_has_the_papers_architecture():
    model, dcfg = build_distance_net(SubModel(DISTANCE_NET, str(CONFIGS / "distance_unet.yaml")))
    assert TwoStageUNet.required_targets_of(dcfg) == ("distance",)  # INPUT.TARGETS follows from the model
    net = model.dist_net  # the two-stage U-Net's distance network
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.modules()) >= 1 and net.depth == 5
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in net.modules()) == 5
    assert {m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    assert any(isinstance(m, torch.nn.ReLU) for m in net.modules())
    assert net.out_channels == 1 and not any(isinstance(m, torch.nn.Sigmoid) for m in net.modules())
    assert model.distance_activation == "linear"
    assert (dcfg.SOLVER.OPTIMIZER, dcfg.SOLVER.BASE_LR, dcfg.SOLVER.GAMMA) == ("Adam", 0.001, 0.1)


def test_distance_unet_trains_with_mse_and_predicts():
    cfg = tiny_cfg("distance_unet-tiny.yaml")
    torch.manual_seed(0)
    net = build_model(cfg)
    batch = train_batch(cfg, 2)
    target = torch.stack([b["targets"]["distance"] for b in batch])
    losses = net(batch)
    assert set(losses) == {"loss_distance"}
    with torch.no_grad():
        pred = net.dist_net(net.normalize(torch.stack([b["image"] for b in batch])))[:, 0]
    assert float(losses["loss_distance"]) == pytest.approx(float(((pred - target) ** 2).mean()), rel=0.05)
    losses["loss_distance"].backward()
    assert all(p.grad is not None for p in net.dist_net.parameters())  # the trained network (seg_net: unused)
    net.eval()
    inp = NucleiDatasetMapper(cfg, is_train=False)(DatasetCatalog.get(cfg.DATASETS.TEST[0])[0])
    out = net([inp])[0]
    assert out["probs"].shape == (1, inp["height"], inp["width"])
    assert out["instances"].image_size == (inp["height"], inp["width"])


# ---- soft masks for merging -------------------------------------------------------------------------------------


def test_soft_crops_binarise_to_the_models_own_masks(cfg, model):
    model.eval()
    inp = mapped_test_input(cfg)
    with torch.no_grad():
        own = model([inp])[0]["instances"]
    soft = predict_crops(model, inp, soft_masks=True)
    assert any(float(m.max()) < 1.0 and float(m.max()) > 0.0 for m in soft.masks)  # probabilities, not 0/1
    mine = soft.to_instances(0.5).pred_masks
    theirs = own.pred_masks[own.pred_masks.flatten(1).any(1)]
    assert mine.shape == theirs.shape and torch.equal(mine, theirs)
    hard = predict_crops(model, inp, soft_masks=False)
    assert len(hard) == len(CropMasks.from_instances(own))


# ---- configs -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("maskrcnn_plus*.yaml")))
def test_configs_are_consistent(name):
    c = build_cfg(str(CONFIGS / name))
    assert len(c.MODEL.PIXEL_MEAN) == len(c.MODEL.PIXEL_STD) == 3 + len(c.INPUT.EXTRA_CHANNELS)
    assert c.MODEL.META_ARCHITECTURE == "MaskRCNNPlus"
    if "distance" in c.INPUT.EXTRA_CHANNELS:
        dist_config = REPO / c.MODEL.MASKRCNN_PLUS.DISTANCE_NET.CONFIG
        assert build_cfg(str(dist_config)).MODEL.META_ARCHITECTURE == "TwoStageUNet"


def test_transfer_configs_chain_pretraining_to_finetuning():
    pre = build_cfg(str(CONFIGS / "maskrcnn_plus-pretrain-dsb2018.yaml"))
    fine = build_cfg(str(CONFIGS / "maskrcnn_plus-finetune-kumar.yaml"))
    assert pre.DATASETS.TRAIN == ("dsb2018_stage1_train",) and fine.DATASETS.TRAIN == ("kumar_train",)
    assert Path(fine.MODEL.WEIGHTS).parent == Path(pre.OUTPUT_DIR)
    assert fine.SOLVER.STAGED.ENABLED


# ---- end to end ---------------------------------------------------------------------------------------------------


def run_train_net(python, *args, check=True):
    cmd = [python, str(REPO / "tools" / "train_net.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def moved(a: dict, b: dict, prefix: str) -> bool:
    keys = [k for k in a["model"] if k.startswith(prefix)]
    assert keys, prefix
    return any(not torch.equal(a["model"][k], b["model"][k]) for k in keys)


def lr_factor(ckpt: dict) -> float:
    groups = ckpt["trainer"]["_trainer"]["optimizer"]["param_groups"]  # DefaultTrainer's checkpoint layout
    return max(g["lr"] / g["initial_lr"] for g in groups)


STAGE_OPTS = ["SOLVER.STAGED.STAGE_ITERS", "[2, 2, 1, 1]", "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "1",
              "SOLVER.WARMUP_ITERS", "0", "MODEL.DEVICE", "cpu"]


def check_stage_effects(ckpts: dict[int, dict], iterations) -> None:
    """Checkpoint k is saved after iteration k: compare k-1 -> k for what iteration k trained."""
    expect = {1: (1, {"input_proj.", "roi_heads."}, {"backbone.bottom_up."}),
              2: (2, {"backbone.bottom_up.res2.", "input_proj.", "roi_heads."}, set()),
              3: (2, {"backbone.bottom_up.res2.", "input_proj.", "roi_heads."}, set()),
              4: (3, {"backbone.bottom_up.res5.", "roi_heads."}, {"backbone.bottom_up.res2.", "input_proj."}),
              5: (4, {"roi_heads.", "backbone.fpn_"}, {"backbone.bottom_up.", "input_proj."})}
    mult = {1: 2.0, 2: 1.0, 3: 0.5, 4: 0.1}
    for k in iterations:
        stage, trains, frozen = expect[k]
        for prefix in trains:
            assert moved(ckpts[k - 1], ckpts[k], prefix), f"iteration {k} (stage {stage}) should train {prefix}"
        for prefix in frozen:
            assert not moved(ckpts[k - 1], ckpts[k], prefix), f"iteration {k} (stage {stage}) trained {prefix}"
        # The lr saved after iteration k was computed with iteration k's stage multiplier.
        assert lr_factor(ckpts[k]) == pytest.approx(mult[stage]), f"iteration {k}"
        assert not moved(ckpts[k - 1], ckpts[k], "distance_unet.")


@pytest.mark.slow
def test_train_net_staged_schedule_resume_and_tta_ensemble_eval(python, tmp_path):
    # 1. the distance U-Net, trained with its own config
    dist_out = tmp_path / "dist"
    run_train_net(python, "--config-file", str(CONFIGS / "distance_unet-tiny.yaml"), "MODEL.DEVICE", "cpu",
                  "OUTPUT_DIR", str(dist_out), "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "100")
    dist_w = dist_out / "model_final.pth"
    assert dist_w.is_file()
    # 2. Mask R-CNN+ with the staged schedule, a checkpoint after every iteration
    out = tmp_path / "plus"
    common = ["--config-file", str(CONFIGS / TINY), *STAGE_OPTS, "MODEL.MASKRCNN_PLUS.ALLOW_UNTRAINED_DISTANCE",
              "False"]
    run_train_net(python, *common, "OUTPUT_DIR", str(out), "MODEL.MASKRCNN_PLUS.DISTANCE_NET.WEIGHTS", str(dist_w))
    ckpts = {k: load(out / f"model_{k:07d}.pth") for k in range(6)}
    check_stage_effects(ckpts, range(1, 6))
    final = json.loads((out / "metrics_final.json").read_text())
    assert "AJI" in final["nuclei"] and "PQ" in final["nuclei"]
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    assert [r["staged/stage"] for r in records if "staged/stage" in r][-1] == 4

    # 3. --resume from the checkpoint after iteration 2 (the middle of stage 2)
    res = tmp_path / "resume"
    res.mkdir()
    for k in range(3):
        shutil.copy(out / f"model_{k:07d}.pth", res / f"model_{k:07d}.pth")
    (res / "last_checkpoint").write_text("model_0000002.pth")
    proc = run_train_net(python, "--resume", *common, "OUTPUT_DIR", str(res),
                         "MODEL.MASKRCNN_PLUS.DISTANCE_NET.WEIGHTS", str(dist_w))
    assert "Starting training from iteration 3" in proc.stdout + proc.stderr
    resumed = {k: load(res / f"model_{k:07d}.pth") for k in range(2, 6)}
    check_stage_effects(resumed, range(3, 6))

    # 4. --eval-only with TTA and a two-model ensemble, from the self-contained checkpoint (no DISTANCE_NET.WEIGHTS)
    ev = tmp_path / "eval"
    eval_opts = ["--config-file", str(CONFIGS / TINY), "--eval-only", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(ev),
                 "MODEL.WEIGHTS", str(out / "model_final.pth"), "MODEL.MASKRCNN_PLUS.ALLOW_UNTRAINED_DISTANCE",
                 "False", "TEST.AUG.ENABLED", "True", "TEST.DETECTIONS_PER_IMAGE", "50"]
    run_train_net(python, *eval_opts, "TEST.ENSEMBLE.WEIGHTS", f"['{out / 'model_0000003.pth'}']")
    final = json.loads((ev / "metrics_final.json").read_text())
    assert final["nuclei"]["n_images"] == 2
    assert 0.0 <= final["nuclei"]["AJI"] <= 1.0
    # the wrapper is really in the evaluation path: a bad transform name or a missing member fails there
    bad = run_train_net(python, *eval_opts, "TEST.AUG.TRANSFORMS", "['flip']", check=False)
    assert bad.returncode != 0 and "unknown transform 'flip'" in bad.stderr
    bad = run_train_net(python, *eval_opts, "TEST.ENSEMBLE.WEIGHTS", "['/no/member.pth']", check=False)
    assert bad.returncode != 0 and "TEST.ENSEMBLE.WEIGHTS[0]: weights file not found" in bad.stderr


@pytest.mark.real_data
def test_real_data_five_channels(shared_data):
    """On a real Kumar tile: the mapper's hematoxylin channel is nucleus-bright, the ground-truth distance channel is
    zero outside nuclei, and Mask R-CNN+ runs inference on a 300x400 piece of it."""
    from nuclei_d2.utils.io import read_image_rgb, read_label_map

    tile = "TCGA-A7-A13E-01Z-00-DX1"
    image = read_image_rgb(shared_data / "monuseg2018" / "train" / "images" / f"{tile}.tif")
    label = read_label_map(shared_data / "monuseg2018" / "train" / "labels" / f"{tile}.png")
    cfg = tiny_cfg(TINY, "INPUT.CROP.ENABLED", "False")
    mapper = NucleiDatasetMapper(cfg, is_train=True)
    from nuclei_d2.structures import label_map_to_annotations

    d = mapper({"file_name": "x", "image": image, "height": 1000, "width": 1000,
                "annotations": label_map_to_annotations(label)})
    img, lab = d["image"], d["label_map"].numpy()
    assert img.shape == (5, 1000, 1000)
    h = img[3].numpy()
    assert h[lab > 0].mean() > 2 * h[lab == 0].mean()
    assert np.all(img[4].numpy()[lab == 0] == 0) and img[4].numpy()[lab > 0].max() == pytest.approx(255.0)
    torch.manual_seed(0)
    model = build_model(tiny_cfg(TINY, "TEST.DETECTIONS_PER_IMAGE", "50")).eval()
    piece = np.ascontiguousarray(image[:300, :400])
    inp = NucleiDatasetMapper(cfg, is_train=False)({"file_name": "x", "image": piece, "height": 300, "width": 400})
    with torch.no_grad():
        out = model([inp])[0]["instances"]
    assert out.image_size == (300, 400)
