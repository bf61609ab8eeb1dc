"""Instance-level merging of several predictions of one image: test-time augmentation copies and ensemble members.

Mask R-CNN+ (Bancher et al., "Improving Mask R-CNN for Nuclei Instance Segmentation in Hematoxylin & Eosin-Stained
Histological Images", MICCAI COMPAY 2021) merges the predictions of its test-time-augmented copies and of several
models *per nucleus*, not per pixel:

1. predictions of different members (a member = one model on one augmented copy) that are the same nucleus are
   grouped: their masks overlap with IoU >= ``iou_threshold``;
2. groups seen by fewer than ``min_votes`` members are dropped (singletons by default: a nucleus only one copy sees
   is most likely a false positive);
3. each remaining group becomes one nucleus: the members' soft masks are averaged (a member that does not cover a
   pixel counts 0 there) and thresholded at ``mask_threshold``; its score is the members' mean score and its class
   their most frequent class.

Everything here is a pure function of numpy arrays, independent of the model that made the predictions. Masks are
kept as **crops** (:class:`CropMasks`: a box and the mask inside it), so merging eight copies of a 1000x1000 tile
with 1,000 nuclei costs megabytes, not the gigabytes of full-size ``N x H x W`` masks.

Grouping is greedy and deterministic: predictions are visited by decreasing score; each unassigned one seeds a group
and takes, from every *other* member, the unassigned prediction with the highest mask IoU with the seed (at least
``iou_threshold``). A group therefore holds at most one prediction per member, so its size is its number of votes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..structures import CropMasks

__all__ = ["group_instances", "mask_ious", "merge_group", "merge_instances"]


def mask_ious(a: CropMasks, b: CropMasks, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask IoU of every pair ``(i in a, j in b)`` whose masks overlap (IoU > 0), as three arrays ``(i, j, iou)``.

    Masks are binarised at ``threshold``. Only pairs whose boxes intersect are compared, so the cost follows the
    number of neighbouring nuclei, not ``len(a) * len(b)`` mask comparisons.
    """
    if a.image_size != b.image_size:
        raise ValueError(f"cannot compare instances of a {a.image_size} image with those of a {b.image_size} image")
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
    if len(a) == 0 or len(b) == 0:
        return empty
    ba, bb = a.boxes, b.boxes
    ix0 = np.maximum(ba[:, None, 0], bb[None, :, 0])
    iy0 = np.maximum(ba[:, None, 1], bb[None, :, 1])
    ix1 = np.minimum(ba[:, None, 2], bb[None, :, 2])
    iy1 = np.minimum(ba[:, None, 3], bb[None, :, 3])
    ii, jj = np.nonzero((ix1 > ix0) & (iy1 > iy0))
    if ii.size == 0:
        return empty
    ma, mb = a.binary(threshold), b.binary(threshold)
    area_a = np.array([m.sum() for m in ma], dtype=np.int64)
    area_b = np.array([m.sum() for m in mb], dtype=np.int64)
    out_i, out_j, out_v = [], [], []
    for i, j in zip(ii.tolist(), jj.tolist()):
        x0, y0, x1, y1 = int(ix0[i, j]), int(iy0[i, j]), int(ix1[i, j]), int(iy1[i, j])
        wa = ma[i][y0 - ba[i, 1]:y1 - ba[i, 1], x0 - ba[i, 0]:x1 - ba[i, 0]]
        wb = mb[j][y0 - bb[j, 1]:y1 - bb[j, 1], x0 - bb[j, 0]:x1 - bb[j, 0]]
        inter = int(np.count_nonzero(wa & wb))
        if inter == 0:
            continue
        out_i.append(i)
        out_j.append(j)
        out_v.append(inter / float(area_a[i] + area_b[j] - inter))
    return (np.asarray(out_i, np.int64), np.asarray(out_j, np.int64), np.asarray(out_v, np.float64))


