"""Nucleus metrics: hand-computed cases, edge cases, and agreement with a plain per-instance implementation.

``plain_metrics`` below is deliberately written the slow, obvious way (one full-image boolean mask per nucleus,
dense G x P matrices, Hungarian on the whole matrix, Hausdorff on pixel coordinates with SciPy) and shares no code
with ``nuclei_d2.evaluation.metrics``. ``benchmarks/bench_metrics.py`` times it against the real implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import directed_hausdorff

from nuclei_d2.evaluation.metrics import (
    COUNT_KEYS,
    METRIC_KEYS,
    aggregate_metrics,
    compute_metrics,
    contingency_table,
    match_max_iou,
    metrics_from_counts,
)

# ---------------------------------------------------------------------------------------------------------------------
# The plain reference implementation
# ---------------------------------------------------------------------------------------------------------------------


def _hd(a_pts: np.ndarray, b_pts: np.ndarray) -> float:
    return max(directed_hausdorff(a_pts, b_pts)[0], directed_hausdorff(b_pts, a_pts)[0])


def plain_metrics(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> dict[str, float]:
    """Every metric of ``nuclei_d2.evaluation.metrics`` computed with per-instance full-image masks."""
    gids = [v for v in np.unique(gt).tolist() if v != 0]
    pids = [v for v in np.unique(pred).tolist() if v != 0]
    gmask = [gt == v for v in gids]
    pmask = [pred == v for v in pids]
    n_g, n_p = len(gids), len(pids)
    ga = np.array([m.sum() for m in gmask], dtype=float)
    pa = np.array([m.sum() for m in pmask], dtype=float)
    inter = np.zeros((n_g, n_p))
    column = {v: j for j, v in enumerate(pids)}
    for i in range(n_g):
        values, counts = np.unique(pred[gmask[i]], return_counts=True)
        for v, n in zip(values.tolist(), counts.tolist()):
            if v != 0:
                inter[i, column[v]] = n
    union = ga[:, None] + pa[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    both_empty = n_g == 0 and n_p == 0

    def ratio(num, den):
        return (1.0 if both_empty else 0.0) if den == 0 else num / den

    out: dict[str, float] = {}
    # AJI (Kumar): best IoU prediction per ground-truth nucleus (first on ties), reuse allowed.
    c = u = 0.0
    used = set()
    for i in range(n_g):
        if n_p == 0 or iou[i].max() == 0:
            u += ga[i]
            continue
        j = int(np.argmax(iou[i]))
        c += inter[i, j]
        u += union[i, j]
        used.add(j)
    u += sum(pa[j] for j in range(n_p) if j not in used)
    out["AJI"] = ratio(c, u)
    # AJI+: Hungarian on the whole IoU matrix.
    c = u = 0.0
    mg, mp = set(), set()
    if n_g and n_p:
        rows, cols = linear_sum_assignment(-iou)
        for i, j in zip(rows, cols):
            if iou[i, j] > 0:
                c += inter[i, j]
                u += union[i, j]
                mg.add(i)
                mp.add(j)
    u += sum(ga[i] for i in range(n_g) if i not in mg) + sum(pa[j] for j in range(n_p) if j not in mp)
    out["AJI+"] = ratio(c, u)
    # PQ
    tp = int((iou > 0.5).sum())
    iou_sum = iou[iou > 0.5].sum()
    dq = ratio(tp, tp + 0.5 * (n_p - tp) + 0.5 * (n_g - tp))
    sq = ratio(iou_sum, tp)
    out.update(PQ=dq * sq, DQ=dq, SQ=sq)
    # F1 at iou_threshold
    if iou_threshold >= 0.5:
        tp = int((iou > iou_threshold).sum())
    else:
        tp = 0
        if n_g and n_p:
            w = np.where(iou > iou_threshold, iou, 0.0)
            rows, cols = linear_sum_assignment(-w)
            tp = int(sum(w[i, j] > iou_threshold for i, j in zip(rows, cols)))
    out["F1"] = ratio(2 * tp, n_g + n_p)
    out["precision"] = ratio(tp, n_p)
    out["recall"] = ratio(tp, n_g)
    # Dice1, Dice2
    fg_g, fg_p = gt != 0, pred != 0
    out["Dice1"] = ratio(2 * np.logical_and(fg_g, fg_p).sum(), fg_g.sum() + fg_p.sum())
    overlapping = inter > 0
    out["Dice2"] = ratio(2 * inter[overlapping].sum(), (ga[:, None] + pa[None, :])[overlapping].sum())
    # Object Dice and Hausdorff (GlaS)
    diag = math.hypot(*gt.shape)
    gpts = [np.argwhere(m) for m in gmask]
    ppts = [np.argwhere(m) for m in pmask]

    def hausdorff_side(n_a, n_b, area_a, inter_ab, pts_a, pts_b):
        h_sum = 0.0
        for i in range(n_a):
            if n_b == 0:
                h = diag
            elif inter_ab[i].max() > 0:
                h = _hd(pts_a[i], pts_b[int(np.argmax(inter_ab[i]))])
            else:
                hs = [_hd(pts_a[i], pts_b[k]) for k in range(n_b)]
                h = hs[int(np.argmin(hs))]
            h_sum += area_a[i] * h
        return h_sum / area_a.sum()

    def dice_side(n_a, n_b, area_a, area_b, inter_ab):
        s = 0.0
        for i in range(n_a):
            if n_b and inter_ab[i].max() > 0:
                j = int(np.argmax(inter_ab[i]))
                s += area_a[i] * 2 * inter_ab[i, j] / (area_a[i] + area_b[j])
        return s / area_a.sum()

    halves_d, halves_h = [], []
    if n_g:
        halves_d.append(dice_side(n_g, n_p, ga, pa, inter))
        halves_h.append(hausdorff_side(n_g, n_p, ga, inter, gpts, ppts))
    if n_p:
        halves_d.append(dice_side(n_p, n_g, pa, ga, inter.T))
        halves_h.append(hausdorff_side(n_p, n_g, pa, inter.T, ppts, gpts))
    out["Dice_obj"] = float(np.mean(halves_d)) if halves_d else 1.0
    out["Hausdorff_obj"] = float(np.mean(halves_h)) if halves_h else 0.0
    # MDR / FDR / USR / OSR with the majority rule
    g_in_p = inter * 2 > ga[:, None]
    p_in_g = inter * 2 > pa[None, :]
    missed = sum(1 for i in range(n_g) if not g_in_p[i].any() and not p_in_g[i].any())
    false = sum(1 for j in range(n_p) if not g_in_p[:, j].any() and not p_in_g[:, j].any())
    over = sum(1 for i in range(n_g) if p_in_g[i].sum() >= 2)
    merged = g_in_p.sum(axis=0) >= 2  # detections holding the majority of two or more nuclei
    under = sum(1 for i in range(n_g) if (g_in_p[i] & merged).any())
    out["MDR"] = missed / n_g if n_g else 0.0
    out["FDR"] = false / n_p if n_p else 0.0
    out["USR"] = under / n_g if n_g else 0.0
    out["OSR"] = over / n_g if n_g else 0.0
    return out


def assert_agrees(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> dict[str, float]:
    got = compute_metrics(gt, pred, iou_threshold)
    want = plain_metrics(gt, pred, iou_threshold)
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-9), (k, got[k], want[k])
    return got


# ---------------------------------------------------------------------------------------------------------------------
# Label-map generators and perturbations
# ---------------------------------------------------------------------------------------------------------------------


def random_label_map(rng: np.random.Generator, shape=(64, 64), n_seeds=25, fill=0.6) -> np.ndarray:
    """Voronoi cells of random seeds, kept where a smooth random field is high: touching nuclei of random shapes."""
    h, w = shape
    seeds = rng.uniform(0, [h, w], size=(n_seeds, 2))
    yy, xx = np.mgrid[0:h, 0:w]
    d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    cell = d.argmin(axis=2) + 1
    dist = np.sqrt(d.min(axis=2))
    radius = rng.uniform(2, 8, size=n_seeds + 1)
    keep = dist < radius[cell] * (fill + 0.6 * rng.random(shape))
    return np.where(keep, cell, 0)


def erode(label: np.ndarray) -> np.ndarray:
    """Remove every pixel with a 4-neighbour of another value (boundaries between and around nuclei)."""
    out = label.copy()
    pad = np.pad(label, 1, mode="edge")
    c = pad[1:-1, 1:-1]
    border = (pad[:-2, 1:-1] != c) | (pad[2:, 1:-1] != c) | (pad[1:-1, :-2] != c) | (pad[1:-1, 2:] != c)
    out[border] = 0
    return out


def shift(label: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(label)
    h, w = label.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = label[max(-dy, 0):h - max(dy, 0),
                                                                       max(-dx, 0):w - max(dx, 0)]
    return out


def touching_pairs(label: np.ndarray) -> list[tuple[int, int]]:
    """Pairs of distinct nuclei that share a 4-connected edge."""
    a = np.concatenate([label[:, :-1].ravel(), label[:-1, :].ravel()])
    b = np.concatenate([label[:, 1:].ravel(), label[1:, :].ravel()])
    keep = (a != b) & (a != 0) & (b != 0)
    pairs = np.unique(np.sort(np.stack([a[keep], b[keep]], axis=1), axis=1), axis=0)
    return [tuple(p) for p in pairs.tolist()]


def perturb(label: np.ndarray, rng: np.random.Generator, merge: str = "any") -> np.ndarray:
    """A plausible prediction: shifted, some nuclei merged, split, dropped, plus false positives.

    ``merge="any"`` merges random nuclei (also distant ones: one label in two pieces, a hard case for the Hausdorff
    distance); ``merge="adjacent"`` merges only touching nuclei, as a model's under-segmentation does.
    """
    out = shift(label, int(rng.integers(-2, 3)), int(rng.integers(-2, 3)))
    values = [v for v in np.unique(out).tolist() if v != 0]
    rng.shuffle(values)
    n = len(values)
    k = max(n // 10, 1)
    if merge == "adjacent":
        taken: set[int] = set()
        pairs = touching_pairs(out)
        for idx in rng.permutation(len(pairs)).tolist():
            a, b = pairs[idx]
            if a not in taken and b not in taken and len(taken) < 2 * k:
                out[out == b] = a
                taken |= {a, b}
        rest = [v for v in values if v not in taken]
    else:
        for a, b in zip(values[:k], values[k:2 * k]):  # merges (also of distant nuclei: one label, two blobs)
            out[out == b] = a
        rest = values[2 * k:]
    for v in rest[:k]:  # splits along the centroid column
        ys, xs = np.nonzero(out == v)
        if xs.size > 1:
            half = xs > np.median(xs)
            out[ys[half], xs[half]] = out.max() + 1
    for v in rest[k:2 * k]:  # misses
        out[out == v] = 0
    h, w = out.shape
    for _ in range(k):  # false positives: small squares in the background
        y, x = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        if not out[y:y + 4, x:x + 4].any():
            out[y:y + 4, x:x + 4] = out.max() + 1
    return out


def square_grid(n_side: int, size: int, gap: int) -> np.ndarray:
    step = size + gap
    out = np.zeros((n_side * step, n_side * step), dtype=np.int32)
    k = 1
    for r in range(n_side):
        for c in range(n_side):
            out[r * step:r * step + size, c * step:c * step + size] = k
            k += 1
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------------------------------


def test_identical_maps_are_perfect():
    gt = np.zeros((12, 12), dtype=np.uint16)
    gt[1:4, 1:5] = 7
    gt[6:10, 6:9] = 300
    m = compute_metrics(gt, gt.copy())
    for k in ("AJI", "AJI+", "PQ", "DQ", "SQ", "F1", "precision", "recall", "Dice1", "Dice2", "Dice_obj"):
        assert m[k] == 1.0, k
    for k in ("Hausdorff_obj", "MDR", "FDR", "USR", "OSR"):
        assert m[k] == 0.0, k
    assert (m["n_gt"], m["n_pred"], m["TP"]) == (2, 2, 2)


def test_merge():
    # GT: two 2x2 nuclei separated by one column; prediction: one 2x5 nucleus covering both and the gap.
    gt = np.zeros((6, 8), dtype=np.int32)
    gt[0:2, 0:2] = 1
    gt[0:2, 3:5] = 2
    pred = np.zeros_like(gt)
    pred[0:2, 0:5] = 5
    m = compute_metrics(gt, pred)
    # Both pairs: intersection 4, union 10, IoU 0.4.
    assert m["AJI"] == pytest.approx(8 / 20)                 # both GT nuclei use the prediction
    assert m["AJI+"] == pytest.approx(4 / (10 + 4))          # one pair; the other GT nucleus adds its 4 pixels
    assert (m["PQ"], m["DQ"], m["SQ"]) == (0.0, 0.0, 0.0)   # no IoU > 0.5
    assert (m["TP"], m["FP"], m["FN"]) == (0, 1, 2)
    assert m["Dice1"] == pytest.approx(2 * 8 / (8 + 10))
    assert m["Dice2"] == pytest.approx(2 * 8 / ((4 + 10) + (4 + 10)))
    assert m["Dice_obj"] == pytest.approx(8 / 14)           # every object's Dice is 2*4/14
    assert m["Hausdorff_obj"] == pytest.approx(3.0)         # farthest prediction pixel is 3 columns from either
    assert (m["MDR"], m["FDR"], m["USR"], m["OSR"]) == (0.0, 0.0, 1.0, 0.0)  # both nuclei merged
    assert_agrees(gt, pred)


def test_split_and_strict_pq_threshold():
    # GT: one 2x4 nucleus; prediction: its two 2x2 halves. Both IoUs are exactly 0.5, which PQ does not accept.
    gt = np.zeros((4, 6), dtype=np.uint8)
    gt[0:2, 0:4] = 1
    pred = np.zeros_like(gt)
    pred[0:2, 0:2] = 1
    pred[0:2, 2:4] = 2
    m = compute_metrics(gt, pred)
    assert m["PQ_TP"] == 0 and m["PQ"] == 0.0
    assert m["AJI"] == pytest.approx(4 / (8 + 4))           # first half (tie -> smaller label), second unused
    assert m["AJI+"] == pytest.approx(4 / (8 + 4))
    assert m["Dice1"] == 1.0
    assert m["Dice2"] == pytest.approx(16 / 24)
    assert m["Dice_obj"] == pytest.approx(2 / 3)
    assert m["Hausdorff_obj"] == pytest.approx(2.0)
    assert (m["MDR"], m["FDR"], m["USR"], m["OSR"]) == (0.0, 0.0, 0.0, 1.0)
    # At IoU > 0.3 one half is matched one-to-one.
    m3 = compute_metrics(gt, pred, iou_threshold=0.3)
    assert (m3["TP"], m3["FP"], m3["FN"]) == (1, 1, 0)
    assert (m3["precision"], m3["recall"]) == (0.5, 1.0)
    assert m3["F1"] == pytest.approx(2 / 3)
    assert_agrees(gt, pred, 0.3)


def test_miss_and_false_positive():
    gt = np.zeros((8, 10), dtype=np.int64)
    gt[0:2, 0:2] = 1
    gt[4:6, 4:6] = 2           # missed
    pred = np.zeros_like(gt)
    pred[0:2, 0:2] = 1
    pred[0:2, 8:10] = 2        # false positive
    m = compute_metrics(gt, pred)
    assert m["AJI"] == pytest.approx(4 / 12) and m["AJI+"] == pytest.approx(4 / 12)
    assert (m["DQ"], m["SQ"], m["PQ"]) == (0.5, 1.0, 0.5)
    assert (m["F1"], m["precision"], m["recall"]) == (0.5, 0.5, 0.5)
    assert m["Dice1"] == 0.5 and m["Dice2"] == 1.0 and m["Dice_obj"] == 0.5
    # The missed nucleus and the false positive take their nearest object at Hausdorff distance 4*sqrt(2).
    assert m["Hausdorff_obj"] == pytest.approx(2 * math.sqrt(2))
    assert (m["MDR"], m["FDR"], m["USR"], m["OSR"]) == (0.5, 0.5, 0.0, 0.0)
    assert_agrees(gt, pred)


def test_hausdorff_maximum_inside_an_object():
    # Prediction = GT square with a 3x3 hole: the farthest GT pixel from the prediction is the hole's centre.
    gt = np.zeros((9, 9), dtype=np.int32)
    gt[1:8, 1:8] = 1
    pred = gt.copy()
    pred[3:6, 3:6] = 0
    m = compute_metrics(gt, pred)
    assert m["Hausdorff_obj"] == pytest.approx(2.0)
    assert_agrees(gt, pred)


def test_hausdorff_of_a_label_in_distant_pieces():
    # One GT label made of two 2x2 squares 100 pixels apart diagonally; the prediction finds only the first square.
    # The pair's box is large, so the KD-tree path runs; the farthest GT pixel (101, 101) is 100*sqrt(2) from (1, 1).
    gt = np.zeros((110, 110), dtype=np.int32)
    gt[0:2, 0:2] = 4
    gt[100:102, 100:102] = 4
    pred = np.zeros_like(gt)
    pred[0:2, 0:2] = 9
    m = compute_metrics(gt, pred)
    assert m["Hausdorff_obj"] == pytest.approx(100 * math.sqrt(2))
    assert m["Dice_obj"] == pytest.approx(2 / 3)
    # A far-away false positive takes the nearest nucleus by Hausdorff distance.
    pred[60:63, 5:8] = 2
    assert_agrees(gt, pred)


def test_hausdorff_of_very_large_objects():
    # Crops beyond float32's exact range use SciPy's float64 transform: a 1030x1030 nucleus shifted by (3, 4).
    gt = np.zeros((1040, 1040), dtype=np.uint8)
    gt[2:1032, 2:1032] = 1
    pred = shift(gt, 3, 4)
    assert compute_metrics(gt, pred)["Hausdorff_obj"] == pytest.approx(5.0)
    pred = gt.copy()
    pred[0:1040, 0:1040] = 1  # prediction covers the whole crop: GT inside it, farthest prediction pixel (1039, 1039)
    assert compute_metrics(gt, pred)["Hausdorff_obj"] == pytest.approx(math.hypot(8, 8))


@pytest.mark.parametrize("which", ["gt", "pred", "both"])
def test_empty_maps(which):
    obj = np.zeros((10, 10), dtype=np.int32)
    obj[2:4, 2:4] = 3
    empty = np.zeros_like(obj)
    gt, pred = {"gt": (empty, obj), "pred": (obj, empty), "both": (empty, empty)}[which]
    m = compute_metrics(gt, pred)
    scores = ("AJI", "AJI+", "PQ", "DQ", "SQ", "F1", "precision", "recall", "Dice1", "Dice2", "Dice_obj")
    if which == "both":
        assert all(m[k] == 1.0 for k in scores)
        assert all(m[k] == 0.0 for k in ("Hausdorff_obj", "MDR", "FDR", "USR", "OSR"))
    else:
        assert all(m[k] == 0.0 for k in scores)
        assert m["Hausdorff_obj"] == pytest.approx(math.hypot(10, 10))
        assert m["MDR"] == (1.0 if which == "pred" else 0.0)
        assert m["FDR"] == (1.0 if which == "gt" else 0.0)
        assert m["USR"] == m["OSR"] == 0.0
    assert_agrees(gt, pred)


def test_any_label_values_and_dtypes_give_the_same_result():
    rng = np.random.default_rng(3)
    gt = random_label_map(rng)
    pred = perturb(gt, rng)
    ref = compute_metrics(gt.astype(np.int32), pred.astype(np.int32))

    def spread(lab, dtype, offset, step):
        # Increasing remap (ties between equally good partners go to the smaller label, so keep the order).
        return np.where(lab > 0, lab.astype(np.int64) * step + offset, 0).astype(dtype)

    variants = [
        (gt.astype(np.uint8), pred.astype(np.uint16)),
        (spread(gt, np.uint32, 3_000_000_000, 1000), spread(pred, np.int64, 1, 7)),
        (spread(gt, np.int64, 10**12, 10**9), spread(pred, np.uint64, 2**40, 2**20)),
        (spread(gt, np.int16, -1000, 1), pred.astype(np.int32)),   # negative labels are nuclei too
        (gt.astype(np.float32), pred.astype(np.float64)),          # integral floats
    ]
    for g, p in variants:
        m = compute_metrics(g, p)
        for k in METRIC_KEYS:
            assert m[k] == pytest.approx(ref[k], rel=1e-12), k


def test_bool_maps_are_one_nucleus():
    gt = np.zeros((6, 6), dtype=bool)
    gt[1:3, 1:3] = True
    m = compute_metrics(gt, gt)
    assert m["n_gt"] == 1 and m["AJI"] == 1.0


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="same size"):
        compute_metrics(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(ValueError, match="2-D"):
        compute_metrics(np.zeros((4, 4, 1), int), np.zeros((4, 4), int))
    with pytest.raises(TypeError, match="integers"):
        compute_metrics(np.full((4, 4), 0.5), np.zeros((4, 4), int))
    with pytest.raises(ValueError, match="iou_threshold"):
        compute_metrics(np.zeros((4, 4), int), np.zeros((4, 4), int), iou_threshold=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Agreement with the plain implementation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_plain_implementation_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    gt = random_label_map(rng, n_seeds=int(rng.integers(5, 40)))
    pred = perturb(gt, rng) if seed % 3 else random_label_map(rng, n_seeds=30)  # related and unrelated maps
    for t in (0.5, 0.3, 0.7):
        assert_agrees(gt, pred, t)


def test_agrees_on_eroded_and_shifted_maps():
    rng = np.random.default_rng(11)
    gt = random_label_map(rng, shape=(80, 70), n_seeds=40)
    assert_agrees(gt, erode(gt))
    assert_agrees(gt, shift(gt, 3, -2))
    assert_agrees(erode(gt), gt)


def test_thousands_of_nuclei_use_the_sparse_table_and_agree():
    # 1,225 nuclei of 4x4 on a 210x210 map: the dense table (1226^2 bins) would exceed the image, so the sparse
    # path runs. Shifting by one column gives every pair intersection 12, union 20.
    gt = square_grid(35, 4, 2)
    pred = shift(gt, 0, 1)
    m = compute_metrics(gt, pred)
    assert m["n_gt"] == 1225
    assert m["AJI"] == pytest.approx(0.6) and m["SQ"] == pytest.approx(0.6) and m["DQ"] == 1.0
    assert m["Dice1"] == pytest.approx(0.75) and m["Dice2"] == pytest.approx(0.75)
    assert m["Hausdorff_obj"] == pytest.approx(1.0)
    t = contingency_table(gt, pred)
    assert (t.n_gt + 1) * (t.n_pred + 1) > gt.size  # the sparse path
    assert_agrees(gt, erode(shift(gt, 1, -1)))
    assert_agrees(gt[:90, :90], perturb(gt[:90, :90], np.random.default_rng(0)))


@pytest.mark.real_data
def test_agrees_on_real_monuseg_label_maps(shared_data):
    folder = shared_data / "monuseg2018" / "train" / "labels"
    files = sorted(folder.glob("*.png"))
    if not files:
        pytest.skip(f"no MoNuSeg label maps in {folder}")
    from PIL import Image

    rng = np.random.default_rng(2018)
    for path in (files[0], files[-1]):
        full = np.array(Image.open(path))
        assert full.dtype == np.uint16
        gt = full[300:560, 400:640]  # a crop keeps the plain implementation fast
        for pred in (erode(gt), shift(gt, 2, -3), perturb(gt, rng), perturb(gt, rng, merge="adjacent")):
            assert_agrees(gt, pred)


# ---------------------------------------------------------------------------------------------------------------------
# Matching, aggregation
# ---------------------------------------------------------------------------------------------------------------------


def test_matching_equals_dense_hungarian():
    rng = np.random.default_rng(5)
    for _ in range(20):
        n_g, n_p = int(rng.integers(1, 12)), int(rng.integers(1, 12))
        w = np.where(rng.random((n_g, n_p)) < 0.3, rng.random((n_g, n_p)), 0.0)
        gi, pj = np.nonzero(w)
        sel = match_max_iou(gi, pj, w[gi, pj], n_g, n_p)
        assert len(set(gi[sel].tolist())) == sel.size and len(set(pj[sel].tolist())) == sel.size
        rows, cols = linear_sum_assignment(w, maximize=True)
        assert w[gi[sel], pj[sel]].sum() == pytest.approx(w[rows, cols].sum())


def test_aggregate_mean_and_pooled():
    a = np.zeros((6, 8), dtype=np.int32)
    a[0:2, 0:2] = 1
    a[0:2, 3:5] = 2
    merged = np.zeros_like(a)
    merged[0:2, 0:5] = 1
    r1 = compute_metrics(a, a)          # AJI 1
    r2 = compute_metrics(a, merged)     # AJI 8/20
    agg = aggregate_metrics([r1, r2])
    assert agg["n_images"] == 2
    assert agg["mean"]["AJI"] == pytest.approx((1 + 0.4) / 2)
    assert agg["pooled"]["AJI"] == pytest.approx((8 + 8) / (8 + 20))
    assert agg["counts"]["n_gt"] == 4
    assert set(agg["pooled"]) == set(METRIC_KEYS)
    # Pooling one image reproduces it.
    one = metrics_from_counts({k: r2[k] for k in COUNT_KEYS})
    assert all(one[k] == pytest.approx(r2[k]) for k in METRIC_KEYS)


def test_hausdorff_can_be_skipped():
    gt = square_grid(3, 4, 2)
    m = compute_metrics(gt, shift(gt, 1, 0), hausdorff=False)
    assert math.isnan(m["Hausdorff_obj"]) and m["AJI"] == pytest.approx(0.6)
    agg = aggregate_metrics([m, compute_metrics(gt, gt, hausdorff=False)])
    assert math.isnan(agg["mean"]["Hausdorff_obj"]) and agg["mean"]["AJI"] == pytest.approx(0.8)
