"""One composition mechanism (nuclei_d2/modeling/submodel.py, issue 23): a sub-model built from config X with
weights W, frozen or trainable. The two-stage U-Net's stage-2 network serves as Mask R-CNN+'s distance network,
Mask R-CNN+ trains on the distance map that network predicts (TRAIN_ON_PREDICTED_DISTANCE), stage 2 of the
two-stage U-Net and of BRP-Net take their stage-1 network through the same spec, misfits are one clear error, and
INPUT.TARGETS follows from the model."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIGS, tiny_cfg, train_batch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from nuclei_d2.checkpoint import CheckpointError
from nuclei_d2.data.mapper import NucleiDatasetMapper
from nuclei_d2.engine.defaults import RANDOM_INIT_OPTS, ConfigError
from nuclei_d2.modeling.submodel import freeze, is_frozen

PLUS = "maskrcnn_plus-tiny.yaml"
TS2 = "two_stage_unet_stage2-tiny.yaml"


@pytest.fixture(scope="module")
def stage2_checkpoint(tmp_path_factory):
    """A two-stage U-Net stage-2 model (random weights, its own seed) saved as train_net would."""
    torch.manual_seed(3)
    model = build_model(tiny_cfg(TS2, *RANDOM_INIT_OPTS))
    path = tmp_path_factory.mktemp("ts2") / "model_final.pth"
    torch.save({"model": model.state_dict(), "iteration": 4}, path)
    return model.eval(), path


def plus_cfg(weights, *opts):
    return tiny_cfg(PLUS, "MODEL.MASKRCNN_PLUS.DISTANCE_NET.CONFIG", str(CONFIGS / TS2),
                    "MODEL.MASKRCNN_PLUS.DISTANCE_NET.WEIGHTS", str(weights),
                    "MODEL.MASKRCNN_PLUS.ALLOW_UNTRAINED_DISTANCE", "False", "TEST.DETECTIONS_PER_IMAGE", "20", *opts)


def test_two_stage_stage2_network_is_mask_rcnn_plus_distance_network(stage2_checkpoint):
    stage2, path = stage2_checkpoint
    plus = build_model(plus_cfg(path)).eval()
    own = plus.distance_unet.dist_net.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in stage2.dist_net.state_dict().items())
    assert bool(plus.distance_trained) and is_frozen(plus.distance_unet)
    assert not any(p.requires_grad for p in plus.distance_unet.parameters())
    cfg = plus_cfg(path)
    inp = NucleiDatasetMapper(cfg, is_train=False)(DatasetCatalog.get(cfg.DATASETS.TEST[0])[0])
    filled = plus.fill_distance(inp["image"])
    # the stage-2 model's own distance map (its watershed inference computes it next to the foreground)
    probs = stage2.predict_probs(inp["image"][:3])
    expected = probs[stage2.prob_names.index("distance")].clamp(0, 1) * 255.0
    torch.testing.assert_close(filled[4], expected, rtol=1e-5, atol=1e-4)
    plus.train()
    assert not plus.distance_unet.training  # frozen: eval mode while Mask R-CNN+ trains


def _distance_channel_seen_in_training(model, batch):
    """The distance channel (0-255) of each training image as the model's input projection receives it."""
    seen = []
    hook = model.input_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        model.train()
        with EventStorage(0):
            model(batch)
    finally:
        hook.remove()
    x = seen[0][:, 4] * model.pixel_std[4] + model.pixel_mean[4]
    return [x[i, : b["image"].shape[1], : b["image"].shape[2]] for i, b in enumerate(batch)]


@pytest.mark.parametrize("predicted", [True, False])
def test_train_on_predicted_distance(stage2_checkpoint, predicted):
    _, path = stage2_checkpoint
    cfg = plus_cfg(path, "MODEL.MASKRCNN_PLUS.TRAIN_ON_PREDICTED_DISTANCE", str(predicted))
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = train_batch(cfg)
    seen = _distance_channel_seen_in_training(model, batch)
    for b, x in zip(batch, seen, strict=True):
        ground_truth = b["image"][4]
        assert ground_truth.max() > 0  # the mapper gives the ground truth's map in training
        with torch.no_grad():
            prediction = model.distance_unet.predict_distance(b["image"][:3]) * 255.0
        expected = prediction if predicted else ground_truth
        other = ground_truth if predicted else prediction
        torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-2)
        assert (x - other).abs().max() > 1.0


