"""Augmentations: image and label map move together, labels stay labels, colour changes leave geometry alone."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from conftest import REPO
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.utils.env import seed_all_rng

from nuclei_d2.config import add_nuclei_config
from nuclei_d2.data.augment import (
    BrightnessContrastTransform,
    ElasticTransform,
    GaussianBlurTransform,
    GaussianNoiseTransform,
    HEDJitterTransform,
    HueTransform,
    NucleiAwareRandomCrop,
    NucleiResizeShortestEdge,
    RandomElastic,
    RandomGaussianNoise,
    RandomHEDJitter,
    RandomRescale,
    RandomRot90,
    RescaleTransform,
    Rot90Transform,
    StainNormalization,
    build_nuclei_augmentation,
)
from nuclei_d2.data.synthetic import make_synthetic_tile
from nuclei_d2.stain import StainNormalizer, color_deconvolution


def _label_map(h: int = 60, w: int = 80, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros((h, w), dtype=np.int32)
    yy, xx = np.ogrid[:h, :w]
    for i in range(1, 16):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(3, 9)
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1000 + 37 * i  # large, non-consecutive labels
    return lab


def _encode(label: np.ndarray) -> tuple[np.ndarray, dict[int, tuple[int, int, int]]]:
    """An RGB image whose colour at each pixel encodes its label (background white)."""
    rng = np.random.default_rng(1)
    values = np.unique(label)
    lut = {0: (255, 255, 255)}
    for v in values[values > 0]:
        lut[int(v)] = tuple(int(c) for c in rng.integers(0, 200, 3))
    img = np.zeros(label.shape + (3,), dtype=np.uint8)
    for v, c in lut.items():
        img[label == v] = c
    return img, lut


def _decoded_agreement(img: np.ndarray, label: np.ndarray, lut: dict) -> float:
    exp = np.zeros_like(img)
    for v, c in lut.items():
        exp[label == v] = c
    return float((np.abs(exp.astype(int) - img).max(axis=2) <= 1).mean())


GEOMETRIC_EXACT = [
    RandomRot90(),
    T.RandomFlip(prob=1.0, horizontal=True, vertical=False),
    T.RandomFlip(prob=1.0, horizontal=False, vertical=True),
    NucleiAwareRandomCrop(32, nucleus_prob=1.0),
    RandomRescale((0.6, 1.7), interp="nearest"),
    RandomElastic(alpha=300.0, sigma=6.0, interp="nearest"),
]


@pytest.mark.parametrize("aug", GEOMETRIC_EXACT, ids=lambda a: type(a).__name__)
def test_label_and_image_stay_aligned_exactly_with_nearest(aug):
    label = _label_map()
    img, lut = _encode(label)
    for seed in range(5):
        seed_all_rng(seed)
        inp = T.AugInput(img.copy(), sem_seg=label.copy())
        T.AugmentationList([aug])(inp)
        assert inp.sem_seg.dtype == np.int32
        assert inp.image.shape[:2] == inp.sem_seg.shape
        assert set(np.unique(inp.sem_seg)) <= set(np.unique(label))
        assert _decoded_agreement(inp.image, inp.sem_seg, lut) == 1.0


def test_linear_interpolation_keeps_alignment_inside_nuclei():
    label = _label_map(120, 140)
    img, lut = _encode(label)
    seed_all_rng(3)
    inp = T.AugInput(img, sem_seg=label)
    T.AugmentationList([RandomRescale((1.3, 1.3)), RandomElastic(alpha=300.0, sigma=8.0), RandomRot90(1.0)])(inp)
    assert set(np.unique(inp.sem_seg)) <= set(np.unique(label))
    # Linear interpolation blends colours only along label edges.
    assert _decoded_agreement(inp.image, inp.sem_seg, lut) > 0.9


def test_extra_channels_follow_geometry():
    label = _label_map()
    img, _ = _encode(label)
    extra = np.stack([label.astype(np.float32), (label > 0).astype(np.float32)], axis=2)
    stacked = np.concatenate([img.astype(np.float32), extra], axis=2)  # H x W x 5 float
    seed_all_rng(0)
    for aug in [RandomRot90(1.0), RandomRescale((1.5, 1.5), interp="nearest"),
                RandomElastic(200.0, 6.0, interp="nearest")]:
        inp = T.AugInput(stacked.copy(), sem_seg=label.copy())
        T.AugmentationList([aug])(inp)
        assert inp.image.shape[2] == 5
        np.testing.assert_array_equal(inp.image[:, :, 3], inp.sem_seg.astype(np.float32))


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_rot90_inverse_and_coords_exact(k):
    rng = np.random.default_rng(k)
    img = rng.integers(0, 255, (7, 11, 4)).astype(np.uint8)
    t = Rot90Transform(7, 11, k)
    out = t.apply_image(img)
    assert out.shape[:2] == ((11, 7) if k % 2 else (7, 11)) == t.output_size
    np.testing.assert_array_equal(t.inverse().apply_image(out), img)
    np.testing.assert_array_equal(out, np.rot90(img, k))
    # A pixel centre maps onto the pixel that now holds the same value.
    for (i, j) in [(0, 0), (2, 9), (6, 10), (3, 4)]:
        c = t.apply_coords(np.array([[j + 0.5, i + 0.5]]))
        x, y = c[0]
        np.testing.assert_array_equal(out[int(np.floor(y)), int(np.floor(x))], img[i, j])
        back = t.inverse().apply_coords(c.copy())
        np.testing.assert_allclose(back, [[j + 0.5, i + 0.5]])
    # Boxes go through apply_coords (corners).
    box = t.apply_box(np.array([[1.0, 2.0, 4.0, 3.0]]))
    assert box.shape == (1, 4) and (box[0, 2:] > box[0, :2]).all()


def test_rescale_int32_labels_and_inverse():
    label = _label_map()
    t = RescaleTransform(60, 80, 90, 120)
    up = t.apply_segmentation(label)
    assert up.dtype == np.int32 and up.shape == (90, 120)
    assert set(np.unique(up)) <= set(np.unique(label))
    # Doubling with nearest then halving is the identity.
    t2 = RescaleTransform(60, 80, 120, 160)
    np.testing.assert_array_equal(t2.inverse().apply_segmentation(t2.apply_segmentation(label)), label)
    assert t.apply_image(np.zeros((60, 80, 1), np.uint8)).shape == (90, 120, 1)
    # Detectron2's own ResizeShortestEdge cannot resize int32 label maps; ours can.
    inp = T.AugInput(np.zeros((60, 80, 3), np.uint8), sem_seg=label)
    NucleiResizeShortestEdge([120], 1000, "choice")(inp)
    assert inp.sem_seg.shape == (120, 160) and inp.sem_seg.dtype == np.int32


def test_elastic_labels_integer_in_set_and_deformed():
    label = _label_map(128, 128)
    seed_all_rng(0)
    tfm = RandomElastic(alpha=100.0, sigma=10.0).get_transform(np.zeros((128, 128, 3), np.uint8))
    assert isinstance(tfm, ElasticTransform)
    out = tfm.apply_segmentation(label)
    assert out.dtype == np.int32
    assert set(np.unique(out)) <= set(np.unique(label))
    assert (out != label).any()  # it did deform
    # rms displacement ~ alpha * 0.163 / sigma = 1.6 px (documented); allow sampling variation.
    rms = float(np.sqrt((tfm.dx ** 2 + tfm.dy ** 2).mean() / 2))
    assert 0.8 < rms < 3.2
    # int64 / uint16 label maps keep their dtype.
    assert tfm.apply_segmentation(label.astype(np.int64)).dtype == np.int64
    assert tfm.apply_segmentation(label.astype(np.uint16)).dtype == np.uint16


def test_nucleus_aware_crop_contains_the_nucleus():
    label = np.zeros((400, 400), np.int32)
    label[300:306, 20:26] = 7
    img = np.zeros((400, 400, 3), np.uint8)
    aug = NucleiAwareRandomCrop(64, nucleus_prob=1.0)
    for seed in range(20):
        seed_all_rng(seed)
        t = aug.get_transform(img, label)
        assert (t.apply_segmentation(label) == 7).any()
        assert t.apply_image(img).shape == (64, 64, 3)
    # Larger than the image: no crop along that axis.
    t = NucleiAwareRandomCrop((500, 64)).get_transform(img, label)
    assert t.apply_image(img).shape == (400, 64, 3)
    assert NucleiAwareRandomCrop(400).get_transform(img, None).apply_image(img).shape == (400, 400, 3)


def _touching_pair_and_singles() -> np.ndarray:
    """A 400x400 label map: two touching nuclei in one corner, isolated nuclei everywhere else."""
    label = np.zeros((400, 400), np.int32)
    k = 3
    for y in range(20, 390, 40):
        for x in range(20, 390, 40):
            if y > 150 or x > 150:
                label[y:y + 8, x:x + 8] = k
                k += 1
    label[40:48, 40:48] = 1
    label[40:48, 48:56] = 2  # touches nucleus 1
    return label


def test_contact_crop_shows_touching_nuclei():
    label = _touching_pair_and_singles()
    img = np.zeros((400, 400, 3), np.uint8)
    contact = NucleiAwareRandomCrop(64, nucleus_prob=1.0, contact_prob=1.0)
    nucleus = NucleiAwareRandomCrop(64, nucleus_prob=1.0)
    pair_in_contact, pair_in_nucleus = 0, 0
    for seed in range(40):
        seed_all_rng(seed)
        crop = contact.get_transform(img, label).apply_segmentation(label)
        pair_in_contact += bool((crop == 1).any() and (crop == 2).any())
        seed_all_rng(seed)
        crop = nucleus.get_transform(img, label).apply_segmentation(label)
        pair_in_nucleus += bool((crop == 1).any() and (crop == 2).any())
    assert pair_in_contact == 40  # every crop holds the only touching pair
    assert pair_in_nucleus < 20  # the nucleus-pixel draw rarely does (2 of ~70 nuclei)
    # No touching nuclei: falls back to a nucleus pixel.
    single = np.where(label > 2, label, 0)
    for seed in range(10):
        seed_all_rng(seed)
        assert (contact.get_transform(img, single).apply_segmentation(single) > 0).any()
    with pytest.raises(ValueError, match="contact_prob must be a probability"):
        NucleiAwareRandomCrop(64, contact_prob=1.5)


def test_contact_crop_config():
    from nuclei_d2.engine import setup_cfg
    from nuclei_d2.engine.defaults import ConfigError

    cfg = get_cfg()
    add_nuclei_config(cfg)
    cfg.INPUT.NUCLEI.CROP_SIZE = 64
    cfg.INPUT.NUCLEI.CROP_CONTACT_PROB = 0.7
    (crop,) = [a for a in build_nuclei_augmentation(cfg, True) if isinstance(a, NucleiAwareRandomCrop)]
    assert crop.contact_prob == 0.7
    tiny = str(REPO / "configs" / "maskrcnn_baseline-tiny.yaml")
    with pytest.raises(ConfigError, match=r"^INPUT.NUCLEI.CROP_CONTACT_PROB places .* needs INPUT.NUCLEI.CROP_SIZE"):
        setup_cfg(tiny, ["INPUT.NUCLEI.CROP_CONTACT_PROB", "0.5"])
    with pytest.raises(ConfigError, match=r"^INPUT.NUCLEI.CROP_NUCLEUS_PROB must be a probability .*got 2.0$"):
        setup_cfg(tiny, ["INPUT.NUCLEI.CROP_NUCLEUS_PROB", "2"])
    # Accepted with the nucleus-aware crop in place of Detectron2's.
    cfg = setup_cfg(tiny, ["INPUT.CROP.ENABLED", "False", "INPUT.NUCLEI.CROP_SIZE", "128",
                           "INPUT.NUCLEI.CROP_CONTACT_PROB", "0.5"])
    assert cfg.INPUT.NUCLEI.CROP_CONTACT_PROB == 0.5


def _he_tile(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    return make_synthetic_tile(size, 0)


PHOTOMETRIC = [
    HEDJitterTransform([1.1, 0.9, 1.0], [0.02, -0.02, 0.0]),
    HueTransform(0.05),
    BrightnessContrastTransform(1.1, 0.9),
    GaussianBlurTransform(1.0),
    GaussianNoiseTransform(5.0, seed=3),
]


@pytest.mark.parametrize("tfm", PHOTOMETRIC, ids=lambda t: type(t).__name__)
def test_photometric_leaves_labels_coords_and_extra_channels(tfm):
    img, label = _he_tile()
    seg = tfm.apply_segmentation(label)
    assert seg is label
    coords = np.array([[3.0, 4.0]])
    np.testing.assert_array_equal(tfm.apply_coords(coords.copy()), coords)
    out = tfm.apply_image(img)
    assert out.dtype == np.uint8 and out.shape == img.shape and (out != img).any()
    extra = np.concatenate([img, label[:, :, None].astype(np.uint8)], axis=2)
    out4 = tfm.apply_image(extra)
    np.testing.assert_array_equal(out4[:, :, 3], extra[:, :, 3])
    np.testing.assert_array_equal(out4[:, :, :3], out)


def test_hed_jitter_identity_and_scaling():
    img, _ = _he_tile()
    same = HEDJitterTransform([1, 1, 1], [0, 0, 0]).apply_image(img)
    assert np.abs(same.astype(int) - img).max() <= 1
    h_before = color_deconvolution(img)[:, :, 0]
    out = HEDJitterTransform([1.5, 1.0, 1.0], [0, 0, 0]).apply_image(img)
    h_after = color_deconvolution(out)[:, :, 0]
    strong = h_before > 0.2  # clearly stained, far from saturation
    ratio = np.median(h_after[strong] / h_before[strong])
    assert ratio == pytest.approx(1.5, rel=0.05)


def test_hue_brightness_contrast_by_hand():
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    green = HueTransform(1 / 3).apply_image(red)  # 120 degrees: red -> green
    assert (green[..., 1] >= 250).all() and (green[..., 0] <= 5).all()
    grey = np.full((2, 2, 3), 100, np.uint8)
    assert (BrightnessContrastTransform(1.2, 1.0).apply_image(grey) == 120).all()
    two = np.array([[[50] * 3, [150] * 3]], dtype=np.uint8)  # mean 100
    assert BrightnessContrastTransform(1.0, 2.0).apply_image(two)[0, :, 0].tolist() == [0, 200]
    assert (GaussianBlurTransform(0.0).apply_image(two) == two).all()


def test_noise_reproducible_and_sized():
    img = np.full((64, 64, 3), 128, np.uint8)
    a = GaussianNoiseTransform(6.0, seed=1).apply_image(img)
    b = GaussianNoiseTransform(6.0, seed=1).apply_image(img)
    c = GaussianNoiseTransform(6.0, seed=2).apply_image(img)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert a.astype(float).std() == pytest.approx(6.0, rel=0.1)
    seed_all_rng(0)
    t = RandomGaussianNoise((2.0, 3.0)).get_transform(img)
    assert 2.0 <= t.std <= 3.0


def test_probability_zero_is_noop():
    img, label = _he_tile(32)
    for aug in [RandomRot90(0.0), RandomElastic(prob=0.0), RandomHEDJitter(prob=0.0), RandomRescale(prob=0.0)]:
        inp = T.AugInput(img.copy(), sem_seg=label.copy())
        aug(inp)
        np.testing.assert_array_equal(inp.image, img)


def test_stain_normalization_augmentation_image_only():
    img, label = _he_tile(128)
    ref, _ = make_synthetic_tile(128, 5)
    aug = StainNormalization(StainNormalizer("macenko").fit(ref))
    inp = T.AugInput(img.copy(), sem_seg=label.copy())
    aug(inp)
    np.testing.assert_array_equal(inp.sem_seg, label)
    assert inp.image.shape == img.shape and inp.image.dtype == np.uint8
    white = np.full((32, 32, 3), 255, np.uint8)
    with pytest.warns(UserWarning, match="passed through"):
        t = aug.get_transform(white)
    np.testing.assert_array_equal(t.apply_image(white), white)
    with pytest.raises(ValueError, match="fitted"):
        StainNormalization(StainNormalizer("macenko"))


def _cfg():
    cfg = get_cfg()
    add_nuclei_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN = (0,)
    cfg.INPUT.MIN_SIZE_TEST = 0
    return cfg


def test_build_from_config_defaults_and_everything_on(tmp_path):
    cfg = _cfg()
    names = [type(a).__name__ for a in build_nuclei_augmentation(cfg, True)]
    assert names == ["RandomFlip", "RandomFlip", "RandomRot90"]  # flips and rotations are on by default
    assert build_nuclei_augmentation(cfg, False) == []

    ref, _ = make_synthetic_tile(96, 7)
    ref_json = tmp_path / "ref.json"
    StainNormalizer("macenko").fit(ref).save(ref_json)
    n = cfg.INPUT.NUCLEI
    n.STAIN_NORM, n.STAIN_REFERENCE = "macenko", str(ref_json)
    n.CROP_SIZE = 48
    for key in ("RESCALE", "ELASTIC", "HED_JITTER", "HUE", "BRIGHTNESS_CONTRAST", "BLUR", "NOISE"):
        n[key].PROB = 1.0
    augs = build_nuclei_augmentation(cfg, True)
    assert [type(a).__name__ for a in augs] == [
        "StainNormalization", "RandomRescale", "NucleiAwareRandomCrop", "RandomFlip", "RandomFlip", "RandomRot90",
        "RandomElastic", "RandomHEDJitter", "RandomHue", "RandomBrightnessContrast", "RandomGaussianBlur",
        "RandomGaussianNoise"]
    assert [type(a).__name__ for a in build_nuclei_augmentation(cfg, False)] == ["StainNormalization"]
    # The whole pipeline runs on an image + int32 label map, and survives pickling (data-loader workers).
    augs = pickle.loads(pickle.dumps(augs))
    img, label = _he_tile(96)
    seed_all_rng(0)
    inp = T.AugInput(img, sem_seg=label)
    T.AugmentationList(augs)(inp)
    assert inp.image.dtype == np.uint8 and inp.sem_seg.dtype == np.int32 and inp.sem_seg.shape == inp.image.shape[:2]
    assert max(inp.sem_seg.shape) <= 48
    assert set(np.unique(inp.sem_seg)) <= set(np.unique(label))


def test_config_errors(tmp_path):
    cfg = _cfg()
    cfg.INPUT.NUCLEI.STAIN_NORM = "macenko"
    with pytest.raises(ValueError, match="STAIN_REFERENCE"):
        build_nuclei_augmentation(cfg, True)
    cfg.INPUT.NUCLEI.STAIN_NORM = "reinhard"
    with pytest.raises(ValueError, match="STAIN_NORM"):
        build_nuclei_augmentation(cfg, True)
    cfg.INPUT.NUCLEI.STAIN_NORM = "vahadane"
    cfg.INPUT.NUCLEI.STAIN_REFERENCE = str(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        build_nuclei_augmentation(cfg, False)


def test_fixed_magnification_resizes_before_the_crop_and_at_inference():
    # INPUT.NUCLEI.SCALE 1.5: at inference the 128 px synthetic tile reaches the model at 192 px while its predictions
    # are asked at 128 (height / width); in training the whole image is magnified before the 64 px crop, so the
    # nuclei in a crop are 1.5x as wide as without it.
    from conftest import tiny_cfg
    from detectron2.data import DatasetCatalog

    from nuclei_d2.data.mapper import NucleiDatasetMapper
    from nuclei_d2.engine import setup_cfg
    from nuclei_d2.engine.defaults import ConfigError

    synth = ("DATASETS.SYNTHETIC.IMAGE_SIZE", "128")
    cfg = tiny_cfg("nb_unet-tiny.yaml", *synth, "INPUT.NUCLEI.SCALE", "1.5")
    record = DatasetCatalog.get("nuclei_synth_test")[0]
    out = NucleiDatasetMapper(cfg, is_train=False)(dict(record))
    assert tuple(out["image"].shape[-2:]) == (192, 192) and (out["height"], out["width"]) == (128, 128)
    augs = build_nuclei_augmentation(cfg, True)
    assert type(augs[0]).__name__ == "RandomRescale" and augs[0].scale_range == (1.5, 1.5) and augs[0].prob == 1.0

    def mean_area(scale: str) -> float:
        c = tiny_cfg("nb_unet-tiny.yaml", *synth, "INPUT.NUCLEI.SCALE", scale, "INPUT.NUCLEI.CROP_SIZE", "0")
        sample = NucleiDatasetMapper(c, is_train=True)(dict(DatasetCatalog.get("nuclei_synth_train")[0]))
        labels = sample["label_map"].numpy()
        assert labels.shape == sample["image"].shape[-2:]
        ids, areas = np.unique(labels[labels > 0], return_counts=True)
        return float(areas.mean())

    assert mean_area("1.5") / mean_area("1.0") == pytest.approx(2.25, rel=0.1)
    with pytest.raises(ConfigError, match=r"^INPUT.NUCLEI.SCALE must be > 0 .*got 0.0$"):
        setup_cfg(str(REPO / "configs" / "nb_unet-tiny.yaml"), ["INPUT.NUCLEI.SCALE", "0"])
