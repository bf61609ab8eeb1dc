"""Instance stitching across overlapping tiles: every nucleus once, and whole.

An instance model (Mask R-CNN family, or a dense model after post-processing) run tile by tile sees a nucleus that
straddles a tile border twice: cut in one tile, whole (or cut elsewhere) in its neighbour. The rule used here, the
**ownership rule**, decides per tile, without comparing tiles, so kept nuclei can be written out as soon as their tile
is done (memory does not grow with the slide):

1. Tiles overlap by ``overlap`` px. The overlap between two neighbouring tiles is split at its middle; each tile
   *owns* the pixels on its side of the split, so the owned regions of all tiles partition the image.
2. A nucleus predicted in a tile is kept from that tile only if
   (a) its mask does not touch an edge of the tile that is inside the image (it would be cut there), and
   (b) its *anchor*, the centre pixel of its bounding box ``((x0 + x1 - 1) // 2, (y0 + y1 - 1) // 2)`` in image
   coordinates, lies in the tile's owned region.

Why it works: a nucleus seen whole by two tiles has the same box in both, hence the same anchor, hence exactly one
owner. A nucleus whose anchor lies in tile *t*'s owned region is at least ``overlap / 2`` px away from *t*'s inner
edges at its anchor, so if it is at most ``overlap - 2`` px wide and high it lies wholly inside *t* and is kept there,
whole. So **every nucleus no larger than ``overlap - 2`` px (box side) appears exactly once, uncut** — choose
``overlap`` at least the largest nucleus diameter plus 2 (the default 64 px covers nuclei at 40x, ~10-40 px). Larger
objects may be dropped. With a real model the two tiles' predictions of a nucleus can differ by a pixel, moving its
anchor across the split; near-duplicates are then possible but rare (they need the anchor within a pixel of the
split), and the optional IoU pass :func:`remove_duplicates` removes them for in-memory results.

Overlapping nuclei share no pixel in what a prediction run writes (:data:`nuclei_d2.structures.OVERLAP_RULE`):
:class:`PixelClaims` resolves each tile's kept nuclei by score and gives pixels that two tiles' nuclei both cover to
the nucleus of the tile visited first (row by row), whose outputs are already written. The label map, GeoJSON, CSV
and COCO results of a run therefore describe the same pixels nucleus by nucleus.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..layers.tiling import tile_positions
from ..structures import CropMasks
from .merge import mask_ious

__all__ = ["PixelClaims", "Tile", "TileGrid", "owned_selection", "remove_duplicates", "shift_crops", "stitch"]


@dataclass(frozen=True)
class Tile:
    """One tile: its window ``(top, left, height, width)`` and owned region ``[y0, y1) x [x0, x1)``, image frame."""

    top: int
    left: int
    height: int
    width: int
    owned: tuple[int, int, int, int]  # y0, y1, x0, x1
    index: int = 0


def _owned_intervals(starts: list[int], patch: int, length: int) -> list[tuple[int, int]]:
    """Split every overlap at its middle: tile ``i`` owns ``[m_{i-1}, m_i)`` with ``m_i`` the middle of the overlap
    of tiles ``i`` and ``i + 1``."""
    ends = [min(s + patch, length) for s in starts]
    cuts = [0] + [(starts[i + 1] + ends[i]) // 2 for i in range(len(starts) - 1)] + [length]
    return [(cuts[i], cuts[i + 1]) for i in range(len(starts))]


class TileGrid:
    """Overlapping tiles covering a ``height x width`` image (last tile of a row/column aligned with the image end).

    Args:
        tile: tile side in pixels (images smaller than a tile are one tile on that side).
        overlap: pixels shared by neighbouring tiles (``0 <= overlap < tile``).
    """

    def __init__(self, height: int, width: int, tile: int, overlap: int):
        if tile < 1 or not 0 <= overlap < tile:
            raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
        self.height, self.width, self.tile, self.overlap = int(height), int(width), int(tile), int(overlap)
        ys = tile_positions(self.height, self.tile, self.tile - self.overlap)
        xs = tile_positions(self.width, self.tile, self.tile - self.overlap)
        oy = _owned_intervals(ys, self.tile, self.height)
        ox = _owned_intervals(xs, self.tile, self.width)
        th, tw = min(self.tile, self.height), min(self.tile, self.width)
        self.tiles = [Tile(y, x, th, tw, (oy[i][0], oy[i][1], ox[j][0], ox[j][1]), i * len(xs) + j)
                      for i, y in enumerate(ys) for j, x in enumerate(xs)]

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self):
        return iter(self.tiles)


def _tight(crops: CropMasks, threshold: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Boxes and bool crops trimmed to the pixels at or above ``threshold`` (soft masks' boxes can be loose)."""
    boxes, masks = [], []
    for box, m in zip(crops.boxes, crops.masks):
        b = m >= threshold
        ys, xs = np.flatnonzero(b.any(axis=1)), np.flatnonzero(b.any(axis=0))
        if ys.size == 0:
            boxes.append(None)
            masks.append(b)
            continue
        boxes.append((box[0] + xs[0], box[1] + ys[0], box[0] + xs[-1] + 1, box[1] + ys[-1] + 1))
        masks.append(b[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1])
    return boxes, masks


