"""Dense targets on small hand-made label maps whose expected outputs are worked out by hand."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from nuclei_d2.data.targets import (
    TARGET_NAMES,
    boundary_map,
    build_targets,
    distance_map,
    eroded_foreground,
    foreground_map,
    instance_distance,
    rebinarize_ternary,
    ternary_map,
    touching_pixels,
)
from nuclei_d2.layers import edge_weight_map


def _square(size: int = 7, lo: int = 1, hi: int = 6, value: int = 1) -> np.ndarray:
    lab = np.zeros((size, size), dtype=np.int32)
    lab[lo:hi, lo:hi] = value
    return lab


# Two 3x3 nuclei side by side, touching along columns 3|4.
TOUCHING = np.array([
    [0, 0, 0, 0, 0, 0, 0, 0],
    [0, 5, 5, 5, 9, 9, 9, 0],
    [0, 5, 5, 5, 9, 9, 9, 0],
    [0, 5, 5, 5, 9, 9, 9, 0],
    [0, 0, 0, 0, 0, 0, 0, 0],
], dtype=np.int32)


def test_foreground():
    assert foreground_map(TOUCHING).tolist() == (TOUCHING > 0).astype(int).tolist()
    assert foreground_map(TOUCHING).dtype == np.uint8


def test_ternary_5x5_square_width_1_and_2():
    lab = _square()  # 5x5 nucleus in a 7x7 image
    t1 = ternary_map(lab, boundary_width=1)
    exp1 = np.zeros((7, 7), int)
    exp1[1:6, 1:6] = 1  # outer ring of the nucleus: boundary
    exp1[2:5, 2:5] = 2  # 3x3 core: inside
    assert t1.tolist() == exp1.tolist()
    t2 = ternary_map(lab, boundary_width=2)
    exp2 = np.zeros((7, 7), int)
    exp2[1:6, 1:6] = 1
    exp2[3, 3] = 2  # only the centre is farther than 2 px from the outside (distance 3)
    assert t2.tolist() == exp2.tolist()
    assert boundary_map(lab, 2).tolist() == (exp2 == 1).astype(int).tolist()


def test_ternary_touching_contour_is_boundary_for_both():
    t = ternary_map(TOUCHING, boundary_width=1)
    exp = np.where(TOUCHING > 0, 1, 0)
    exp[2, 2] = 2  # the centre of each 3x3 nucleus
    exp[2, 5] = 2
    assert t.tolist() == exp.tolist()
    # Merged into one nucleus, the shared contour pixels (2,3) and (2,4) become inside.
    merged = ternary_map((TOUCHING > 0).astype(np.int32), boundary_width=1)
    assert merged[2, 3] == 2 and merged[2, 4] == 2 and t[2, 3] == 1 and t[2, 4] == 1


def test_distance_square_normalised_and_raw():
    lab = _square(value=3)
    raw = distance_map(lab, normalize=False)
    exp = np.zeros((7, 7))
    exp[1:6, 1:6] = 1
    exp[2:5, 2:5] = 2
    exp[3, 3] = 3
    np.testing.assert_allclose(raw, exp)
    np.testing.assert_allclose(distance_map(lab), exp / 3, rtol=1e-6)
    assert distance_map(lab).dtype == np.float32


def test_distance_touching_nuclei_peak_at_one_each():
    d = distance_map(TOUCHING)
    # Each 3x3 nucleus: ring at distance 1, centre at distance 2 -> normalised 0.5 and 1.
    assert d[2, 2] == pytest.approx(1.0) and d[2, 5] == pytest.approx(1.0)
    assert d[1, 3] == pytest.approx(0.5) and d[2, 4] == pytest.approx(0.5)
    assert (d[TOUCHING == 0] == 0).all()


def test_image_border_convention():
    lab = np.array([[1, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=np.int32)
    # The image border is no contour: the top row is 2 px from the background row.
    assert instance_distance(lab, normalize=False).tolist() == [[2, 2, 2], [1, 1, 1], [0, 0, 0]]
    # ... unless asked: then every pixel touches the border or the background.
    assert instance_distance(lab, normalize=False, border_is_contour=True).tolist() == [[1, 1, 1], [1, 1, 1],
                                                                                         [0, 0, 0]]
    assert ternary_map(lab, 1).tolist() == [[2, 2, 2], [1, 1, 1], [0, 0, 0]]
    assert ternary_map(lab, 1, border_is_contour=True).tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0]]
    full = np.ones((4, 4), dtype=np.int32)
    assert (ternary_map(full, 2) == 2).all()
    assert (distance_map(full) == 1).all()


def test_filter_boundary_equals_distance_transform_definition():
    """The morphology shortcut must agree with 'distance to the nearest other pixel <= w' on random maps."""
    rng = np.random.default_rng(0)
    lab = np.zeros((80, 90), dtype=np.int32)
    for i in range(1, 40):  # overlapping random discs: touching nuclei, later wins
        cy, cx, r = rng.integers(0, 80), rng.integers(0, 90), rng.integers(2, 9)
        yy, xx = np.ogrid[:80, :90]
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i * 7  # non-consecutive values
    for border in (False, True):
        padded = np.pad(lab, 1) if border else lab
        for w in (1, 1.5, 2, 3):
            raw = np.zeros(padded.shape)
            for v in np.unique(padded)[1:]:
                m = padded == v
                raw[m] = ndimage.distance_transform_edt(m)[m]
            if border:
                raw = raw[1:-1, 1:-1]
            exp = np.where(lab > 0, 2, 0)
            exp[(lab > 0) & (raw <= w)] = 1
            assert (ternary_map(lab, w, border_is_contour=border) == exp).all(), (border, w)
            np.testing.assert_allclose(instance_distance(lab, False, border_is_contour=border), raw, rtol=1e-6)


def test_touching_pixels_and_eroded_foreground():
    touch = touching_pixels(TOUCHING)
    exp = np.zeros_like(TOUCHING, dtype=bool)
    exp[1:4, 3:5] = True
    assert touch.tolist() == exp.tolist()
    # Remove the touching columns, no erosion.
    e0 = eroded_foreground(TOUCHING, erode_radius=0)
    assert e0.tolist() == ((TOUCHING > 0) & ~exp).astype(int).tolist()
    # Diagonal-only contact counts with 8-connectivity but not with 4.
    diag = np.array([[1, 0], [0, 2]], dtype=np.int32)
    assert touching_pixels(diag, connectivity=2).tolist() == [[True, False], [False, True]]
    assert not touching_pixels(diag, connectivity=1).any()
    # Erosion by radius 1 (the 4-neighbour cross) of a 5x5 square leaves its 3x3 core.
    e1 = eroded_foreground(_square(), erode_radius=1)
    exp1 = np.zeros((7, 7), int)
    exp1[2:5, 2:5] = 1
    assert e1.tolist() == exp1.tolist()
    # Radius 2 (5x5 disk) leaves only the centre.
    e2 = eroded_foreground(_square(), erode_radius=2)
    assert e2.sum() == 1 and e2[3, 3] == 1
    # The image border does not erode.
    assert eroded_foreground(np.ones((3, 3), np.int32), erode_radius=1).sum() == 9


def test_rebinarize_rules():
    v = np.array([[0.0, 0.4, 0.5, 0.9, 1.2, 1.49, 1.5, 2.0]])
    assert rebinarize_ternary(v, enforce_enclosure=False).tolist() == [[0, 0, 1, 1, 1, 1, 2, 2]]
    # Other encodings: background 0, boundary 128, inside 255.
    v2 = np.array([[10.0, 70.0, 128.0, 190.0, 195.0]])  # 190 -> 1.49 (boundary), 195 -> 1.53
    assert rebinarize_ternary(v2, values=(0, 128, 255), enforce_enclosure=False).tolist() == [[0, 1, 1, 1, 2]]
    # Enclosure: an inside pixel next to background becomes boundary; one next to inside stays.
    assert rebinarize_ternary(np.array([[0.0, 2.0, 2.0]])).tolist() == [[0, 1, 2]]
    # Exact ternary maps are unchanged.
    t = ternary_map(TOUCHING, 1)
    assert (rebinarize_ternary(t.astype(np.float32)) == t).all()
    with pytest.raises(ValueError, match="thresholds"):
        rebinarize_ternary(v, thresholds=(1.5, 0.5))


def test_rebinarize_after_bilinear_rotation_keeps_nuclei_enclosed():
    import cv2

    t = ternary_map(_square(21, 4, 17), boundary_width=2).astype(np.float32)
    m = cv2.getRotationMatrix2D((10, 10), 30, 1.0)
    rotated = cv2.warpAffine(t, m, (21, 21), flags=cv2.INTER_LINEAR)
    assert len(np.unique(rotated)) > 3  # interpolation made non-class values
    r = rebinarize_ternary(rotated)
    assert set(np.unique(r)) <= {0, 1, 2}
    inside = r == 2
    bg = ndimage.binary_dilation(r == 0)
    assert not (inside & bg).any()  # no inside pixel touches background


def test_edge_weight_map_3x3_by_hand():
    w = edge_weight_map((3, 3))
    corner = 0.5 / (0.5 + np.sqrt(2.0))  # De = 0.5, Dc = sqrt(1^2 + 1^2)
    ratio = np.array([[corner, 1 / 3, corner], [1 / 3, 1.0, 1 / 3], [corner, 1 / 3, corner]])
    alpha = 1 / ratio.mean()
    np.testing.assert_allclose(w, alpha * ratio, rtol=1e-6)
    assert w.mean() == pytest.approx(1.0, rel=1e-6)
    assert edge_weight_map((3, 3)) is w  # cached per shape
    assert not w.flags.writeable
    assert edge_weight_map(np.zeros((4, 6, 3))).shape == (4, 6)


def test_build_targets_dispatch_and_errors():
    out = build_targets(TOUCHING, ["ternary", "distance", "distance_raw", "eroded", "edge_weight", "foreground",
                                   "boundary"], boundary_width=1, erode_radius=0)
    assert set(out) == {"ternary", "distance", "distance_raw", "eroded", "edge_weight", "foreground", "boundary"}
    assert (out["ternary"] == ternary_map(TOUCHING, 1)).all()
    assert (out["boundary"] == boundary_map(TOUCHING, 1)).all()
    assert (out["eroded"] == eroded_foreground(TOUCHING, 0)).all()
    np.testing.assert_allclose(out["distance"], distance_map(TOUCHING))
    np.testing.assert_allclose(out["distance_raw"], distance_map(TOUCHING, normalize=False))
    assert out["edge_weight"].flags.writeable and out["edge_weight"].shape == TOUCHING.shape
    assert build_targets(TOUCHING, []) == {}
    with pytest.raises(ValueError, match="unknown dense target"):
        build_targets(TOUCHING, ["ternery"])
    with pytest.raises(ValueError, match="unknown target parameter"):
        build_targets(TOUCHING, ["ternary"], boundary_widht=2)
    with pytest.raises(ValueError, match="2-D"):
        build_targets(np.zeros((2, 2, 2), np.int32), ["foreground"])
    with pytest.raises(ValueError, match="integers"):
        build_targets(np.zeros((2, 2), np.float32), ["foreground"])


def test_empty_label_map():
    lab = np.zeros((5, 6), dtype=np.int32)
    out = build_targets(lab, [n for n in TARGET_NAMES if n != "edge_weight"])
    for name, arr in out.items():
        assert arr.shape[-2:] == (5, 6) and not arr.any(), name  # ("hv" is 2 x H x W)


def test_speed_on_a_crowded_1000x1000_tile():
    """~600 nuclei on 1000x1000: all targets well under a second each (generous bound for shared CI CPUs)."""
    rng = np.random.default_rng(1)
    lab = np.zeros((1000, 1000), dtype=np.int32)
    yy, xx = np.mgrid[-12:13, -12:13]
    k = 0
    for cy in range(20, 1000, 40):
        for cx in range(20, 1000, 40):
            k += 1
            r = rng.uniform(8, 14)  # radii up to 14 on a 40 px grid: some neighbours touch
            disk = (yy ** 2 + xx ** 2) <= r * r
            y0, x0 = cy - 12, cx - 12
            sub = lab[y0:y0 + 25, x0:x0 + 25]
            sub[disk[:sub.shape[0], :sub.shape[1]]] = k
    assert k == 625
    t = time.perf_counter()
    out = build_targets(lab, list(TARGET_NAMES))
    elapsed = time.perf_counter() - t
    assert len(out) == len(TARGET_NAMES)
    assert elapsed < 3.0, f"all targets took {elapsed:.2f} s"
