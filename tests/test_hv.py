"""HoVer-Net-style horizontal/vertical offset maps for the NB U-Net (issue 24 lever): target, post-processing, TTA
inverse, and training with the real trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_cfg, train_batch

from nuclei_d2.data.targets import build_targets, hv_map
from nuclei_d2.inference.tta import parse_tta_transforms
from nuclei_d2.modeling.dense_base import DenseSegmentor
from nuclei_d2.postprocess import hv_energy, hv_watershed, threshold_components

NB_TINY = "nb_unet-tiny.yaml"
SYNTH = ["DATASETS.TRAIN", "('nuclei_synth_train',)", "DATASETS.TEST", "('nuclei_synth_test',)"]
HV = ["MODEL.NB.HV_HEAD", "True", "MODEL.NB.POSTPROCESS", "hv"]
ALL = ["identity", "hflip", "vflip", "rot90", "rot180", "rot270", "hflip+rot90", "vflip+rot90"]


def touching_discs(shape=(40, 60), r=10, centres=((20, 20), (20, 37))) -> np.ndarray:
    """Two discs of radius ``r`` whose centres are closer than ``2r``: the second keeps only what the first leaves."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    lab = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        lab[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (lab == 0)] = i
    return lab


def blobs() -> np.ndarray:
    """An asymmetric, non-square label map (ellipses, a touching pair, a nucleus cut by the border): a wrong sign or a
    swapped channel cannot hide behind a symmetry."""
    yy, xx = np.mgrid[:37, :52]
    lab = np.zeros((37, 52), np.int32)
    for i, (cy, cx, ry, rx) in enumerate([(10, 12, 6, 9), (11, 27, 8, 5), (27, 40, 5, 11), (30, 8, 9, 4),
                                          (2, 47, 5, 6)], start=1):
        lab[(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1) & (lab == 0)] = i
    return lab


def test_hv_target_of_two_touching_discs_by_hand():
    lab = touching_discs()
    hv = build_targets(lab, ["hv"])["hv"]
    assert hv.shape == (2, 40, 60) and hv.dtype == np.float32
    assert not hv[:, lab == 0].any()  # 0 on background
    for i in (1, 2):
        m = lab == i
        assert hv[0][m].min() == -1 and hv[0][m].max() == 1  # each sign scaled on its own, per nucleus
        assert hv[1][m].min() == -1 and hv[1][m].max() == 1
    # the first disc is whole and symmetric about (20, 20): offsets are (x - 20) / 10 and (y - 20) / 10
    np.testing.assert_allclose(hv[0, 20, 10:31], (np.arange(10, 31) - 20) / 10, atol=1e-6)
    np.testing.assert_allclose(hv[1, 10:31, 20], (np.arange(10, 31) - 20) / 10, atol=1e-6)
    # right of a centre is positive, below it is positive
    assert hv[0, 20, 25] > 0 > hv[0, 20, 15] and hv[1, 25, 20] > 0 > hv[1, 15, 20]
    # where the discs touch, the horizontal map jumps from the first's right side (+1) to the second's left (< 0)
    edge = int(np.nonzero(lab[20] == 2)[0].min())
    assert hv[0, 20, edge - 1] == 1 and hv[0, 20, edge] < -0.7
    # the mapper computes it after the geometric augmentations: flipping the labels flips the map and negates it
    np.testing.assert_allclose(hv_map(lab[:, ::-1])[0], -hv[0][:, ::-1], atol=1e-6)


