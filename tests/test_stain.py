"""Stain normalisation, reference choice and colour deconvolution on images built from known stain vectors."""

from __future__ import annotations

import json
import pickle
import time

import numpy as np
import pytest
from PIL import Image

from nuclei_d2.stain import (
    HEMATOXYLIN_SCALE,
    RUIFROK_HE,
    StainEstimationError,
    StainNormalizationWarning,
    StainNormalizer,
    choose_reference,
    color_deconvolution,
    estimate_stains,
    hematoxylin_channel,
    od_to_rgb,
    rgb_to_od,
)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


# Two different "scanners": Ruifrok's H&E, and a bluer H with a more purple E.
STAINS_A = RUIFROK_HE.copy()
STAINS_B = np.stack([_unit([0.55, 0.78, 0.30]), _unit([0.20, 0.90, 0.38])])


def _he_image(stains: np.ndarray, size: int = 200, seed: int = 0, h_scale: float = 1.0, e_scale: float = 1.0
              ) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like image from known stains: background, eosin tissue, and haematoxylin nuclei (mixtures too).

    Returns the uint8 RGB image and the true concentrations (H x W x 2).
    """
    rng = np.random.default_rng(seed)
    conc = np.zeros((size, size, 2))
    yy, xx = np.mgrid[:size, :size]
    tissue = (xx + yy) < 1.6 * size  # a corner of empty glass
    conc[..., 1] = np.where(tissue, rng.uniform(0.15, 0.8, (size, size)), 0.0) * e_scale
    for _ in range(size // 6):
        cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(4, 9))]
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        conc[..., 0][disk] = rng.uniform(0.5, 1.2) * h_scale
        conc[..., 1][disk] *= rng.uniform(0.0, 0.3)  # nuclei: mostly haematoxylin, some pure
    od = conc @ stains
    return od_to_rgb(od), conc


def _angle(u: np.ndarray, v: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(_unit(u) @ _unit(v), -1, 1))))


# ---- optical density / deconvolution ----------------------------------------------------------------------------


def test_od_roundtrip_and_convention():
    rgb = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    od = rgb_to_od(rgb)
    assert od[15, 15, 0] == 0.0  # white (255) has zero density
    assert od[0, 0, 0] == pytest.approx(np.log10(256))  # black: the largest density
    np.testing.assert_array_equal(od_to_rgb(od), rgb)


def test_color_deconvolution_recovers_known_concentrations():
    img, conc = _he_image(STAINS_A, 120)
    c = color_deconvolution(img)
    # uint8 quantisation limits accuracy; the OD step of one grey level is at most ~0.004 below OD 1.
    assert np.abs(c[..., 0] - conc[..., 0]).mean() < 0.01
    assert np.abs(c[..., 1] - conc[..., 1]).mean() < 0.01
    assert np.abs(c[..., 2]).mean() < 0.01  # no residual stain


def test_hematoxylin_channel_scale_dtype_and_white():
    img, conc = _he_image(STAINS_A, 120)
    h = hematoxylin_channel(img)
    assert h.dtype == np.float32 and 0 <= h.min() and h.max() <= 1
    expected = np.clip(conc[..., 0] / HEMATOXYLIN_SCALE, 0, 1)
    assert np.abs(h - expected).mean() < 0.01
    h8 = hematoxylin_channel(img, dtype=np.uint8)
    assert h8.dtype == np.uint8 and abs(int(h8.max()) - round(float(h.max()) * 255)) <= 1
    white = np.full((8, 8, 3), 255, np.uint8)
    assert not hematoxylin_channel(white).any()
    assert not hematoxylin_channel(white, normalize="percentile").any()
    hp = hematoxylin_channel(img, normalize="percentile")
    assert hp.max() == pytest.approx(1.0) and (hp >= h).all()
    with pytest.raises(ValueError, match="uint8"):
        hematoxylin_channel(img.astype(np.float32))


def test_hematoxylin_agrees_with_skimage_rgb2hed():
    from skimage.color import rgb2hed

    img, _ = _he_image(STAINS_A, 120)
    ours = hematoxylin_channel(img).ravel()
    theirs = rgb2hed(img)[..., 0].ravel()  # same H vector, DAB instead of residual as third: a different scale
    assert np.corrcoef(ours, theirs)[0, 1] > 0.95


# ---- stain estimation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,tol", [("macenko", 1.0), ("vahadane", 3.0)])
def test_estimate_recovers_known_stain_vectors(method, tol):
    for stains in (STAINS_A, STAINS_B):
        img, _ = _he_image(stains, 200)
        est = estimate_stains(img, method)
        assert est.stain_matrix.shape == (2, 3)
        assert _angle(est.stain_matrix[0], stains[0]) < tol, (method, est.stain_matrix)
        assert _angle(est.stain_matrix[1], stains[1]) < tol, (method, est.stain_matrix)


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_normalise_to_itself_is_near_identity(method):
    img, _ = _he_image(STAINS_A, 160)
    out = StainNormalizer(method).fit(img).transform(img)
    diff = np.abs(out.astype(int) - img)
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 3


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_normalise_moves_stains_to_the_reference(method):
    ref, _ = _he_image(STAINS_B, 160, seed=1)
    src, _ = _he_image(STAINS_A, 160, seed=2, h_scale=0.6, e_scale=1.4)
    norm = StainNormalizer(method).fit(ref)
    out = norm.transform(src)
    est = estimate_stains(out, method)
    for i in range(2):
        assert _angle(est.stain_matrix[i], STAINS_B[i]) < 6.0
        assert _angle(est.stain_matrix[i], STAINS_A[i]) > _angle(est.stain_matrix[i], STAINS_B[i])
    # Concentration ranges are matched to the reference's.
    np.testing.assert_allclose(est.max_concentrations, norm.max_concentrations, rtol=0.1)
    # A pre-computed source estimate gives the same result.
    np.testing.assert_array_equal(norm.apply(src, norm.estimate(src)), out)


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_deterministic(method):
    img, _ = _he_image(STAINS_A, 160, seed=3)
    ref, _ = _he_image(STAINS_B, 160, seed=4)
    a = StainNormalizer(method).fit(ref).transform(img)
    b = StainNormalizer(method).fit(ref).transform(img)
    np.testing.assert_array_equal(a, b)


def test_input_is_not_modified():
    img, _ = _he_image(STAINS_A, 64)
    img[0, 0] = 0  # a black pixel (staintools rewrites these in place)
    before = img.copy()
    StainNormalizer("vahadane").fit(img).transform(img)
    np.testing.assert_array_equal(img, before)


# ---- edge cases -------------------------------------------------------------------------------------------------


def test_edge_cases_fit_raises_transform_passes_through():
    norm = StainNormalizer("macenko").fit(_he_image(STAINS_A, 96)[0])
    white = np.full((64, 64, 3), 255, np.uint8)
    grey = np.full((64, 64, 3), 120, np.uint8)
    noisy_grey = np.clip(120 + np.random.default_rng(0).integers(-3, 4, (64, 64, 1)), 0, 255).astype(np.uint8)
    noisy_grey = noisy_grey.repeat(3, axis=2)  # grey with brightness noise: OD along one direction only
    tiny = _he_image(STAINS_A, 200)[0][100:103, 100:103]
    for name, img, match in [("white", white, "tissue pixels"), ("grey", grey, "plane|distinct stains"),
                             ("noisy grey", noisy_grey, "plane|distinct stains"), ("tiny", tiny, "tissue pixels")]:
        with pytest.raises(StainEstimationError, match=match):
            StainNormalizer("macenko").fit(img, name=name)
        with pytest.warns(StainNormalizationWarning, match="passed through unchanged"):
            out = norm.transform(img)
        np.testing.assert_array_equal(out, img)
    strict = StainNormalizer("macenko", on_failure="raise").fit(_he_image(STAINS_A, 96)[0])
    with pytest.raises(StainEstimationError):
        strict.transform(white)
    with pytest.raises(StainEstimationError, match="reference.png"):
        StainNormalizer("vahadane").fit(white, name="reference.png")


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        StainNormalizer("reinhard")
    with pytest.raises(RuntimeError, match="before fit"):
        StainNormalizer().transform(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        estimate_stains(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="H x W x 3"):
        estimate_stains(np.zeros((4, 4), np.uint8))


# ---- persistence ------------------------------------------------------------------------------------------------


def test_json_and_pickle_roundtrip(tmp_path):
    ref, _ = _he_image(STAINS_B, 128)
    src, _ = _he_image(STAINS_A, 128, seed=5)
    norm = StainNormalizer("vahadane").fit(ref, name="ref.tif")
    path = norm.save(tmp_path / "norm.json")
    data = json.loads(path.read_text())
    assert data["method"] == "vahadane" and len(data["stain_matrix"]) == 2 and data["reference"] == "ref.tif"
    loaded = StainNormalizer.load(path)
    np.testing.assert_array_equal(loaded.transform(src), norm.transform(src))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(norm)).transform(src), norm.transform(src))
    # from_reference: JSON reused as is (method must match), image paths fitted.
    assert StainNormalizer.from_reference(path, "vahadane").reference == "ref.tif"
    with pytest.raises(ValueError, match="fitted with 'vahadane'"):
        StainNormalizer.from_reference(path, "macenko")
    Image.fromarray(ref).save(tmp_path / "ref.png")
    fitted = StainNormalizer.from_reference(tmp_path / "ref.png", "vahadane")
    np.testing.assert_allclose(fitted.stain_matrix, norm.stain_matrix)
    # Bad files name themselves.
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        StainNormalizer.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="other.json.*not a nuclei_d2 stain normaliser"):
        StainNormalizer.load(tmp_path / "other.json")
    broken = dict(data, stain_matrix=[[1, 0, 0]])
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="broken.json.*2x3"):
        StainNormalizer.load(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        StainNormalizer.load(tmp_path / "missing.json")
    with pytest.raises(RuntimeError, match="unfitted"):
        StainNormalizer().save(tmp_path / "x.json")


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_transform_speed_1000x1000(method):
    ref, _ = _he_image(STAINS_B, 300, seed=6)
    big, _ = _he_image(STAINS_A, 1000, seed=7)
    norm = StainNormalizer(method).fit(ref)
    norm.transform(big)  # warm-up
    t = time.perf_counter()
    norm.transform(big)
    elapsed = time.perf_counter() - t
    assert elapsed < 1.0, f"{method} transform of 1000x1000 took {elapsed:.2f} s"


# ---- reference choice -------------------------------------------------------------------------------------------


def test_choose_reference_by_hand(tmp_path):
    a = np.full((4, 4, 3), 10, np.uint8)
    b = a.copy()
    b[2:] = 20  # half 10, half 20: exactly the mean histogram of {a, b, c}
    c = np.full((4, 4, 3), 20, np.uint8)
    for metric in ("chi2", "l1"):
        choice = choose_reference([a, b, c], metric=metric, progress=False)
        assert choice.index == 1 and choice.scores[1] == pytest.approx(0.0)
        assert choice.scores[0] > 0 and choice.scores[0] == pytest.approx(choice.scores[2])
    assert choose_reference([a, b, c], method="medoid", progress=False).index == 1
    paths = []
    for name, img in zip("abc", (a, b, c)):
        Image.fromarray(img).save(tmp_path / f"{name}.png")
        paths.append(tmp_path / f"{name}.png")
    assert choose_reference(paths, progress=False).name == str(paths[1])
    with pytest.raises(ValueError, match="at least one"):
        choose_reference([])
    with pytest.raises(FileNotFoundError):
        choose_reference([tmp_path / "nope.png"], progress=False)


# ---- a real MoNuSeg tile ----------------------------------------------------------------------------------------


@pytest.mark.real_data
def test_real_monuseg_tile(shared_data):
    from nuclei_d2.utils.io import read_image_rgb, read_label_map

    images = sorted((shared_data / "monuseg2018" / "train" / "images").glob("*.tif"))
    if len(images) < 2:
        pytest.skip("MoNuSeg tiles missing from the shared data folder")
    ref, src = read_image_rgb(images[0]), read_image_rgb(images[1])
    label = read_label_map(shared_data / "monuseg2018" / "train" / "labels" / f"{images[1].stem}.png")
    for method in ("macenko", "vahadane"):
        norm = StainNormalizer(method).fit(ref)
        t = time.perf_counter()
        out = norm.transform(src)
        assert time.perf_counter() - t < 1.0
        assert out.shape == src.shape and out.dtype == np.uint8
        assert np.abs(norm.transform(ref).astype(int) - ref).mean() < 10  # near identity on itself
    # Independent check of our Macenko against torchstain's on the same tile.
    import torchstain

    ts = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    ts.fit(ref)
    ours = estimate_stains(ref, "macenko").stain_matrix
    assert _angle(ours[0], ts.HERef[:, 0]) < 3 and _angle(ours[1], ts.HERef[:, 1]) < 5
    # The haematoxylin channel is much stronger on annotated nuclei than elsewhere.
    h = hematoxylin_channel(src)
    assert h[label > 0].mean() > 2 * h[label == 0].mean()
