"""Post-processing functions on hand-made probability maps with hand-worked expectations."""

from __future__ import annotations

import numpy as np
import pytest

from nuclei_d2.data.targets import distance_map, eroded_foreground, ternary_map
from nuclei_d2.postprocess import (
    distance_watershed,
    equivalent_radius,
    expand_labels,
    fill_holes,
    foreground_components,
    instance_scores,
    nb_postprocess,
    remove_small_objects,
    threshold_components,
)


def disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def match_all(gt: np.ndarray, pred: np.ndarray, min_iou: float) -> None:
    """Every ground-truth nucleus has exactly one prediction with IoU >= min_iou, and there is nothing else."""
    gt_ids = [v for v in np.unique(gt) if v]
    pred_ids = [v for v in np.unique(pred) if v]
    assert len(pred_ids) == len(gt_ids), (len(pred_ids), len(gt_ids))
    for g in gt_ids:
        best = max(iou(gt == g, pred == p) for p in pred_ids)
        assert best >= min_iou, (g, best)


def test_threshold_components_connectivity_and_min_size():
    p = np.zeros((5, 6))
    p[0, 0] = p[1, 1] = 0.9  # diagonal neighbours
    p[3, 2:5] = 0.7  # a 3-pixel bar
    p[0, 5] = 0.5  # exactly at the threshold: not foreground
    lab4 = threshold_components(p, 0.5, connectivity=1)
    assert lab4.max() == 3 and lab4.dtype == np.int32
    assert threshold_components(p, 0.5, connectivity=2).max() == 2
    small_removed = threshold_components(p, 0.5, connectivity=1, min_size=2)
    assert small_removed.max() == 1 and (small_removed[3, 2:5] == 1).all() and small_removed.sum() == 3


def test_remove_small_objects_renumbers():
    lab = np.array([[7, 7, 0, 3], [7, 0, 0, 0], [0, 0, 9, 9]], dtype=np.int32)
    out = remove_small_objects(lab, 2)
    # 3 (one pixel) goes; 7 -> 1, 9 -> 2 (increasing original value).
    assert out.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 2, 2]]


def test_fill_holes_keeps_an_object_inside_the_hole():
    lab = np.zeros((7, 7), dtype=np.int32)
    lab[1:6, 1:6] = 4
    lab[2:5, 2:5] = 0  # a 3x3 hole ...
    lab[3, 3] = 8  # ... holding another object
    out = fill_holes(lab)
    assert out[3, 3] == 8
    assert (out[2:5, 2:5][np.arange(9).reshape(3, 3) != 4] == 4).all()
    assert (out[0] == 0).all() and out.sum() == 4 * 24 + 8


def test_expand_labels_by_hand():
    single = np.zeros((7, 7), dtype=np.int32)
    single[3, 3] = 1
    # Euclidean disks: radius 1 -> the 4-neighbour cross (5 px), sqrt(2) -> 3x3 (9 px), 2 -> 13 px.
    assert (expand_labels(single, 1) > 0).sum() == 5
    assert (expand_labels(single, 1.5) > 0).sum() == 9
    assert (expand_labels(single, 2) > 0).sum() == 13
    # Two seeds competing: each pixel goes to the nearest one; nothing already labelled changes.
    two = np.zeros((1, 9), dtype=np.int32)
    two[0, 1], two[0, 6] = 5, 2
    assert expand_labels(two, 2).tolist() == [[5, 5, 5, 5, 2, 2, 2, 2, 2]]
    # A mask limits the growth.
    mask = np.ones((1, 9), dtype=bool)
    mask[0, 3:5] = False
    assert expand_labels(two, 2, mask=mask).tolist() == [[5, 5, 5, 0, 0, 2, 2, 2, 2]]
    assert expand_labels(two, 0).tolist() == two.tolist()


def test_instance_scores_and_equivalent_radius():
    lab = np.array([[1, 1, 0], [2, 0, 0]], dtype=np.int32)
    prob = np.array([[0.2, 0.6, 0.9], [0.7, 0.0, 0.0]])
    np.testing.assert_allclose(instance_scores(lab, prob), [0.4, 0.7], rtol=1e-6)
    np.testing.assert_allclose(instance_scores(lab, prob, n=3), [0.4, 0.7, 0.0], rtol=1e-6)
    assert instance_scores(np.zeros((2, 2), np.int32), np.zeros((2, 2))).shape == (0,)
    mask = np.zeros((10, 10), dtype=bool)
    mask[0:2, 0:2] = True  # area 4
    mask[5:9, 5:9] = True  # area 16
    assert equivalent_radius(mask) == pytest.approx(np.sqrt(10 / np.pi))
    assert equivalent_radius(mask.astype(np.int32) * 3) == pytest.approx(np.sqrt(20 / np.pi))  # one label
    assert equivalent_radius(np.zeros((3, 3), bool)) == 0.0