def owned_selection(crops: CropMasks, tile: Tile, image_size: tuple[int, int], threshold: float = 0.5) -> CropMasks:
    """The nuclei of one tile (``crops`` in the tile's frame) that the ownership rule keeps, as bool masks in the
    image frame (see the module docstring)."""
    h, w = image_size
    boxes, masks = _tight(crops, threshold)
    keep_boxes, keep_masks, keep = [], [], []
    for i, box in enumerate(boxes):
        if box is None:
            continue
        x0, y0, x1, y1 = (int(v) for v in box)
        gx0, gy0, gx1, gy1 = x0 + tile.left, y0 + tile.top, x1 + tile.left, y1 + tile.top
        # (a) cut by an inner tile edge?
        if (x0 == 0 and tile.left > 0) or (y0 == 0 and tile.top > 0):
            continue
        if (x1 == tile.width and tile.left + tile.width < w) or (y1 == tile.height and tile.top + tile.height < h):
            continue
        # (b) anchor owned by this tile?
        ay, ax = (gy0 + gy1 - 1) // 2, (gx0 + gx1 - 1) // 2
        oy0, oy1, ox0, ox1 = tile.owned
        if not (oy0 <= ay < oy1 and ox0 <= ax < ox1):
            continue
        keep.append(i)
        keep_boxes.append((gx0, gy0, gx1, gy1))
        keep_masks.append(masks[i].astype(np.float32))
    idx = np.asarray(keep, np.int64)
    return CropMasks((h, w), np.asarray(keep_boxes, np.int64).reshape(-1, 4), keep_masks, crops.scores[idx],
                     crops.classes[idx])


def shift_crops(crops: CropMasks, top: int, left: int, image_size: tuple[int, int]) -> CropMasks:
    """``crops`` moved by ``(top, left)`` into an image of ``image_size``."""
    boxes = crops.boxes + np.array([left, top, left, top], dtype=np.int64)
    return CropMasks(image_size, boxes, list(crops.masks), crops.scores, crops.classes)


def remove_duplicates(crops: CropMasks, iou_threshold: float = 0.5) -> CropMasks:
    """Drop every instance whose mask IoU with a higher-scoring one is at least ``iou_threshold`` (mask NMS)."""
    if len(crops) < 2:
        return crops
    ii, jj, v = mask_ious(crops, crops)
    order = np.argsort(-crops.scores, kind="stable")
    rank = np.empty(len(crops), np.int64)
    rank[order] = np.arange(len(crops))
    dropped = np.zeros(len(crops), bool)
    pairs = [(i, j) for i, j, x in zip(ii.tolist(), jj.tolist(), v.tolist()) if i != j and x >= iou_threshold]
    pairs.sort(key=lambda p: (rank[p[0]], rank[p[1]]))
    for i, j in pairs:
        if rank[i] < rank[j] and not dropped[i]:
            dropped[j] = True
    return crops.select(np.flatnonzero(~dropped))


def stitch(tile_crops: list[tuple[Tile, CropMasks]], image_size: tuple[int, int], threshold: float = 0.5,
           dedupe_iou: float | None = None) -> CropMasks:
    """Stitch per-tile predictions (each in its tile's frame) into the image's nuclei by the ownership rule,
    optionally followed by :func:`remove_duplicates` at ``dedupe_iou``."""
    kept = [owned_selection(c, t, image_size, threshold) for t, c in tile_crops]
    out = CropMasks.cat(kept, image_size)
    return remove_duplicates(out, dedupe_iou) if dedupe_iou else out


class PixelClaims:
    """Makes the nuclei of a stream of tiles (visited in grid order, row by row) share no pixel.

    :meth:`resolve` applies :data:`nuclei_d2.structures.OVERLAP_RULE` within the tile and removes the pixels already
    given to a nucleus of an earlier tile. It remembers only the nuclei that a later tile's window can still reach
    (those reaching below the next tile row's top or right of the next tile's left), so memory follows one band of
    tile overlaps, not the slide.
    """

    def __init__(self, grid: TileGrid, threshold: float = 0.5):
        self.threshold = float(threshold)
        self.size = (grid.height, grid.width)
        self._tops = sorted({t.top for t in grid})
        self._lefts = sorted({t.left for t in grid})
        self._held: list[CropMasks] = []

    def _next(self, values: list[int], v: int) -> int | None:
        k = np.searchsorted(values, v, side="right")
        return int(values[k]) if k < len(values) else None

    def resolve(self, crops: CropMasks, tile: Tile) -> CropMasks:
        """The tile's kept nuclei (image frame) without pixels claimed by a higher-scoring nucleus of the tile or by
        a nucleus of an earlier tile; nuclei left without pixels are dropped."""
        self._held = [c for c in self._held if len(c) and int(c.boxes[:, 3].max()) > tile.top]
        claimed = CropMasks.cat(self._held, self.size) if self._held else None
        out = crops.disjoint(self.threshold, claimed)
        next_top, next_left = self._next(self._tops, tile.top), self._next(self._lefts, tile.left)
        reach = np.zeros(len(out), bool)
        if next_top is not None:
            reach |= out.boxes[:, 3] > next_top
        if next_left is not None:
            reach |= out.boxes[:, 2] > next_left
        if reach.any():
            self._held.append(out.select(np.flatnonzero(reach)))
        return out