def test_train_on_predicted_distance_needs_a_distance_network():
    with pytest.raises(ValueError, match="TRAIN_ON_PREDICTED_DISTANCE needs the 'distance' input channel"):
        build_model(tiny_cfg(PLUS, "MODEL.MASKRCNN_PLUS.TRAIN_ON_PREDICTED_DISTANCE", "True",
                             "MODEL.MASKRCNN_PLUS.DISTANCE_SOURCE", "input"))


def test_two_stage_stage1_of_another_width_is_one_clear_error(tmp_path):
    torch.manual_seed(0)
    wide = build_model(tiny_cfg("two_stage_unet-tiny.yaml", "MODEL.UNET.BASE_CHANNELS", "16"))
    torch.save({"model": wide.state_dict()}, tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match=r"^MODEL.TWO_STAGE.STAGE1.WEIGHTS: \S*wide.pth does not match the "
                                              r"stage-1 segmentation U-Net of this config: 0 of \d+ tensors missing, "
                                              r"\d+ of another shape.*configs/two_stage_unet-tiny.yaml\)$"):
        build_model(tiny_cfg(TS2, "MODEL.TWO_STAGE.STAGE1.WEIGHTS", str(tmp_path / "wide.pth")))


def test_stage1_not_frozen_trains_both_networks(tmp_path):
    torch.manual_seed(0)
    stage1 = build_model(tiny_cfg("two_stage_unet-tiny.yaml"))
    torch.save({"model": stage1.state_dict()}, tmp_path / "s1.pth")
    cfg = tiny_cfg(TS2, "MODEL.TWO_STAGE.STAGE1.WEIGHTS", str(tmp_path / "s1.pth"),
                   "MODEL.TWO_STAGE.STAGE1.FROZEN", "False")
    assert set(cfg.INPUT.TARGETS) == {"eroded", "distance"}  # both losses: both targets follow from the model
    model = build_model(cfg)
    assert all(torch.equal(v, model.seg_net.state_dict()[k]) for k, v in stage1.seg_net.state_dict().items())
    assert all(p.requires_grad for p in model.seg_net.parameters()) and not is_frozen(model.seg_net)
    model.train()
    assert set(model(train_batch(cfg))) == {"loss_bce", "loss_dice", "loss_distance"}


def test_freeze_keeps_eval_mode_and_no_gradient():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    outer = torch.nn.Sequential(net, torch.nn.Linear(2, 2))
    freeze(net)
    outer.train()
    assert outer.training and outer[1].training and not net.training and not net[1].training
    assert not any(p.requires_grad for p in net.parameters()) and all(p.requires_grad for p in outer[1].parameters())


def test_missing_stage1_names_the_command_that_trains_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^MODEL.TWO_STAGE.STAGE1.WEIGHTS: weights file not found: 'runs/s1/"
                                          r"model_final.pth'; produce it with: python tools/train_net.py "
                                          r"--config-file \S*configs/two_stage_unet-tiny.yaml OUTPUT_DIR runs/s1$"):
        tiny_cfg(TS2, "MODEL.TWO_STAGE.STAGE1.WEIGHTS", "runs/s1/model_final.pth")
    # a stage-1 run of TRAIN_STAGE 1 does not use the stage-2 spec it may inherit
    tiny_cfg("two_stage_unet-tiny.yaml", "MODEL.TWO_STAGE.STAGE1.WEIGHTS", "/no/s1.pth")


def test_no_config_keeps_input_targets_by_hand():
    import yaml

    kept = [p.name for p in sorted(CONFIGS.glob("*.yaml"))
            if "TARGETS" in ((yaml.safe_load(p.read_text()) or {}).get("INPUT") or {})]
    assert kept == []


@pytest.mark.parametrize("config", ["nb_unet-tiny.yaml", "two_stage_unet-tiny.yaml", TS2, "brpnet-tiny.yaml",
                                    "brpnet_stage2-tiny.yaml", "distance_unet-tiny.yaml", "panoptic_fusion-tiny.yaml"])
def test_input_targets_follow_from_the_model(config):
    """Setup adds what the model trains on (its meta-architecture's required_targets_of) to INPUT.TARGETS."""
    from nuclei_d2.config import build_cfg

    assert build_cfg(str(CONFIGS / config)).INPUT.TARGETS == []
    cfg = tiny_cfg(config, *RANDOM_INIT_OPTS)
    model = build_model(cfg)
    wanted = getattr(model, "required_targets", ("foreground",))  # PanopticFusionRCNN: its semantic losses' map
    assert list(cfg.INPUT.TARGETS) == list(wanted)
    extra = tiny_cfg(config, *RANDOM_INIT_OPTS, "INPUT.TARGETS", "['distance_raw']")  # users may add extras
    assert list(extra.INPUT.TARGETS) == [*wanted, "distance_raw"]
