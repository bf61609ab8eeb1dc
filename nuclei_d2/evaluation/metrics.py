"""Nucleus instance-segmentation metrics, all computed from one sparse contingency table of two label maps.

Inputs are two instance label maps of the same ``H x W`` shape (ground truth, prediction): any integer (or bool)
dtype, 0 = background, every other value one nucleus (values need not be consecutive, negative values are nuclei
too). Nothing here builds a full-image mask per nucleus: the two maps are relabelled to ``1..N`` and every pixel
is counted once into a table of (gt, pred) pairs (one ``np.bincount``), from which areas, intersections, unions
and IoUs of all overlapping pairs follow. Only the object-level Hausdorff distance looks at pixels again, and then
only at the pairs it needs, inside their bounding boxes (or at their border pixels when the box is much larger than
the nuclei).

Metrics (``docs/metrics.md`` has the formulas and references):

* ``AJI``        aggregated Jaccard index, Kumar et al. 2017 (MoNuSeg definition).
* ``AJI+``       AJI with a one-to-one matching maximising the total IoU (HoVer-Net's ``get_fast_aji_plus``
  semantics, Graham et al. 2019).
* ``PQ``, ``DQ``, ``SQ``  panoptic / detection / segmentation quality, Kirillov et al. 2019 (pairs need IoU > 0.5).
* ``F1``, ``precision``, ``recall``  detection scores with pairs of IoU > ``iou_threshold``.
* ``Dice1``      pixel-level foreground Dice.
* ``Dice2``      "ensemble" Dice of CPM17 (Vu et al. 2019), as evaluated by HoVer-Net.
* ``Dice_obj``, ``Hausdorff_obj``  object-level Dice and Hausdorff distance of the GlaS challenge
  (Sirinukunwattana et al. 2017), as used by Cell R-CNN (Zhang et al. 2018) and the panoptic-fusion model
  (Liu et al. 2019).
* ``MDR``, ``FDR``, ``USR``, ``OSR``  missed-detection, false-detection, under- and over-segmentation rates
  (Cui et al. 2019); see :func:`error_counts` for the exact rule.

Edge cases (a ratio whose denominator is zero):

* both maps empty: every agreement score (AJI, AJI+, PQ, DQ, SQ, F1, precision, recall, Dice1, Dice2, Dice_obj)
  is 1.0, every error rate (MDR, FDR, USR, OSR) 0.0, Hausdorff_obj 0.0 -- the prediction is exactly right;
* only one map empty: agreement scores are 0.0; MDR = 1 (no prediction) or FDR = 1 (no ground truth), rates with
  an empty denominator are 0.0; every nucleus' Hausdorff distance is the image diagonal (the largest distance the
  image allows), so Hausdorff_obj = diagonal.
* otherwise a 0/0 ratio (e.g. SQ without any true positive) is 0.0, as in HoVer-Net.

:func:`compute_metrics` returns, besides the metrics, the additive counts they are made of (``COUNT_KEYS``); summing
those over images and calling :func:`metrics_from_counts` gives the *pooled* dataset value (e.g. the AJI of all
images' intersections over all images' unions), and :func:`aggregate_metrics` gives both the mean over images (what
the papers report) and the pooled values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..structures import label_values, relabel_sequential

__all__ = [
    "COUNT_KEYS",
    "HIGHER_IS_BETTER",
    "METRIC_KEYS",
    "ContingencyTable",
    "aggregate_metrics",
    "compute_metrics",
    "contingency_table",
    "error_counts",
    "match_max_iou",
    "metric_counts",
    "metrics_from_counts",
]

#: The metrics, in the order tables and CSV files show them.
METRIC_KEYS: tuple[str, ...] = (
    "AJI", "AJI+", "PQ", "DQ", "SQ", "F1", "precision", "recall", "Dice1", "Dice2", "Dice_obj", "Hausdorff_obj",
    "MDR", "FDR", "USR", "OSR",
)

#: Whether a larger value is better, per metric (for comparisons and reports).
HIGHER_IS_BETTER: dict[str, bool] = {k: k not in ("Hausdorff_obj", "MDR", "FDR", "USR", "OSR") for k in METRIC_KEYS}

#: Additive per-image quantities; their sums over images give the pooled metrics (see :func:`metrics_from_counts`).
COUNT_KEYS: tuple[str, ...] = (
    "n_gt", "n_pred",                      # number of nuclei
    "TP", "FP", "FN",                      # detection at IoU > iou_threshold (F1, precision, recall)
    "PQ_TP", "PQ_FP", "PQ_FN", "PQ_IoU_sum",  # detection at IoU > 0.5 and the matched pairs' IoU sum (PQ)
    "AJI_inter", "AJI_union",              # AJI numerator and denominator (pixels)
    "AJI+_inter", "AJI+_union",            # AJI+ numerator and denominator (pixels)
    "fg_gt", "fg_pred", "fg_inter",        # foreground pixels (Dice1); fg_inter = pixels in both foregrounds
    "Dice2_total",                         # sum of |G|+|S| over overlapping pairs (Dice2 = 2 fg_inter / Dice2_total)
    "Dice_obj_gt", "Dice_obj_pred",        # area-weighted sums of object Dice, gt side / prediction side
    "Hausdorff_obj_gt", "Hausdorff_obj_pred",  # area-weighted sums of object Hausdorff distances
    "n_missed", "n_false", "n_under", "n_over",  # MDR / FDR / USR / OSR numerators
)

_INT_COUNTS = frozenset(("n_gt", "n_pred", "TP", "FP", "FN", "PQ_TP", "PQ_FP", "PQ_FN", "AJI_inter", "AJI_union",
                         "AJI+_inter", "AJI+_union", "fg_gt", "fg_pred", "fg_inter", "Dice2_total", "n_missed",
                         "n_false", "n_under", "n_over"))

# PQ's matching threshold is part of its definition (Kirillov et al. 2019, Sec. 4.1): IoU strictly above 0.5.
PQ_IOU = 0.5


# --------------------------------------------------------------------------------------------------------------------
# The contingency table
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContingencyTable:
    """Areas and pairwise intersections of the nuclei of two label maps (only pairs that overlap are stored).

    Nuclei are indexed ``0..G-1`` (ground truth) and ``0..P-1`` (prediction) in increasing order of their label
    value; ``gt_values[k]`` is the original value of ground-truth nucleus ``k``. ``gt_labels`` is the map the table was
    counted from -- the input itself when its values are non-negative and not huge, else the input relabelled to
    ``1..G`` -- and ``gt_keys[k]`` the value of nucleus ``k`` in it (likewise for the prediction); the Hausdorff
    distance reads them. Pairs are sorted by (gt index, pred index).
    """

    gt_labels: np.ndarray
    pred_labels: np.ndarray
    gt_keys: np.ndarray
    pred_keys: np.ndarray
    gt_values: np.ndarray
    pred_values: np.ndarray
    gt_area: np.ndarray
    pred_area: np.ndarray
    pair_gt: np.ndarray
    pair_pred: np.ndarray
    pair_inter: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.gt_labels.shape)  # type: ignore[return-value]

    @property
    def n_gt(self) -> int:
        return int(self.gt_area.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_area.size)

    @property
    def pair_union(self) -> np.ndarray:
        return self.gt_area[self.pair_gt] + self.pred_area[self.pair_pred] - self.pair_inter

    @property
    def pair_iou(self) -> np.ndarray:
        return self.pair_inter / self.pair_union


def _check_label_map(label: Any, name: str) -> np.ndarray:
    if hasattr(label, "detach"):  # torch tensor
        label = label.detach().cpu().numpy()
    arr = np.asarray(label)
    if arr.ndim != 2:
        raise ValueError(f"{name}: an instance label map must be 2-D (H x W), got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.view(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        return arr
    if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(np.mod(arr, 1) == 0):
        return arr.astype(np.int64)
    raise TypeError(f"{name}: an instance label map must hold integers, got dtype {arr.dtype}")


def _countable(label: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(map whose values ``np.bincount`` can count, original values if it had to be relabelled to 1..N else None).

    Label maps with non-negative values up to ``max(4 * pixels, 2^20)`` are counted as they are (no copy, no
    relabelling pass); others (negative or huge values) are relabelled with ``nuclei_d2.structures``.
    """
    if label.size == 0:
        return np.zeros(label.shape, dtype=np.int32), None
    lo, hi = int(label.min()), int(label.max())
    if lo >= 0 and hi <= max(4 * label.size, 1 << 20):
        return (label.astype(np.int64) if label.dtype == np.uint64 else label), None
    return relabel_sequential(label), label_values(label)