def test_hv_watershed_splits_touching_discs_that_the_threshold_merges():
    lab = touching_discs()
    hv = hv_map(lab)
    fg = (lab > 0).astype(np.float32)
    assert threshold_components(fg).max() == 1  # the plain threshold merges them
    energy = hv_energy(hv[0], hv[1])
    edge = int(np.nonzero(lab[20] == 2)[0].min())
    assert energy[20, edge - 1:edge + 1].max() > 0.5 and energy[20, 20] == 0 == energy[20, 37]
    out = hv_watershed(fg, hv[0], hv[1])
    assert out.dtype == np.int32 and out.max() == 2
    for i in (1, 2):  # each nucleus found, with its pixels
        j = np.bincount(out[lab == i]).argmax()
        inter = ((out == j) & (lab == i)).sum()
        assert j > 0 and inter / ((out == j) | (lab == i)).sum() > 0.95
    # a foreground component without a marker (no energy below 0) still gets one: nothing predicted is lost
    apart = touching_discs(centres=((20, 12), (20, 45)))
    hv_apart = hv_map(apart)
    assert hv_watershed((apart > 0).astype(np.float32), hv_apart[0], hv_apart[1], energy_threshold=0.0).max() == 2
    with pytest.raises(ValueError, match="Sobel size"):
        hv_energy(hv[0], hv[1], ksize=4)


@pytest.mark.parametrize("name", ALL)
def test_tta_inverse_of_hv_maps_is_the_map_of_the_original_labels(name):
    lab = blobs()
    t = parse_tta_transforms([name])[0]
    moved = t.apply_image(lab[:, :, None].astype(np.float32))[:, :, 0].astype(np.int32)  # the copy's labels
    maps = torch.from_numpy(np.concatenate([(moved > 0)[None].astype(np.float32), hv_map(moved)]))
    back = t.invert_map(maps, *lab.shape, vectors=((1, 2),))
    expected = np.concatenate([(lab > 0)[None].astype(np.float32), hv_map(lab)])
    np.testing.assert_allclose(back.numpy(), expected, atol=1e-5)
    if name != "identity":  # moving the pixels alone gets the offsets wrong
        assert not np.allclose(t.invert_map(maps, *lab.shape).numpy(), expected, atol=1e-5)


class _LabelOracle(DenseSegmentor):
    """A dense 'model' that reads a label map from its input's first channel and predicts its exact maps."""

    prob_names = ("foreground", "horizontal", "vertical")
    vector_maps = (("horizontal", "vertical"),)

    def dense_probs(self, x):
        lab = x[0, 0].round().to(torch.int32).numpy()
        return torch.from_numpy(np.concatenate([(lab > 0)[None].astype(np.float32), hv_map(lab)]))[None]

    def postprocess(self, probs):
        label = hv_watershed(probs[0], probs[1], probs[2])
        return label, np.ones(int(label.max()), np.float32)


def test_test_time_wrapper_averages_hv_maps_in_the_original_frame():
    """TEST.MERGE.MODE "probs": the 8 copies' maps, mapped back by the wrapper, average to the original's maps."""
    from nuclei_d2.inference.test_time import TestTimeWrapper

    lab = blobs()
    model = _LabelOracle(pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3).eval()
    assert model.vector_channels == ((1, 2),)
    wrapper = TestTimeWrapper([model], parse_tta_transforms(ALL), merge="probs")
    inp = {"image": torch.from_numpy(np.repeat(lab[None], 3, 0).astype(np.float32)), "height": 37, "width": 52}
    mean = wrapper.mean_probs(inp)
    np.testing.assert_allclose(mean[1:].numpy(), hv_map(lab), atol=1e-5)


