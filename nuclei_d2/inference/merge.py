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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["CropMasks", "group_instances", "mask_ious", "merge_group", "merge_instances"]


@dataclass
class CropMasks:
    """Instance masks of one image stored as crops.

    Attributes:
        image_size: ``(height, width)`` of the image the boxes refer to.
        boxes: ``N x 4`` int64 ``(x0, y0, x1, y1)``, ``x1``/``y1`` exclusive, inside the image.
        masks: ``N`` float32 arrays in ``[0, 1]``; mask ``i`` has shape ``(y1 - y0, x1 - x0)`` of box ``i``. Binary
            masks are stored as 0/1.
        scores: ``N`` float32 confidences.
        classes: ``N`` int64 class ids.
    """

    image_size: tuple[int, int]
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.int64))
    masks: list[np.ndarray] = field(default_factory=list)
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        self.boxes = np.asarray(self.boxes, dtype=np.int64).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.classes = np.asarray(self.classes, dtype=np.int64).reshape(-1)
        n = len(self.boxes)
        if not (len(self.masks) == n == len(self.scores) == len(self.classes)):
            raise ValueError(f"CropMasks: {n} boxes, {len(self.masks)} masks, {len(self.scores)} scores and "
                             f"{len(self.classes)} classes: they must be equally many")
        h, w = self.image_size
        for i, (box, m) in enumerate(zip(self.boxes, self.masks)):
            x0, y0, x1, y1 = (int(v) for v in box)
            if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                raise ValueError(f"CropMasks: box {i} {box.tolist()} is empty or outside the {h}x{w} image")
            if m.shape != (y1 - y0, x1 - x0):
                raise ValueError(f"CropMasks: mask {i} has shape {m.shape} but its box is {y1 - y0}x{x1 - x0}")

    def __len__(self) -> int:
        return len(self.boxes)

    @classmethod
    def from_masks(cls, masks: np.ndarray | torch.Tensor, scores: Any = None, classes: Any = None,
                   image_size: tuple[int, int] | None = None) -> CropMasks:
        """Crop full-size ``N x H x W`` masks (bool, or float probabilities in ``[0, 1]``) to their support.

        Instances with an empty mask are dropped (with their score and class).
        """
        t = masks if isinstance(masks, torch.Tensor) else torch.from_numpy(np.asarray(masks))
        if t.dim() != 3:
            raise ValueError(f"masks must be N x H x W, got shape {tuple(t.shape)}")
        n, h, w = t.shape
        t = t.detach().cpu()
        scores = np.ones(n, np.float32) if scores is None else _np(scores).astype(np.float32).reshape(-1)
        classes = np.zeros(n, np.int64) if classes is None else _np(classes).astype(np.int64).reshape(-1)
        if len(scores) != n or len(classes) != n:
            raise ValueError(f"{n} masks but {len(scores)} scores and {len(classes)} classes")
        support = t if t.dtype == torch.bool else t > 0
        rows = support.any(dim=2).numpy()  # N x H
        cols = support.any(dim=1).numpy()  # N x W
        keep, boxes, crops = [], [], []
        for i in range(n):
            ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
            if ys.size == 0:
                continue
            y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
            keep.append(i)
            boxes.append((x0, y0, x1, y1))
            crops.append(t[i, y0:y1, x0:x1].numpy().astype(np.float32))
        keep_idx = np.asarray(keep, dtype=np.int64)
        return cls(image_size or (h, w), np.asarray(boxes, dtype=np.int64).reshape(-1, 4), crops,
                   scores[keep_idx], classes[keep_idx])

    @classmethod
    def from_instances(cls, instances: Any) -> CropMasks:
        """From Detectron2 ``Instances`` with full-size ``pred_masks`` (bool or soft), ``scores``, ``pred_classes``."""
        if not instances.has("pred_masks"):
            raise ValueError("instances have no pred_masks: cannot merge them at the instance level")
        masks = instances.pred_masks
        masks = masks.tensor if hasattr(masks, "tensor") else masks
        if masks.dim() == 4:  # N x 1 x H x W
            masks = masks[:, 0]
        n = masks.shape[0]
        scores = instances.scores if instances.has("scores") else torch.ones(n)
        classes = instances.pred_classes if instances.has("pred_classes") else torch.zeros(n, dtype=torch.int64)
        return cls.from_masks(masks, scores, classes, image_size=tuple(instances.image_size))

    def binary(self, threshold: float = 0.5) -> list[np.ndarray]:
        """The masks as bool crops (``mask >= threshold``)."""
        return [m >= threshold for m in self.masks]

    def to_instances(self, threshold: float = 0.5) -> Any:
        """Detectron2 ``Instances`` (the model contract): bool full-size ``pred_masks`` (``mask >= threshold``),
        ``pred_boxes`` recomputed from the masks, ``scores``, ``pred_classes``. Empty masks are dropped."""
        from detectron2.structures import Boxes, Instances

        h, w = self.image_size
        keep, boxes = [], []
        for i, (box, m) in enumerate(zip(self.boxes, self.binary(threshold))):
            ys, xs = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
            if ys.size == 0:
                continue
            keep.append(i)
            boxes.append((box[0] + xs[0], box[1] + ys[0], box[0] + xs[-1] + 1, box[1] + ys[-1] + 1))
        masks = torch.zeros((len(keep), h, w), dtype=torch.bool)
        for k, i in enumerate(keep):
            x0, y0, x1, y1 = (int(v) for v in self.boxes[i])
            masks[k, y0:y1, x0:x1] = torch.from_numpy(self.masks[i] >= threshold)
        inst = Instances((h, w))
        inst.pred_masks = masks
        inst.pred_boxes = Boxes(torch.tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)))
        idx = np.asarray(keep, dtype=np.int64)
        inst.scores = torch.from_numpy(self.scores[idx].copy())
        inst.pred_classes = torch.from_numpy(self.classes[idx].copy())
        return inst

    def select(self, index: Sequence[int] | np.ndarray) -> CropMasks:
        """The instances at ``index`` (in that order)."""
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        return CropMasks(self.image_size, self.boxes[idx], [self.masks[i] for i in idx], self.scores[idx],
                         self.classes[idx])


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


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