def contingency_table(gt: Any, pred: Any) -> ContingencyTable:
    """Build the sparse contingency table of two instance label maps in O(pixels).

    One ``np.bincount`` over the paired codes ``gt * (max(pred) + 1) + pred`` gives every area and intersection at
    once when that dense table is not larger than the image; otherwise (many thousands of nuclei or sparse label
    values) only the pixels in both foregrounds are coded and counted with ``np.unique``, so the table never becomes
    dense.
    """
    gt = _check_label_map(gt, "ground truth")
    pred = _check_label_map(pred, "prediction")
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth is {gt.shape[0]}x{gt.shape[1]} but prediction is "
                         f"{pred.shape[0]}x{pred.shape[1]}: label maps must have the same size")
    g, g_orig = _countable(gt)
    p, p_orig = _countable(pred)
    hg = int(g.max()) if g.size else 0
    hp = int(p.max()) if p.size else 0
    width = hp + 1
    n_bins = (hg + 1) * width
    if n_bins <= max(g.size, 1 << 16):
        dt = np.int32 if n_bins < 2**31 else np.int64
        codes = g.astype(dt) * dt(width)
        np.add(codes, p, out=codes, casting="unsafe")  # values fit: n_bins < dtype max
        table = np.bincount(codes.ravel(), minlength=n_bins).reshape(hg + 1, width)
        g_counts, p_counts = table.sum(axis=1), table.sum(axis=0)
        block = table[1:, 1:]
        rows, cols = np.nonzero(block)
        inter = block[rows, cols]
        rows, cols = rows + 1, cols + 1
    else:
        g_counts = np.bincount(g.ravel(), minlength=hg + 1)
        p_counts = np.bincount(p.ravel(), minlength=width)
        both = (g != 0) & (p != 0)
        codes = g[both].astype(np.int64) * width + p[both]
        uniq, inter = np.unique(codes, return_counts=True)
        rows, cols = uniq // width, uniq % width
    g_keys = np.flatnonzero(g_counts[1:]) + 1
    p_keys = np.flatnonzero(p_counts[1:]) + 1
    g_index = np.zeros(hg + 1, dtype=np.int64)
    g_index[g_keys] = np.arange(g_keys.size)
    p_index = np.zeros(hp + 1, dtype=np.int64)
    p_index[p_keys] = np.arange(p_keys.size)
    return ContingencyTable(
        gt_labels=g, pred_labels=p, gt_keys=g_keys, pred_keys=p_keys,
        gt_values=g_keys if g_orig is None else g_orig[g_keys - 1],
        pred_values=p_keys if p_orig is None else p_orig[p_keys - 1],
        gt_area=g_counts[g_keys].astype(np.int64), pred_area=p_counts[p_keys].astype(np.int64),
        pair_gt=g_index[rows], pair_pred=p_index[cols], pair_inter=inter.astype(np.int64),
    )


