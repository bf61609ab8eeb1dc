"""NucleiDatasetMapper with extra input channels, dense targets and the config-built augmentations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.utils.env import seed_all_rng
from PIL import Image

from nuclei_d2.config import add_nuclei_config
from nuclei_d2.data.augment import RandomRot90
from nuclei_d2.data.mapper import NucleiDatasetMapper
from nuclei_d2.data.synthetic import make_synthetic_tile
from nuclei_d2.data.targets import distance_map, eroded_foreground, ternary_map
from nuclei_d2.layers import edge_weight_map
from nuclei_d2.stain import StainNormalizer, hematoxylin_channel
from nuclei_d2.structures import label_map_to_annotations


@pytest.fixture
def tile(tmp_path):
    image, label = make_synthetic_tile(96, 3)
    Image.fromarray(image).save(tmp_path / "tile.png")
    d = {"file_name": str(tmp_path / "tile.png"), "height": 96, "width": 96, "image_id": 0,
         "annotations": label_map_to_annotations(label)}
    return d, image, label


def test_extra_channels_and_targets_identity(tile):
    d, image, label = tile
    mapper = NucleiDatasetMapper(True, augmentations=[], extra_channels=["hematoxylin", "distance"],
                                 targets=["ternary", "distance", "eroded", "edge_weight"],
                                 target_params={"boundary_width": 1, "erode_radius": 1})
    out = mapper(d)
    img = out["image"]
    assert img.shape == (5, 96, 96) and img.dtype == torch.float32
    np.testing.assert_array_equal(img[:3].permute(1, 2, 0).numpy(), image)
    np.testing.assert_allclose(img[3].numpy(), hematoxylin_channel(image) * 255.0, rtol=1e-6)
    # label i of the mapper is annotation i-1: the same nuclei as the tile's label map, relabelled.
    lab = out["label_map"].numpy()
    np.testing.assert_allclose(img[4].numpy(), distance_map(lab) * 255.0, rtol=1e-6)
    assert (img[4].numpy() > 0).sum() == (label > 0).sum()
    t = out["targets"]
    assert set(t) == {"ternary", "distance", "eroded", "edge_weight"}
    assert t["ternary"].dtype == torch.uint8 and t["distance"].dtype == torch.float32
    np.testing.assert_array_equal(t["ternary"].numpy(), ternary_map(lab, 1))
    np.testing.assert_array_equal(t["eroded"].numpy(), eroded_foreground(lab, 1))
    np.testing.assert_allclose(t["edge_weight"].numpy(), edge_weight_map((96, 96)))
    for v in t.values():
        assert tuple(v.shape) == (96, 96)


def test_channels_follow_augmentation(tile):
    d, _, _ = tile
    mapper = NucleiDatasetMapper(True, augmentations=[RandomRot90(1.0)], extra_channels=["hematoxylin", "distance"],
                                 targets=["boundary"])
    for seed in range(4):
        seed_all_rng(seed)
        out = mapper(d)
        rgb = out["image"][:3].permute(1, 2, 0).numpy().astype(np.uint8)
        lab = out["label_map"].numpy()
        # Extra channels are computed from the augmented image / label map, so they agree with them.
        np.testing.assert_allclose(out["image"][3].numpy(), hematoxylin_channel(rgb) * 255.0, rtol=1e-6)
        np.testing.assert_allclose(out["image"][4].numpy() / 255.0, distance_map(lab), rtol=1e-5)
        assert ((out["targets"]["boundary"].numpy() > 0) <= (lab > 0)).all()
        for k, m in enumerate(out["instances"].gt_masks.tensor.numpy()):
            assert len(np.unique(lab[m])) == 1, k


def test_inference_distance_channel_is_zero_and_bgr(tile, caplog):
    d, image, _ = tile
    mapper = NucleiDatasetMapper(False, augmentations=[], extra_channels=["hematoxylin", "distance"],
                                 image_format="BGR", keep_gt=True, targets=["foreground"])
    out = mapper(d)
    assert out["image"].shape == (5, 96, 96)
    np.testing.assert_array_equal(out["image"][:3].permute(1, 2, 0).numpy(), image[:, :, ::-1])
    # haematoxylin is computed from RGB even when the tensor is BGR
    np.testing.assert_allclose(out["image"][3].numpy(), hematoxylin_channel(image) * 255.0, rtol=1e-6)
    assert not out["image"][4].any()
    assert "targets" in out and out["targets"]["foreground"].any()
    # Without ground truth there are no targets, and the image still has its five channels.
    plain = NucleiDatasetMapper(False, augmentations=[], extra_channels=["hematoxylin", "distance"],
                                targets=["foreground"])({k: v for k, v in d.items() if k != "annotations"})
    assert plain["image"].shape == (5, 96, 96) and "targets" not in plain


def test_oracle_distance_at_inference_comes_from_the_ground_truth(tile):
    d, _, label = tile
    mapper = NucleiDatasetMapper(False, augmentations=[], extra_channels=["distance"], distance_from_gt_at_test=True)
    out = mapper(d)
    np.testing.assert_allclose(out["image"][3].numpy(), distance_map(label) * 255.0, rtol=1e-5, atol=1e-3)
    assert out["image"][3].max() > 200  # nucleus centres
    # No ground truth: zeros, as without the oracle.
    plain = mapper({k: v for k, v in d.items() if k != "annotations"})
    assert not plain["image"][3].any()


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="EXTRA_CHANNELS.*'eosin'"):
        NucleiDatasetMapper(True, augmentations=[], extra_channels=["eosin"])
    with pytest.raises(ValueError, match="TARGETS.*'ternery'"):
        NucleiDatasetMapper(True, augmentations=[], targets=["ternery"])


def test_from_config_with_everything_on(tile, tmp_path):
    d, image, _ = tile
    cfg = get_cfg()
    add_nuclei_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN = (0,)
    cfg.INPUT.MIN_SIZE_TEST = 0
    cfg.INPUT.FORMAT = "RGB"  # Detectron2's default is BGR
    ref, _ = make_synthetic_tile(96, 11)
    Image.fromarray(ref).save(tmp_path / "ref.png")
    n = cfg.INPUT.NUCLEI
    n.STAIN_NORM, n.STAIN_REFERENCE = "vahadane", str(tmp_path / "ref.png")
    n.CROP_SIZE = 64
    for key in ("RESCALE", "ELASTIC", "HED_JITTER", "HUE", "BRIGHTNESS_CONTRAST", "BLUR", "NOISE"):
        n[key].PROB = 0.5
    cfg.INPUT.EXTRA_CHANNELS = ["hematoxylin", "distance"]
    cfg.INPUT.TARGETS = ["ternary", "distance", "eroded", "edge_weight"]
    cfg.INPUT.BOUNDARY_WIDTH = 1
    mapper = NucleiDatasetMapper(cfg, is_train=True)
    assert mapper.target_params == {"boundary_width": 1, "erode_radius": 1, "border_is_contour": False}
    for seed in range(6):
        seed_all_rng(seed)
        out = mapper(d)
        if out is None:  # a crop without nuclei is filtered
            continue
        c, h, w = out["image"].shape
        assert c == 5 and max(h, w) <= 64
        lab = out["label_map"].numpy()
        assert lab.shape == (h, w)
        np.testing.assert_array_equal(out["targets"]["ternary"].numpy(), ternary_map(lab, 1))
        assert out["targets"]["edge_weight"].shape == (h, w)
    # Inference: only the stain normalisation, applied to the full image.
    test_mapper = NucleiDatasetMapper(cfg, is_train=False)
    out = test_mapper({k: v for k, v in d.items() if k != "annotations"})
    expected = StainNormalizer("vahadane").fit(ref).transform(image)
    np.testing.assert_array_equal(out["image"][:3].permute(1, 2, 0).numpy(), expected)
