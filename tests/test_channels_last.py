"""MODEL.CHANNELS_LAST: every method trains and predicts the same with channels-last weights as without."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CONFIGS, tiny_cfg
from detectron2.data import DatasetCatalog
from detectron2.utils.events import EventStorage

from nuclei_d2.data.mapper import NucleiDatasetMapper
from nuclei_d2.engine import RANDOM_INIT_OPTS, NucleiTrainer
from nuclei_d2.inference import NucleiPredictor
from nuclei_d2.modeling import build_nuclei_model, to_memory_format

TINY = sorted(p.name for p in CONFIGS.glob("*-tiny.yaml"))
SYNTH = ["DATASETS.TRAIN", "('nuclei_synth_train',)", "DATASETS.TEST", "('nuclei_synth_test',)"]


def _is_channels_last(model: torch.nn.Module) -> bool:
    convs = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1]
    return bool(convs) and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)


@pytest.mark.parametrize("name", TINY)
def test_channels_last_gives_the_same_losses_and_predictions(name):
    torch.manual_seed(0)
    cfg = tiny_cfg(name, *SYNTH, *RANDOM_INIT_OPTS)
    nchw = build_nuclei_model(cfg)
    nhwc = to_memory_format(copy.deepcopy(nchw), True)
    assert not _is_channels_last(nchw) and _is_channels_last(nhwc)
    mapper = NucleiDatasetMapper(cfg, is_train=True)
    batch = [b for b in (mapper(d) for d in DatasetCatalog.get("nuclei_synth_train")[:3]) if b is not None][:2]
    losses = []
    for model in (nchw, nhwc):
        model.train()
        for m in model.modules():  # dropout draws its mask in memory order: it differs between layouts
            if isinstance(m, torch.nn.modules.dropout._DropoutNd):
                m.eval()
        torch.manual_seed(1)  # same proposal / RoI sampling for both
        with EventStorage(0):
            loss = model(copy.deepcopy(batch))
        losses.append({k: float(v.detach()) for k, v in loss.items()})
    assert losses[0].keys() == losses[1].keys()
    for k in losses[0]:
        assert losses[1][k] == pytest.approx(losses[0][k], rel=1e-3, abs=1e-5), k
    test_input = NucleiDatasetMapper(cfg, is_train=False)(DatasetCatalog.get("nuclei_synth_test")[0])
    outs = []
    for model in (nchw, nhwc):
        model.eval()
        with torch.no_grad():
            outs.append(model([copy.deepcopy(test_input)])[0]["instances"])
    a, b = outs
    assert len(b) == len(a)
    if len(a):
        agree = (a.pred_masks == b.pred_masks).float().mean()
        assert agree > 0.999


def test_config_switch_reaches_trainer_and_predictor():
    cfg = tiny_cfg("nb_unet-tiny.yaml", *SYNTH, "MODEL.CHANNELS_LAST", "True")
    assert _is_channels_last(NucleiTrainer.build_model(cfg))
    assert _is_channels_last(NucleiPredictor(cfg).model)
    off = tiny_cfg("nb_unet-tiny.yaml", *SYNTH)
    assert not off.MODEL.CHANNELS_LAST and not _is_channels_last(NucleiTrainer.build_model(off))


def test_checkpoints_load_across_layouts(tmp_path):
    """A channels-last model loads a contiguous checkpoint (and vice versa) into the same values, keeping its layout."""
    from detectron2.checkpoint import DetectionCheckpointer

    opts = [*SYNTH, *RANDOM_INIT_OPTS]
    a = build_nuclei_model(tiny_cfg("two_stage_unet_stage2-tiny.yaml", *opts))
    DetectionCheckpointer(a, str(tmp_path)).save("nchw")
    b = build_nuclei_model(tiny_cfg("two_stage_unet_stage2-tiny.yaml", *opts, "MODEL.CHANNELS_LAST", "True"))
    DetectionCheckpointer(b).load(str(tmp_path / "nchw.pth"))
    assert _is_channels_last(b)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    DetectionCheckpointer(b, str(tmp_path)).save("nhwc")
    c = build_nuclei_model(tiny_cfg("two_stage_unet_stage2-tiny.yaml", *opts))
    DetectionCheckpointer(c).load(str(tmp_path / "nhwc.pth"))
    assert not _is_channels_last(c)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values(), strict=True))