# --------------------------------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------------------------------


def _best_per_group(group: np.ndarray, value: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Index of the pair with the largest ``value`` within each ``group`` (ties: smallest ``tiebreak``)."""
    if group.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((tiebreak, -value, group))
    g = group[order]
    first = np.ones(g.size, dtype=bool)
    first[1:] = g[1:] != g[:-1]
    return order[first]


def _local_rank(comp: np.ndarray, node: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank of each edge's node among the distinct nodes of its component, and the number of distinct nodes."""
    order = np.lexsort((node, comp))
    c, n = comp[order], node[order]
    new_comp = np.r_[True, c[1:] != c[:-1]]
    new_node = new_comp | np.r_[True, n[1:] != n[:-1]]
    cum = np.cumsum(new_node) - 1
    first_of_comp = np.maximum.accumulate(np.where(new_comp, cum, 0))
    rank = np.empty_like(cum)
    rank[order] = cum - first_of_comp
    n_nodes = np.zeros(int(comp.max()) + 1, dtype=np.int64)
    np.maximum.at(n_nodes, comp, rank + 1)
    return rank, n_nodes


def match_max_iou(pair_gt: np.ndarray, pair_pred: np.ndarray, weight: np.ndarray, n_gt: int,
                  n_pred: int) -> np.ndarray:
    """One-to-one matching of candidate pairs maximising the total ``weight`` (IoU); returns sorted pair indices.

    Hungarian assignment (``scipy.optimize.linear_sum_assignment``) run separately on each connected component of
    the bipartite graph of candidate pairs, so its cost follows the few overlapping nuclei of each cluster instead
    of ``G x P``. Pairs that are the only candidate of both their nuclei are matched directly, and in a component
    with a single nucleus on one side that nucleus takes its heaviest pair (ties: the smaller index). Only pairs
    with a positive weight are matched.
    """
    pair_gt = np.asarray(pair_gt, dtype=np.int64)
    pair_pred = np.asarray(pair_pred, dtype=np.int64)
    weight = np.asarray(weight, dtype=np.float64)
    keep = weight > 0
    if not keep.all():
        idx = np.flatnonzero(keep)
        return idx[match_max_iou(pair_gt[idx], pair_pred[idx], weight[idx], n_gt, n_pred)]
    if pair_gt.size == 0:
        return np.zeros(0, dtype=np.int64)
    gdeg = np.bincount(pair_gt, minlength=n_gt)
    pdeg = np.bincount(pair_pred, minlength=n_pred)
    simple = (gdeg[pair_gt] == 1) & (pdeg[pair_pred] == 1)
    selected = [np.flatnonzero(simple)]
    rest = np.flatnonzero(~simple)
    if rest.size:
        rg, rp, rw = pair_gt[rest], pair_pred[rest], weight[rest]
        graph = coo_matrix((np.ones(rest.size, dtype=np.int8), (rg, n_gt + rp)), shape=(n_gt + n_pred,) * 2)
        _, comp_of_node = connected_components(graph, directed=False)
        _, comp = np.unique(comp_of_node[rg], return_inverse=True)
        lg, ng = _local_rank(comp, rg)
        lp, npred = _local_rank(comp, rp)
        # Stars (one nucleus on a side): the heaviest edge of the component.
        star = (ng == 1) | (npred == 1)
        se = np.flatnonzero(star[comp])
        if se.size:
            other = np.where(ng[comp[se]] == 1, rp[se], rg[se])
            selected.append(rest[se[_best_per_group(comp[se], rw[se], other)]])
        ge = np.flatnonzero(~star[comp])
        if ge.size:
            order = ge[np.argsort(comp[ge], kind="stable")]
            cs = comp[order]
            bounds = np.flatnonzero(np.r_[True, cs[1:] != cs[:-1], True])
            for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
                edges = order[s:e]
                c = int(cs[s])
                w = np.zeros((int(ng[c]), int(npred[c])))
                w[lg[edges], lp[edges]] = rw[edges]
                edge_of = np.full(w.shape, -1, dtype=np.int64)
                edge_of[lg[edges], lp[edges]] = edges
                rows, cols = linear_sum_assignment(w, maximize=True)
                chosen = edge_of[rows, cols]
                selected.append(rest[chosen[chosen >= 0]])
    return np.sort(np.concatenate(selected))


# --------------------------------------------------------------------------------------------------------------------
# Hausdorff distance (exact, on pixel centres, Euclidean)
# --------------------------------------------------------------------------------------------------------------------


def _boxes(labels: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``(n, 4)`` int array of ``[row0, row1, col0, col1)`` of the objects ``labels == keys[k]``."""
    out = np.zeros((keys.size, 4), dtype=np.int64)
    if keys.size == 0:
        return out
    slices = ndimage.find_objects(labels, max_label=int(keys[-1]))
    for k, key in enumerate(keys.tolist()):
        sl = slices[key - 1]
        if sl is not None:
            out[k] = (sl[0].start, sl[0].stop, sl[1].start, sl[1].stop)
    return out


def _compact_keys(labels: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relabel to 1..N when the values are much sparser than the objects (find_objects lists every value)."""
    if keys.size == 0 or int(keys[-1]) <= 4 * keys.size + 4096:
        return labels, keys
    lut = np.zeros(int(keys[-1]) + 1, dtype=np.int32)
    lut[keys] = np.arange(1, keys.size + 1, dtype=np.int32)
    return lut[labels], np.arange(1, keys.size + 1, dtype=np.int64)


class _Hausdorff:
    """Exact squared Hausdorff distances between a ground-truth and a predicted nucleus.

    Directed distance ``d(A -> B) = max_{a in A} min_{b in B} |a - b|`` (pixel centres, Euclidean); only pixels of A
    outside B matter, and the nearest pixel of B to such a pixel is always a *border* pixel of B (one with a
    4-neighbour outside B), since a step towards the outside pixel from any other pixel of B stays in B and gets
    closer. Two exact ways, chosen per pair:

    * compact pairs (the usual matched nuclei): Euclidean distance transform of "not B" on the union of the two
      bounding boxes, read at the pixels of A outside B (every pixel of B is in the crop). OpenCV's exact
      (Felzenszwalb) transform is float32; squared distances are integers and are recovered exactly by rounding
      (crops are kept far below float32's limit, else SciPy's float64 transform is used);
    * pairs whose union box is much larger than the nuclei (far apart, or a label made of distant pieces): a
      KD-tree of B's border pixels queried with A's pixels outside B, so the cost follows the nuclei, not the box.
    """

    def __init__(self, table: ContingencyTable):
        import cv2

        g, gk = _compact_keys(table.gt_labels, table.gt_keys)
        p, pk = _compact_keys(table.pred_labels, table.pred_keys)
        self.labels = (g, p)
        self.keys = (gk.tolist(), pk.tolist())
        self.boxes = (_boxes(g, gk), _boxes(p, pk))
        self._box_list = (self.boxes[0].tolist(), self.boxes[1].tolist())
        self.areas = (table.gt_area, table.pred_area)
        self.cache: dict[tuple[int, int], int] = {}
        self._pixels: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._borders: dict[tuple[int, int], np.ndarray] = {}
        self._trees: dict[tuple[int, int], Any] = {}
        self._extremes: dict[tuple[int, int], np.ndarray] = {}
        self._dt = cv2.distanceTransform
        self._dt_args = (cv2.DIST_L2, cv2.DIST_MASK_PRECISE)

    # -- per-object pixel sets (cached) --------------------------------------------------------------------------

    def pixels(self, side: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Absolute (rows, cols) of the object's pixels."""
        key = (side, k)
        if key not in self._pixels:
            r0, r1, c0, c1 = self._box_list[side][k]
            rr, cc = np.nonzero(self.labels[side][r0:r1, c0:c1] == self.keys[side][k])
            self._pixels[key] = (rr + r0, cc + c0)
        return self._pixels[key]

    def border(self, side: int, k: int) -> np.ndarray:
        """``(n, 2)`` (row, col) of the object's pixels with a 4-neighbour (inside the image) not in it."""
        key = (side, k)
        if key not in self._borders:
            lab = self.labels[side]
            h, w = lab.shape
            r0, r1, c0, c1 = self._box_list[side][k]
            pr0, pr1, pc0, pc1 = max(r0 - 1, 0), min(r1 + 1, h), max(c0 - 1, 0), min(c1 + 1, w)
            m = lab[pr0:pr1, pc0:pc1] == self.keys[side][k]
            # Outside the image counts as "in the object" so the image edge is not a border.
            m = np.pad(m, ((int(pr0 == 0), int(pr1 == h)), (int(pc0 == 0), int(pc1 == w))), constant_values=True)
            inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
            rr, cc = np.nonzero(m[1:-1, 1:-1] & ~inner)
            self._borders[key] = np.stack([rr + pr0 + 1 - int(pr0 == 0), cc + pc0 + 1 - int(pc0 == 0)], axis=1)
        return self._borders[key]

    def extremes(self, side: int, k: int) -> np.ndarray:
        """Up to 8 pixels of the object, extreme along rows, columns and both diagonals (for distance bounds)."""
        key = (side, k)
        if key not in self._extremes:
            rr, cc = self.pixels(side, k)
            idx = {int(f(v)) for v in (rr, cc, rr + cc, rr - cc) for f in (np.argmin, np.argmax)}
            self._extremes[key] = np.stack([rr[list(idx)], cc[list(idx)]], axis=1)
        return self._extremes[key]

    def _tree(self, side: int, k: int) -> Any:
        key = (side, k)
        if key not in self._trees:
            from scipy.spatial import cKDTree

            self._trees[key] = cKDTree(self.border(side, k))
        return self._trees[key]

    # -- distances -----------------------------------------------------------------------------------------------

    def _directed_sq_points(self, side: int, x: int, y: int) -> int:
        """Squared ``d(X -> Y)``, X on ``side``, Y on the other side, by KD-tree."""
        rr, cc = self.pixels(side, x)
        outside = self.labels[1 - side][rr, cc] != self.keys[1 - side][y]
        if not outside.any():
            return 0
        d, _ = self._tree(1 - side, y).query(np.stack([rr[outside], cc[outside]], axis=1))
        return int(round(float(d.max()) ** 2))

    def _directed_sq_edt(self, a: np.ndarray, not_b: np.ndarray, diag_sq: int) -> int:
        """Squared ``max_{a in A} dist(a, B)`` on a crop holding both (B is never empty there; pixels of A inside B
        contribute 0)."""
        if diag_sq < (1 << 21):  # float32 distances square back to the exact integers
            d = float(self._dt(not_b.view(np.uint8), *self._dt_args).max(where=a, initial=0.0))
        else:
            d = float(ndimage.distance_transform_edt(not_b).max(where=a, initial=0.0))
        return int(round(d * d))

    def pair_sq(self, i: int, j: int) -> int:
        """Squared Hausdorff distance between ground-truth nucleus ``i`` and predicted nucleus ``j`` (0-based)."""
        key = (i, j)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        a0, a1, a2, a3 = self._box_list[0][i]
        b0, b1, b2, b3 = self._box_list[1][j]
        r0, r1 = (a0 if a0 < b0 else b0), (a1 if a1 > b1 else b1)
        c0, c1 = (a2 if a2 < b2 else b2), (a3 if a3 > b3 else b3)
        crop_area = (r1 - r0) * (c1 - c0)
        if crop_area > 1024 and crop_area > 8 * (self.areas[0][i] + self.areas[1][j]):
            h = max(self._directed_sq_points(0, i, j), self._directed_sq_points(1, j, i))
        else:
            a = self.labels[0][r0:r1, c0:c1] == self.keys[0][i]
            b = self.labels[1][r0:r1, c0:c1] == self.keys[1][j]
            diag_sq = (r1 - r0) ** 2 + (c1 - c0) ** 2
            not_a, not_b = ~a, ~b
            # A direction is 0 when one nucleus lies inside the other (common: predictions a bit small or large).
            h = self._directed_sq_edt(a, not_b, diag_sq) if (a & not_b).any() else 0
            if (b & not_a).any():
                h = max(h, self._directed_sq_edt(b, not_a, diag_sq))
        self.cache[key] = h
        return h

    @staticmethod
    def _to_box_sq(pts: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """``max over pts`` of the squared distance to each box (``(m, 4)`` half-open boxes) -> ``(m,)``."""
        y, x = pts[:, :1], pts[:, 1:]
        dy = np.maximum(np.maximum(boxes[None, :, 0] - y, y - (boxes[None, :, 1] - 1)), 0)
        dx = np.maximum(np.maximum(boxes[None, :, 2] - x, x - (boxes[None, :, 3] - 1)), 0)
        return (dy * dy + dx * dx).max(axis=0)

    def nearest(self, index: int, gt_side: bool) -> tuple[int, int]:
        """(partner, squared distance): the nucleus of the other map at minimum Hausdorff distance (the GlaS rule
        for nuclei that overlap nothing); ties go to the smaller index.

        Lower bounds prune the search. ``H(X, Y) >= max_{x in S} dist(x, box(Y))`` for any subset ``S`` of ``X``
        (here the up-to-8 extreme pixels of X), for all candidates at once; candidates are visited in increasing
        order of it and the search stops once it exceeds the best distance found. Before computing a candidate
        exactly, the symmetric bound (its extreme pixels against this nucleus' box) may rule it out.
        """
        side = 0 if gt_side else 1
        own_box = self.boxes[side][index:index + 1]
        bound = self._to_box_sq(self.extremes(side, index), self.boxes[1 - side])
        best, best_sq = -1, 0
        for c in np.argsort(bound, kind="stable").tolist():
            if best >= 0 and bound[c] > best_sq:
                break
            if best >= 0 and int(self._to_box_sq(self.extremes(1 - side, c), own_box)[0]) > best_sq:
                continue
            sq = self.pair_sq(index, c) if gt_side else self.pair_sq(c, index)
            if best < 0 or sq < best_sq or (sq == best_sq and c < best):
                best, best_sq = c, sq
        return best, best_sq


# --------------------------------------------------------------------------------------------------------------------
# Counts
# --------------------------------------------------------------------------------------------------------------------


def error_counts(table: ContingencyTable) -> dict[str, int]:
    """Numerators of MDR, FDR, USR and OSR (Cui et al. 2019, "A deep learning algorithm for one-step contour aware
    nuclei segmentation of histopathology images", Med. Biol. Eng. Comput. 57).

    The paper compares methods by four error rates; written out over the ground-truth nuclei ``G`` and the
    detected nuclei ``S`` they are::

        MDR = missed ground-truth nuclei / |G|            (missing detection rate)
        FDR = false detections / |S|                     (false detection rate)
        USR = under-segmented ground-truth nuclei / |G|  (several nuclei merged into one detection)
        OSR = over-segmented ground-truth nuclei / |G|   (one nucleus split into several detections)

    "Corresponds to" is made exact here by a majority rule, so each object has at most one partner each way:
    detection ``s`` *lies in* nucleus ``g`` when more than half of ``s``'s pixels are in ``g``; nucleus ``g`` *lies
    in* detection ``s`` when more than half of ``g``'s pixels are in ``s``. Then

    * ``g`` is **over-segmented** when two or more detections lie in it;
    * ``g`` is **under-segmented** when it lies in a detection in which at least one other nucleus lies too
      (each merged nucleus counts);
    * ``g`` is **missed** when no detection lies in it and it lies in no detection;
    * ``s`` is a **false detection** when it lies in no nucleus and no nucleus lies in it.

    The paper's evaluation code is not public; the denominators and the majority rule above are this library's
    reading, stated so the numbers are reproducible -- check them before comparing with the paper's tables.
    """
    gi, pj, inter = table.pair_gt, table.pair_pred, table.pair_inter
    n_gt, n_pred = table.n_gt, table.n_pred
    gt_in_pred = 2 * inter > table.gt_area[gi]      # nucleus gi lies in detection pj
    pred_in_gt = 2 * inter > table.pred_area[pj]    # detection pj lies in nucleus gi
    n_over = int((np.bincount(gi[pred_in_gt], minlength=n_gt) >= 2).sum())
    per_pred = np.bincount(pj[gt_in_pred], minlength=n_pred)
    n_under = int(per_pred[per_pred >= 2].sum())
    assoc = gt_in_pred | pred_in_gt
    gt_assoc = np.zeros(n_gt, dtype=bool)
    gt_assoc[gi[assoc]] = True
    pred_assoc = np.zeros(n_pred, dtype=bool)
    pred_assoc[pj[assoc]] = True
    return {"n_missed": int(n_gt - gt_assoc.sum()), "n_false": int(n_pred - pred_assoc.sum()),
            "n_under": n_under, "n_over": n_over}


def metric_counts(table: ContingencyTable, iou_threshold: float = 0.5, hausdorff: bool = True) -> dict[str, float]:
    """The additive quantities (``COUNT_KEYS``) every metric of one image is computed from."""
    if not 0.0 <= float(iou_threshold) < 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}")
    gi, pj, inter = table.pair_gt, table.pair_pred, table.pair_inter
    ga, pa = table.gt_area, table.pred_area
    n_gt, n_pred = table.n_gt, table.n_pred
    union = ga[gi] + pa[pj] - inter
    iou = inter / np.maximum(union, 1)
    out: dict[str, float] = {"n_gt": n_gt, "n_pred": n_pred}

    # F1 / precision / recall at iou_threshold; above 0.5 pairs are unique, below it the matching maximises the IoU.
    cand = np.flatnonzero(iou > iou_threshold)
    if iou_threshold < 0.5:
        cand = cand[match_max_iou(gi[cand], pj[cand], iou[cand], n_gt, n_pred)]
    tp = int(cand.size)
    out.update(TP=tp, FP=n_pred - tp, FN=n_gt - tp)

    # PQ (IoU > 0.5: unique pairs, Kirillov et al. Theorem 1)
    pq = iou > PQ_IOU
    pq_tp = int(pq.sum())
    out.update(PQ_TP=pq_tp, PQ_FP=n_pred - pq_tp, PQ_FN=n_gt - pq_tp, PQ_IoU_sum=float(iou[pq].sum()))

    # AJI (Kumar et al. 2017): every ground-truth nucleus takes the prediction of highest IoU among those that overlap
    # it (ties: the smaller label); a prediction may serve several nuclei; predictions never used add their area.
    best = _best_per_group(gi, iou, pj)
    gt_has_pair = np.zeros(n_gt, dtype=bool)
    gt_has_pair[gi] = True
    used = np.zeros(n_pred, dtype=bool)
    used[pj[best]] = True
    out["AJI_inter"] = int(inter[best].sum())
    out["AJI_union"] = int(union[best].sum() + ga[~gt_has_pair].sum() + pa[~used].sum())

    # AJI+ (HoVer-Net): one-to-one pairs maximising the total IoU; every unpaired nucleus adds its area.
    m = match_max_iou(gi, pj, iou, n_gt, n_pred)
    gt_matched = np.zeros(n_gt, dtype=bool)
    gt_matched[gi[m]] = True
    pred_matched = np.zeros(n_pred, dtype=bool)
    pred_matched[pj[m]] = True
    out["AJI+_inter"] = int(inter[m].sum())
    out["AJI+_union"] = int(union[m].sum() + ga[~gt_matched].sum() + pa[~pred_matched].sum())

    # Dice1 (foreground) and Dice2 (CPM17 ensemble Dice: every overlapping pair, HoVer-Net's get_dice_2)
    fg_inter = int(inter.sum())
    out.update(fg_gt=int(ga.sum()), fg_pred=int(pa.sum()), fg_inter=fg_inter,
               Dice2_total=int((ga[gi] + pa[pj]).sum()))

    # Object-level Dice (GlaS): each object against the object of the other map it overlaps most (ties: smaller
    # label), weighted by its area; objects that overlap nothing score 0.
    dice = 2.0 * inter / (ga[gi] + pa[pj])
    gbest = _best_per_group(gi, inter, pj)
    pbest = _best_per_group(pj, inter, gi)
    out["Dice_obj_gt"] = float((ga[gi[gbest]] * dice[gbest]).sum())
    out["Dice_obj_pred"] = float((pa[pj[pbest]] * dice[pbest]).sum())

    # Object-level Hausdorff (GlaS): same partners; an object overlapping nothing takes the object of the other map
    # at minimum Hausdorff distance; with the other map empty, its distance is the image diagonal.
    if not hausdorff:
        out["Hausdorff_obj_gt"] = out["Hausdorff_obj_pred"] = float("nan")
    else:
        out["Hausdorff_obj_gt"], out["Hausdorff_obj_pred"] = _hausdorff_sums(table, gbest, pbest)

    out.update(error_counts(table))
    return out


def _hausdorff_sums(table: ContingencyTable, gbest: np.ndarray, pbest: np.ndarray) -> tuple[float, float]:
    gi, pj = table.pair_gt, table.pair_pred
    ga, pa = table.gt_area, table.pred_area
    n_gt, n_pred = table.n_gt, table.n_pred
    h, w = table.shape
    diag = math.hypot(h, w)
    if n_gt == 0 or n_pred == 0:
        return float(ga.sum()) * diag, float(pa.sum()) * diag
    hd = _Hausdorff(table)
    # Every pair needed (best partner of a nucleus or of a detection), each computed once.
    pairs = np.union1d(gbest, pbest)
    sqs = np.array([hd.pair_sq(i, j) for i, j in zip(gi[pairs].tolist(), pj[pairs].tolist())], dtype=np.int64)
    sq_of_pair = np.zeros(gi.size, dtype=np.int64)
    sq_of_pair[pairs] = sqs
    gt_sq = np.zeros(n_gt, dtype=np.int64)
    gt_sq[gi[gbest]] = sq_of_pair[gbest]
    has = np.zeros(n_gt, dtype=bool)
    has[gi[gbest]] = True
    for i in np.flatnonzero(~has).tolist():
        gt_sq[i] = hd.nearest(i, gt_side=True)[1]
    pred_sq = np.zeros(n_pred, dtype=np.int64)
    pred_sq[pj[pbest]] = sq_of_pair[pbest]
    has = np.zeros(n_pred, dtype=bool)
    has[pj[pbest]] = True
    for j in np.flatnonzero(~has).tolist():
        pred_sq[j] = hd.nearest(j, gt_side=False)[1]
    return float((ga * np.sqrt(gt_sq)).sum()), float((pa * np.sqrt(pred_sq)).sum())


# --------------------------------------------------------------------------------------------------------------------
# Metrics from counts
# --------------------------------------------------------------------------------------------------------------------


def _ratio(num: float, den: float, both_empty: bool) -> float:
    """Agreement score num/den; 0/0 is 1 when both maps are empty (perfect), else 0."""
    if den == 0:
        return 1.0 if both_empty else 0.0
    return float(num) / float(den)


def _rate(num: float, den: float) -> float:
    """Error rate num/den; 0/0 is 0 (nothing to get wrong)."""
    return float(num) / float(den) if den else 0.0


def _halves(gt_sum: float, gt_area: float, pred_sum: float, pred_area: float, empty_value: float) -> float:
    """GlaS object-level average ``(sum_gt/area_gt + sum_pred/area_pred) / 2`` over the halves that exist."""
    halves = []
    if gt_area > 0:
        halves.append(gt_sum / gt_area)
    if pred_area > 0:
        halves.append(pred_sum / pred_area)
    if not halves:
        return empty_value
    return float(sum(halves) / len(halves))


def metrics_from_counts(counts: Mapping[str, float]) -> dict[str, float]:
    """Metrics (``METRIC_KEYS``) from the counts of one image or from counts summed over images (pooled)."""
    c = counts
    empty = c["n_gt"] == 0 and c["n_pred"] == 0
    dq = _ratio(c["PQ_TP"], c["PQ_TP"] + 0.5 * c["PQ_FP"] + 0.5 * c["PQ_FN"], empty)
    sq = _ratio(c["PQ_IoU_sum"], c["PQ_TP"], empty)
    out = {
        "AJI": _ratio(c["AJI_inter"], c["AJI_union"], empty),
        "AJI+": _ratio(c["AJI+_inter"], c["AJI+_union"], empty),
        "PQ": dq * sq,
        "DQ": dq,
        "SQ": sq,
        "F1": _ratio(2 * c["TP"], 2 * c["TP"] + c["FP"] + c["FN"], empty),
        "precision": _ratio(c["TP"], c["TP"] + c["FP"], empty),
        "recall": _ratio(c["TP"], c["TP"] + c["FN"], empty),
        "Dice1": _ratio(2 * c["fg_inter"], c["fg_gt"] + c["fg_pred"], empty),
        "Dice2": _ratio(2 * c["fg_inter"], c["Dice2_total"], empty),
        "Dice_obj": _halves(c["Dice_obj_gt"], c["fg_gt"], c["Dice_obj_pred"], c["fg_pred"], 1.0),
        "Hausdorff_obj": _halves(c["Hausdorff_obj_gt"], c["fg_gt"], c["Hausdorff_obj_pred"], c["fg_pred"], 0.0),
        "MDR": _rate(c["n_missed"], c["n_gt"]),
        "FDR": _rate(c["n_false"], c["n_pred"]),
        "USR": _rate(c["n_under"], c["n_gt"]),
        "OSR": _rate(c["n_over"], c["n_gt"]),
    }
    return out


def compute_metrics(gt: Any, pred: Any, iou_threshold: float = 0.5, *, hausdorff: bool = True) -> dict[str, float]:
    """Every metric of one image, plus the counts they are made of.

    Args:
        gt, pred: instance label maps (``H x W``, any integer dtype, 0 = background).
        iou_threshold: IoU a pair must exceed to count as a detection for ``F1``/``precision``/``recall``
            (PQ always uses 0.5). Below 0.5 pairs are chosen by a one-to-one matching maximising the total IoU.
        hausdorff: compute ``Hausdorff_obj`` (the only metric that revisits pixels); NaN when False.

    Returns:
        ``{metric: value}`` for ``METRIC_KEYS`` followed by ``{count: value}`` for ``COUNT_KEYS``.
    """
    counts = metric_counts(contingency_table(gt, pred), iou_threshold, hausdorff=hausdorff)
    return {**metrics_from_counts(counts), **counts}


def aggregate_metrics(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Dataset values of per-image results of :func:`compute_metrics`.

    Returns:
        ``{"n_images": n, "mean": {metric: mean over images}, "pooled": {metric: metric of the summed counts},
        "counts": {count: sum}}``. The mean is what the nucleus papers report (MoNuSeg, CPM17, PanNuke); the pooled
        value weighs every nucleus/pixel equally (e.g. the AJI of all intersections over all unions). Means skip NaN
        (Hausdorff when it was not computed).
    """
    records = list(records)
    n = len(records)
    counts = {k: 0 if k in _INT_COUNTS else 0.0 for k in COUNT_KEYS}
    for r in records:
        for k in COUNT_KEYS:
            counts[k] += r[k]
    mean: dict[str, float] = {}
    for k in METRIC_KEYS:
        vals = np.array([float(r[k]) for r in records], dtype=np.float64)
        vals = vals[~np.isnan(vals)]
        mean[k] = float(vals.mean()) if vals.size else float("nan")
    pooled = metrics_from_counts(counts) if n else {k: float("nan") for k in METRIC_KEYS}
    return {"n_images": n, "mean": mean, "pooled": pooled, "counts": counts}
