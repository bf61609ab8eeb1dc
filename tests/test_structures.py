"""Label map <-> COCO RLE <-> Instances conversions (nuclei_d2/structures.py)."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from nuclei_d2.structures import (
    annotations_to_label_map,
    instances_to_label_map,
    label_map_to_annotations,
    label_map_to_instances,
    label_values,
    masks_to_label_map,
    relabel_sequential,
    rle_counts,
)


def _random_label_map(rng, h=120, w=90, n=40):
    label = np.zeros((h, w), dtype=np.int64)
    for _ in range(n):
        r, c = rng.integers(0, h), rng.integers(0, w)
        rr, cc = rng.integers(2, 9, size=2)
        label[r:r + rr, c:c + cc] = rng.integers(1, 10_000)  # arbitrary, non-consecutive values
    return label


def test_relabel_sequential_and_values():
    label = np.array([[0, 7, 7], [300, 0, 7], [300, 5, 0]])
    assert label_values(label).tolist() == [5, 7, 300]
    assert relabel_sequential(label).tolist() == [[0, 2, 2], [3, 0, 2], [3, 1, 0]]
    big = np.array([[0, 2**40]], dtype=np.int64)  # values too large for a lookup table still work
    assert relabel_sequential(big).tolist() == [[0, 1]]


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_is_exact(seed):
    rng = np.random.default_rng(seed)
    label = _random_label_map(rng)
    annos = label_map_to_annotations(label)
    assert len(annos) == len(label_values(label))
    back = annotations_to_label_map(annos, *label.shape)
    np.testing.assert_array_equal(back, relabel_sequential(label))
    for a in annos:
        m = mask_util.decode(a["segmentation"]).astype(bool)
        assert m.sum() == a["area"]
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_rle_matches_pycocotools_encoding():
    rng = np.random.default_rng(0)
    label = _random_label_map(rng, 64, 50, 10)
    for value, anno in zip(label_values(label), label_map_to_annotations(label)):
        ref = mask_util.encode(np.asfortranarray((label == value).astype(np.uint8)))
        assert anno["segmentation"]["counts"] == ref["counts"].decode()
        assert rle_counts(anno["segmentation"]) == rle_counts(ref)


def test_empty_label_map_and_categories():
    assert label_map_to_annotations(np.zeros((5, 5), np.uint16)) == []
    annos = label_map_to_annotations(np.array([[1, 0], [0, 2]]), categories={2: 3})
    assert [a["category_id"] for a in annos] == [0, 3]
    with pytest.raises(ValueError, match="2-D"):
        label_map_to_annotations(np.zeros((2, 2, 2), int))
    with pytest.raises(ValueError, match="integers"):
        label_map_to_annotations(np.full((2, 2), 0.5))


def test_later_annotation_wins_and_polygons():
    a = {"segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]}  # polygon, 4x4-ish square
    b = {"segmentation": mask_util.encode(np.asfortranarray(np.pad(np.ones((2, 2), np.uint8), ((2, 2), (2, 2)))))}
    out = annotations_to_label_map([a, b], 6, 6)
    assert out[3, 3] == 2 and out[1, 1] == 1
    with pytest.raises(ValueError, match="RLE size"):
        annotations_to_label_map([b], 7, 6)


def test_overlaps_go_to_the_highest_score():
    masks = np.zeros((3, 4, 4), bool)
    masks[0, :, :3] = True
    masks[1, :, 1:] = True
    masks[2, 0, 0] = True
    out = masks_to_label_map(masks, scores=np.array([0.9, 0.95, 0.1]))
    assert out[:, 1:].tolist() == [[2, 2, 2]] * 4  # instance 1 (score .95) wins the overlap
    assert out[:, 0].tolist() == [1, 1, 1, 1]  # instance 2 (score .1) loses its pixel to instance 0
    # Ties keep the input order: the first instance wins.
    out = masks_to_label_map(masks[:2], scores=np.array([0.5, 0.5]))
    assert out[0, 1] == 1


def test_instances_round_trip():
    rng = np.random.default_rng(3)
    label = relabel_sequential(_random_label_map(rng))
    inst = label_map_to_instances(label, scores=np.linspace(1, 0.5, label.max()))
    assert inst.pred_masks.dtype == torch.bool and inst.pred_masks.shape[1:] == label.shape
    assert len(inst) == label.max()
    # No overlaps, so the label map comes back whatever the scores.
    np.testing.assert_array_equal(instances_to_label_map(inst), label)
    box = inst.pred_boxes.tensor[0].tolist()
    ys, xs = np.nonzero(label == 1)
    assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
