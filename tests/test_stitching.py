"""Instance stitching across tiles (nuclei_d2/inference/stitching.py): once and whole, as whole-image inference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from nuclei_d2.data.synthetic import make_synthetic_tile
from nuclei_d2.inference import Predictor
from nuclei_d2.inference.stitching import TileGrid, remove_duplicates
from nuclei_d2.structures import CropMasks, relabel_sequential


def encode_labels(label: np.ndarray) -> np.ndarray:
    """An RGB image whose pixels carry the instance id (R + 256 G), so a fake model can read the truth per tile."""
    img = np.zeros(label.shape + (3,), np.uint8)
    img[..., 0] = label % 256
    img[..., 1] = label // 256
    img[..., 2] = 255
    return img


def oracle_tile_fn(tiles):
    """A 'model' that returns exactly the nuclei visible in each tile (cut ones cut), with distinct scores."""
    out = []
    for t in tiles:
        label = t[..., 0].astype(np.int32) + 256 * t[..., 1].astype(np.int32)
        seq = relabel_sequential(label)
        n = int(seq.max())
        out.append(CropMasks.from_label_map(seq, np.linspace(0.9, 0.5, n) if n else None))
    return out


def as_set(crops: CropMasks) -> set[tuple]:
    return {(tuple(int(v) for v in b), (m >= 0.5).tobytes()) for b, m in zip(crops.boxes, crops.masks)}


def test_owned_regions_partition_the_image():
    for h, w, tile, ov in [(600, 430, 160, 64), (100, 100, 160, 64), (257, 256, 128, 1), (300, 300, 100, 0)]:
        grid = TileGrid(h, w, tile, ov)
        count = np.zeros((h, w), np.int32)
        cover = np.zeros((h, w), np.int32)
        for t in grid:
            y0, y1, x0, x1 = t.owned
            count[y0:y1, x0:x1] += 1
            cover[t.top:t.top + t.height, t.left:t.left + t.width] += 1
            # the owned region lies inside the tile
            assert t.top <= y0 < y1 <= t.top + t.height and t.left <= x0 < x1 <= t.left + t.width
        assert (count == 1).all(), (h, w, tile, ov)
        assert (cover >= 1).all()


def test_stitched_equals_whole_image_on_synthetic_tissue():
    """Touching, overlapping-shaped synthetic nuclei: tiled + stitched == whole image, exactly, no duplicates."""
    _, label = make_synthetic_tile((600, 530), 3)
    img = encode_labels(label)
    whole = oracle_tile_fn([img])[0]
    assert len(whole) == label.max() > 200
    tiled = Predictor(tile_fn=oracle_tile_fn, tile_size=160, overlap=64, batch_size=3, progress=False).predict(img)
    assert len(tiled) == len(whole)
    assert as_set(tiled) == as_set(whole)


def test_nuclei_exactly_on_tile_borders_and_splits():
    """Discs centred on tile edges, on the ownership splits and on tile corners appear once, uncut."""
    tile, ov = 64, 20  # starts 0, 44, 88, ...: tile edges at 44/64/88/108, ownership splits at 54/98
    centres = [(54, 54), (64, 30), (44, 100), (30, 108), (98, 54), (64, 64), (44, 44), (88, 108), (54, 98),
               (150, 150), (5, 5), (195, 205)]
    h, w = 200, 210
    yy, xx = np.mgrid[0:h, 0:w]
    label = np.zeros((h, w), np.int32)
    for k, (cy, cx) in enumerate(centres, 1):
        label[(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = k
    img = encode_labels(label)
    pred = Predictor(tile_fn=oracle_tile_fn, tile_size=tile, overlap=ov, progress=False).predict(img)
    assert len(pred) == len(centres)
    assert as_set(pred) == as_set(oracle_tile_fn([img])[0])
    inst = Predictor(tile_fn=oracle_tile_fn, tile_size=tile, overlap=ov, progress=False)(img)
    assert inst.image_size == (h, w) and len(inst) == len(centres) and inst.pred_masks.sum() == (label > 0).sum()
    # whole: every predicted nucleus has the disc's full area
    areas = sorted(int((m >= 0.5).sum()) for m in pred.masks)
    assert areas == sorted(int(v) for v in ndimage.sum(label > 0, label, index=np.arange(1, len(centres) + 1)))


def test_a_cut_nucleus_is_never_kept():
    """A tile function that sees half a nucleus at a tile's inner edge: that half must not survive."""
    label = np.zeros((100, 100), np.int32)
    label[40:50, 60:75] = 1  # crosses x = 64, the first tile's right edge (tile 64, overlap 30: starts 0, 34, 36)
    img = encode_labels(label)
    pred = Predictor(tile_fn=oracle_tile_fn, tile_size=64, overlap=30, progress=False).predict(img)
    assert len(pred) == 1
    assert tuple(pred.boxes[0]) == (60, 40, 75, 50)


def test_remove_duplicates_keeps_the_higher_score():
    m = np.ones((10, 10), np.float32)
    crops = CropMasks((50, 50), np.array([[0, 0, 10, 10], [1, 0, 11, 10], [30, 30, 40, 40]]), [m, m, m],
                      np.array([0.6, 0.9, 0.5]), np.zeros(3))
    out = remove_duplicates(crops, 0.5)
    assert sorted(out.scores.tolist()) == pytest.approx([0.5, 0.9])


def test_bad_grid_parameters_are_rejected():
    with pytest.raises(ValueError, match="overlap"):
        TileGrid(100, 100, 64, 64)


def test_objects_larger_than_the_overlap_are_never_kept_cut():
    """Rule (a): a 40 px object with a 20 px overlap is cut in both tiles; whichever tile owns its (cut) anchor, no
    cut piece may be written (the documented limit: objects up to OVERLAP - 2 px)."""
    label = np.zeros((64, 108), np.int32)
    label[20:30, 30:70] = 1  # tiles start at x = 0 and 44 (edges at 64 and 44); the split is at x = 54
    pred = Predictor(tile_fn=oracle_tile_fn, tile_size=64, overlap=20, progress=False).predict(encode_labels(label))
    assert len(pred) == 0
    label[20:30, 30:70] = 0
    label[20:30, 45:63] = 1  # 18 px = OVERLAP - 2: whole in both tiles, kept once
    pred = Predictor(tile_fn=oracle_tile_fn, tile_size=64, overlap=20, progress=False).predict(encode_labels(label))
    assert len(pred) == 1 and tuple(pred.boxes[0]) == (45, 20, 63, 30)