def test_nb_postprocess_square_by_hand():
    """A 9x9 nucleus with a 2 px boundary: inside is its 5x5 core; growing the core by 2 px (Euclidean) gives the
    square back except the 3 corner pixels farther than 2 px from the core, at each of the 4 corners."""
    lab = np.zeros((11, 11), dtype=np.int32)
    lab[1:10, 1:10] = 1
    t = ternary_map(lab, boundary_width=2)
    assert (t == 2).sum() == 25
    probs = np.eye(3)[t].transpose(2, 0, 1)
    out, scores = nb_postprocess(probs[2], boundary_width=2)
    expected = lab.copy()
    for y, x in [(1, 1), (1, 2), (2, 1)]:
        for yy, xx in [(y, x), (y, 10 - x), (10 - y, x), (10 - y, 10 - x)]:
            expected[yy, xx] = 0
    assert out.tolist() == expected.tolist()
    assert out.sum() == 81 - 12
    np.testing.assert_allclose(scores, [1.0])


def test_nb_postprocess_recovers_touching_discs():
    """Known instances (some touching) -> ternary map -> soft probabilities -> the same instances back."""
    shape = (96, 128)
    gt = np.zeros(shape, dtype=np.int32)
    centres = [(20, 20, 9), (20, 37, 8), (60, 30, 11), (50, 90, 10), (62, 102, 8), (82, 70, 6)]
    for i, (cy, cx, r) in enumerate(centres, start=1):
        gt[disc(shape, cy, cx, r)] = i  # (20,20)/(20,37) and (50,90)/(62,102) touch
    t = ternary_map(gt, boundary_width=2)
    rng = np.random.default_rng(0)
    probs = np.eye(3)[t].transpose(2, 0, 1) * 0.7 + 0.1 + rng.uniform(-0.05, 0.05, (3, *shape))
    out, scores = nb_postprocess(probs[2], boundary_width=2)
    match_all(gt, out, min_iou=0.85)
    assert scores.shape == (len(centres),) and (scores > 0.7).all()
    # Without the boundary class the two touching pairs would merge: the inside class is what separates them.
    merged, _ = nb_postprocess((gt > 0).astype(float), boundary_width=2)
    assert merged.max() == len(centres) - 2


def test_nb_postprocess_foreground_restriction_and_min_size():
    inside = np.zeros((9, 9))
    inside[4, 4] = 0.9
    inside[0, 0] = 0.9
    fg = np.zeros((9, 9), dtype=bool)
    fg[3:6, 3:6] = True
    out, _ = nb_postprocess(inside, boundary_width=2, foreground=fg | (inside > 0.5))
    assert (out == out[4, 4]).sum() == 9  # growth stopped at the 3x3 foreground
    out2, scores2 = nb_postprocess(inside, boundary_width=1, min_size=2)
    assert out2.max() == 0 and scores2.shape == (0,)


def test_distance_watershed_splits_two_touching_discs():
    shape = (64, 80)
    gt = np.zeros(shape, dtype=np.int32)
    gt[disc(shape, 32, 28, 12)] = 1
    gt[disc(shape, 32, 51, 12)] = 2  # overlaps the first: one merged foreground blob
    fg = (gt > 0).astype(np.float32)
    assert threshold_components(fg).max() == 1  # a plain threshold sees one object
    out = distance_watershed(fg, distance_map(gt), min_size=20)
    match_all(gt, out, min_iou=0.9)
    # Even the distance transform of the merged blob has one maximum per disc: still two objects.
    assert distance_watershed(fg, distance_map((gt > 0).astype(np.int32))).max() == 2
    # A single disc is never split (its smoothed distance map has one maximum).
    one = disc(shape, 32, 40, 15).astype(np.int32)
    assert distance_watershed(one.astype(np.float32), distance_map(one)).max() == 1


def test_distance_watershed_on_a_stage1_like_eroded_foreground():
    """The stage-1 output is the eroded, touch-free foreground; the watershed stays inside it."""
    shape = (64, 80)
    gt = np.zeros(shape, dtype=np.int32)
    gt[disc(shape, 32, 28, 12)] = 1
    gt[disc(shape, 32, 51, 12)] = 2
    fg = eroded_foreground(gt, erode_radius=1).astype(np.float32)
    out = distance_watershed(fg, distance_map(gt))
    assert out.max() == 2
    assert not (out[fg == 0] > 0).any()
    grown = distance_watershed(fg, distance_map(gt), dilate=2)
    assert (grown > 0).sum() > (out > 0).sum()
    match_all(gt, grown, min_iou=0.85)