def test_nb_unet_with_hv_head_trains_with_the_real_trainer_and_predicts(tmp_path):
    from nuclei_d2.engine import RANDOM_INIT_OPTS, NucleiTrainer

    torch.manual_seed(0)
    cfg = tiny_cfg(NB_TINY, *SYNTH, *RANDOM_INIT_OPTS, *HV, "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2",
                   "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path))
    assert "hv" in cfg.INPUT.TARGETS  # setup adds the target the head trains on
    trainer = NucleiTrainer(cfg)
    model = trainer.model
    assert model.unet.out_channels == 5 and model.prob_names[3:] == ("horizontal", "vertical")
    trainer.train()
    hist = trainer.storage.histories()
    for key in ("loss_ternary", "loss_hv_mse", "loss_hv_msge", "total_loss"):
        values = [v for v, _ in hist[key].values()]
        assert len(values) == 2 and all(np.isfinite(values)), key
    from detectron2.data import DatasetCatalog

    from nuclei_d2.data.mapper import NucleiDatasetMapper

    model.eval()
    inp = NucleiDatasetMapper(cfg, is_train=False)(DatasetCatalog.get("nuclei_synth_test")[0])
    with torch.no_grad():
        out = model([inp])[0]
    h, w = inp["height"], inp["width"]
    assert out["probs"].shape == (5, h, w) and out["probs"][3:].abs().max() <= 1
    assert out["label_map"].shape == (h, w) and int(out["label_map"].max()) == len(out["instances"])


def test_hv_losses_are_small_for_the_right_maps_and_the_mapper_target_is_the_crops():
    from detectron2.modeling import build_model

    cfg = tiny_cfg(NB_TINY, *SYNTH, *HV)
    batch = train_batch(cfg, 2)
    for d in batch:  # computed on the final (augmented, cropped) label map
        np.testing.assert_allclose(d["targets"]["hv"].numpy(), hv_map(d["label_map"].numpy()), atol=1e-6)
    model = build_model(cfg)
    x, targets, valid = model.prepare_training_batch(batch)
    assert targets["hv"].shape == (2, 2, *valid.shape[-2:])
    nucleus = targets["ternary"] > 0
    right = model.hv_losses(torch.atanh(targets["hv"].clamp(-0.999, 0.999)), targets["hv"], nucleus, valid)
    wrong = model.hv_losses(torch.atanh(-targets["hv"].clamp(-0.999, 0.999)), targets["hv"], nucleus, valid)
    assert right["loss_hv_mse"] < 1e-5 and right["loss_hv_msge"] < 1e-5
    assert wrong["loss_hv_mse"] > 0.01 and wrong["loss_hv_msge"] > 0.01


def test_hv_options_are_checked():
    from detectron2.modeling import build_model

    with pytest.raises(ValueError, match="HV_HEAD True"):
        build_model(tiny_cfg(NB_TINY, "MODEL.NB.POSTPROCESS", "hv"))
    with pytest.raises(ValueError, match="'ternary' or 'hv'"):
        build_model(tiny_cfg(NB_TINY, "MODEL.NB.POSTPROCESS", "watershed"))


def test_hv_cpu_config_is_the_nb_cpu_config_with_the_head():
    cfg = tiny_cfg("nb_unet_hv-cpu.yaml")
    base = tiny_cfg("nb_unet-cpu.yaml")
    assert cfg.MODEL.NB.HV_HEAD and cfg.MODEL.NB.POSTPROCESS == "hv" and "hv" in cfg.INPUT.TARGETS
    assert cfg.SOLVER.MAX_ITER == base.SOLVER.MAX_ITER and cfg.MODEL.UNET == base.MODEL.UNET


@pytest.mark.real_data
def test_hv_post_processing_recovers_real_nuclei_from_their_targets(shared_data):
    """Upper bound on the most crowded Kumar test tile: fed the ideal maps, the HV watershed gives the nuclei back
    (docs/unet_family.md: mean AJI 0.992 over the 14 test tiles, the foreground's components 0.732)."""
    from nuclei_d2.evaluation.metrics import compute_metrics
    from nuclei_d2.utils.io import read_label_map

    gt = read_label_map(shared_data / "monuseg2018" / "train" / "labels" / "TCGA-KB-A93J-01A-01-TS1.png")
    gt = gt.astype(np.int32)
    hv = hv_map(gt)
    fg = (gt > 0).astype(np.float32)
    m = compute_metrics(gt, hv_watershed(fg, hv[0], hv[1]), hausdorff=False)
    assert m["AJI"] > 0.97 and m["F1"] > 0.98, m
    assert compute_metrics(gt, threshold_components(fg), hausdorff=False)["AJI"] < m["AJI"] - 0.1