def group_instances(members: Sequence[CropMasks], iou_threshold: float = 0.5, mask_threshold: float = 0.5
                    ) -> list[list[tuple[int, int]]]:
    """Group the predictions of several members that are the same nucleus (see the module docstring).

    Returns:
        groups, each a list of ``(member index, instance index)`` with at most one entry per member, the seed (the
        group's highest-scoring prediction) first. Every prediction is in exactly one group; groups are ordered by
        their seed's score, highest first (ties: lower member index, then lower instance index).
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    sizes = {m.image_size for m in members}
    if len(sizes) > 1:
        raise ValueError(f"members predict images of different sizes {sorted(sizes)}: map them to one frame first")
    # Sparse IoU between members: neigh[(p, q)][i] = (indices j in q, ious), for p != q.
    neigh: dict[tuple[int, int], dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for p in range(len(members)):
        for q in range(p + 1, len(members)):
            i, j, v = mask_ious(members[p], members[q], mask_threshold)
            keep = v >= iou_threshold
            i, j, v = i[keep], j[keep], v[keep]
            neigh[(p, q)] = _by_first(i, j, v)
            neigh[(q, p)] = _by_first(j, i, v)
    order = sorted(((-float(s), p, i) for p, m in enumerate(members) for i, s in enumerate(m.scores)))
    assigned = [np.zeros(len(m), dtype=bool) for m in members]
    groups: list[list[tuple[int, int]]] = []
    for _, p, i in order:
        if assigned[p][i]:
            continue
        assigned[p][i] = True
        group = [(p, i)]
        for q in range(len(members)):
            if q == p:
                continue
            cand = neigh[(p, q)].get(i)
            if cand is None:
                continue
            js, ious = cand
            free = ~assigned[q][js]
            if not free.any():
                continue
            js, ious = js[free], ious[free]
            # Highest IoU; ties go to the higher score, then the lower index.
            best = min(range(len(js)), key=lambda k: (-ious[k], -float(members[q].scores[js[k]]), int(js[k])))
            j = int(js[best])
            assigned[q][j] = True
            group.append((q, j))
        groups.append(group)
    return groups


def _by_first(i: np.ndarray, j: np.ndarray, v: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if i.size == 0:
        return out
    order = np.argsort(i, kind="stable")
    i, j, v = i[order], j[order], v[order]
    starts = np.flatnonzero(np.r_[True, i[1:] != i[:-1]])
    ends = np.r_[starts[1:], i.size]
    for s, e in zip(starts, ends):
        out[int(i[s])] = (j[s:e], v[s:e])
    return out


def merge_group(members: Sequence[CropMasks], group: Sequence[tuple[int, int]], mask_threshold: float = 0.5
                ) -> tuple[np.ndarray, np.ndarray, float, int] | None:
    """One nucleus from a group: the mean of the members' soft masks (0 outside a member's mask), the members'
    mean score and most frequent class (ties: the smallest class id).

    Returns:
        ``(box, soft crop, score, class)`` with the crop trimmed to the pixels where the mean is at least
        ``mask_threshold``, or None when no pixel is.
    """
    if not group:
        raise ValueError("cannot merge an empty group")
    boxes = np.stack([members[p].boxes[i] for p, i in group])
    x0, y0 = int(boxes[:, 0].min()), int(boxes[:, 1].min())
    x1, y1 = int(boxes[:, 2].max()), int(boxes[:, 3].max())
    acc = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
    for p, i in group:
        bx0, by0, bx1, by1 = (int(v) for v in members[p].boxes[i])
        acc[by0 - y0:by1 - y0, bx0 - x0:bx1 - x0] += members[p].masks[i]
    acc /= float(len(group))
    fg = acc >= mask_threshold
    ys, xs = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    if ys.size == 0:
        return None
    ty0, ty1, tx0, tx1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
    crop = np.ascontiguousarray(acc[ty0:ty1, tx0:tx1])
    box = np.array([x0 + tx0, y0 + ty0, x0 + tx1, y0 + ty1], dtype=np.int64)
    score = float(np.mean([members[p].scores[i] for p, i in group]))
    classes = np.array([members[p].classes[i] for p, i in group], dtype=np.int64)
    values, counts = np.unique(classes, return_counts=True)
    return box, crop, score, int(values[np.argmax(counts)])


def merge_instances(members: Sequence[CropMasks], iou_threshold: float = 0.5, min_votes: int = 2,
                    mask_threshold: float = 0.5) -> CropMasks:
    """Merge the predictions of several members of one image into one set of nuclei (see the module docstring).

    Args:
        members: one :class:`CropMasks` per member (model x augmented copy), all in the original image frame.
        iou_threshold: mask IoU from which two predictions of different members are the same nucleus.
        min_votes: keep a nucleus only when at least this many members predicted it (2 drops singletons; 1 keeps
            all). Values above ``len(members)`` are clamped to it, so a single member passes through.
        mask_threshold: binarisation of the averaged soft mask (and of the masks compared for IoU).

    Returns:
        the merged nuclei, by decreasing score.
    """
    if not members:
        raise ValueError("merge_instances needs at least one member")
    if int(min_votes) < 1:
        raise ValueError(f"min_votes must be >= 1, got {min_votes}")
    need = min(int(min_votes), len(members))
    groups = group_instances(members, iou_threshold, mask_threshold)
    boxes, crops, scores, classes = [], [], [], []
    for g in groups:
        if len(g) < need:
            continue
        merged = merge_group(members, g, mask_threshold)
        if merged is None:
            continue
        boxes.append(merged[0])
        crops.append(merged[1])
        scores.append(merged[2])
        classes.append(merged[3])
    out = CropMasks(members[0].image_size, np.asarray(boxes, np.int64).reshape(-1, 4), crops,
                    np.asarray(scores, np.float32), np.asarray(classes, np.int64))
    order = np.argsort(-out.scores, kind="stable")
    return out.select(order)