def test_distance_watershed_keeps_marker_less_objects_removes_small_fills_holes():
    shape = (40, 40)
    fg = np.zeros(shape, dtype=np.float32)
    fg[disc(shape, 10, 10, 6)] = 1
    fg[disc(shape, 28, 28, 8)] = 1
    fg[28, 28] = 0  # a hole: filled
    fg[2, 35] = fg[2, 36] = 1  # 2 pixels: removed (< 20)
    out = distance_watershed(fg, np.zeros(shape, np.float32))  # flat distance: no peak above the threshold
    assert out.max() == 2  # each component still got a marker
    assert out[28, 28] == out[27, 28] != 0
    assert out[2, 35] == 0
    assert distance_watershed(np.zeros(shape), np.zeros(shape)).max() == 0
    with pytest.raises(ValueError, match="differ in shape"):
        distance_watershed(fg, np.zeros((3, 3)))


def test_foreground_components():
    fg = np.zeros((20, 20))
    fg[2:8, 2:8] = 0.9
    fg[12:18, 12:18] = 0.9
    fg[15, 15] = 0.1  # hole
    fg[0, 19] = 0.9  # 1 px
    out = foreground_components(fg, min_size=20)
    assert out.max() == 2 and out[15, 15] == out[12, 12] and out[0, 19] == 0
    grown = foreground_components(fg, min_size=20, dilate=1)
    assert (grown > 0).sum() == (out > 0).sum() + 2 * 4 * 6


def test_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        threshold_components(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="connectivity"):
        threshold_components(np.zeros((2, 2)), connectivity=3)


@pytest.mark.real_data
@pytest.mark.parametrize("tile", ["TCGA-21-5784-01Z-00-DX1", "TCGA-KB-A93J-01A-01-TS1"])  # median / most crowded
def test_post_processing_recovers_real_nuclei_from_their_targets(shared_data, tile):
    """Upper bound of each post-processing on real Kumar test tiles: fed the ideal maps (the targets made from the
    ground truth), NB post-processing must give the nuclei back almost exactly; the two-stage watershed, which works
    in the eroded stage-1 foreground, loses the eroded rim but must still find every nucleus."""
    from nuclei_d2.evaluation.metrics import compute_metrics
    from nuclei_d2.utils.io import read_label_map

    gt = read_label_map(shared_data / "monuseg2018" / "train" / "labels" / f"{tile}.png").astype(np.int32)
    nb, _ = nb_postprocess((ternary_map(gt, 2) == 2).astype(np.float32), boundary_width=2)
    m = compute_metrics(gt, nb, hausdorff=False)
    assert m["AJI"] > 0.95 and m["F1"] > 0.95, m
    ws = distance_watershed(eroded_foreground(gt, 1).astype(np.float32), distance_map(gt))
    m = compute_metrics(gt, ws, hausdorff=False)
    assert m["AJI"] > 0.75 and m["F1"] > 0.95, m
    m2 = compute_metrics(gt, distance_watershed(eroded_foreground(gt, 1).astype(np.float32), distance_map(gt),
                                                dilate=2), hausdorff=False)
    assert m2["AJI"] > m["AJI"]  # growing back the eroded rim helps


def test_first_maximum_per_label_agrees_with_scipy():
    from scipy import ndimage

    from nuclei_d2.postprocess import _first_maximum_per_label

    rng = np.random.default_rng(1)
    for _ in range(10):
        comps, n = ndimage.label(ndimage.binary_opening(rng.random((120, 150)) > 0.5))
        values = rng.random(comps.shape).astype(np.float32)  # continuous: no ties
        which = np.sort(rng.choice(np.arange(1, n + 1), size=max(1, n // 3), replace=False))
        expected = np.ravel_multi_index(np.asarray(ndimage.maximum_position(values, comps, which)).T, comps.shape)
        np.testing.assert_array_equal(_first_maximum_per_label(values, comps, which), expected)
    ties = np.zeros((3, 4), np.float32)
    label = np.array([[1, 1, 0, 2], [1, 1, 0, 2], [0, 0, 0, 2]])
    np.testing.assert_array_equal(_first_maximum_per_label(ties, label, np.array([1, 2])), [0, 3])
