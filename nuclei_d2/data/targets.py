"""Dense training targets derived from an instance label map (0 = background, any other value = one nucleus).

Every function here is a pure numpy/scipy function of a label map: the mapper calls them *after* the geometric
augmentations moved the label map (nearest-neighbour), so no target is ever interpolated. Per-nucleus work runs on
the nucleus' bounding box (``scipy.ndimage.find_objects``), never on a full-size mask per nucleus, so a 1000x1000 tile
with ~600 nuclei takes tens of milliseconds (see ``docs/stain_and_targets.md`` for measured timings).

Targets and the methods that use them
-------------------------------------
=====================  ==========================================================================================
name                   what (dtype)
=====================  ==========================================================================================
``foreground``         nucleus (1) vs background (0) (uint8)
``ternary``            background 0 / boundary 1 / inside 2 (uint8) — nucleus-boundary model, Cui et al. 2019
``boundary``           the boundary class of ``ternary`` as a binary map (uint8)
``distance``           per-nucleus Euclidean distance to the nucleus border, divided by the nucleus' maximum, in
                       (0, 1] inside nuclei, 0 outside (float32) — two-stage U-Net (Mahbod et al. 2019), Mask R-CNN+
``distance_raw``       the same distance, not normalised, in pixels (float32)
``eroded``             binarised, touching borders removed, eroded (uint8) — two-stage U-Net stage-1 target
``edge_weight``        W = alpha * De / (Dc + De) of the nucleus-boundary paper (float32, mean 1; shape only)
``hv``                 2 x H x W: each nucleus pixel's horizontal (channel 0, x - x_c) and vertical (channel 1,
                       y - y_c) offset from its nucleus' centre of mass, each scaled into [-1, 1] per nucleus, 0 on
                       background (float32) — HoVer-Net-style head of the NB U-Net (Graham et al. 2019)
=====================  ==========================================================================================

Image-border convention: a nucleus cut by the image (or crop) border is not considered to end there — the cut edge
is no contour (no boundary pixels, distances are not pulled to zero). This is what ``scipy.ndimage`` does for a
full-image mask and what one wants for random training crops, where the cut is an artefact of the crop. Pass
``border_is_contour=True`` to treat the image border as background instead.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

from ..layers.morphology import disk
from ..layers.tiling import edge_weight_map
from ..structures import relabel_sequential

__all__ = [
    "TARGET_NAMES",
    "boundary_map",
    "build_targets",
    "distance_map",
    "eroded_foreground",
    "foreground_map",
    "hv_map",
    "instance_distance",
    "rebinarize_ternary",
    "ternary_map",
    "touching_pixels",
]

# Class values of the ternary map.
BACKGROUND, BOUNDARY, INSIDE = 0, 1, 2


def _as_label(label: np.ndarray) -> np.ndarray:
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"an instance label map must be 2-D, got shape {label.shape}")
    if label.dtype == bool:
        return label.astype(np.int32)
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"an instance label map must hold integers, got dtype {label.dtype}")
    if label.size and int(label.min()) < 0:
        raise ValueError(f"an instance label map must be >= 0, got minimum {int(label.min())}")
    return label


def foreground_map(label: np.ndarray) -> np.ndarray:
    """Binary foreground: 1 where any nucleus is, 0 elsewhere (uint8).

    The semantic target of every U-Net-like method (e.g. Mahbod et al. 2019, stage 1 before the ground-truth
    modification of :func:`eroded_foreground`).
    """
    return (_as_label(label) > 0).astype(np.uint8)


def _distances(label: np.ndarray, border_is_contour: bool, want_raw: bool, want_norm: bool
               ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Raw and/or per-nucleus-normalised distance maps in one pass over the nuclei' bounding boxes."""
    raw = np.zeros(label.shape, dtype=np.float32) if want_raw else None
    norm = np.zeros(label.shape, dtype=np.float32) if want_norm else None
    if label.size == 0 or not label.any():
        return raw, norm
    seq = relabel_sequential(label)
    h, w = seq.shape
    for idx, sl in enumerate(ndimage.find_objects(seq)):
        if sl is None:
            continue
        # Grow the box by one pixel: that ring holds no pixel of this nucleus, so the nearest "other" pixel of any
        # nucleus pixel lies inside the grown box (clamping a far pixel onto the ring only brings it closer).
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        gy0, gy1, gx0, gx1 = max(y0 - 1, 0), min(y1 + 1, h), max(x0 - 1, 0), min(x1 + 1, w)
        mask = seq[gy0:gy1, gx0:gx1] == idx + 1
        if border_is_contour:
            pad = ((int(gy0 == 0), int(gy1 == h)), (int(gx0 == 0), int(gx1 == w)))
            dist = ndimage.distance_transform_edt(np.pad(mask, pad))[pad[0][0]:pad[0][0] + mask.shape[0],
                                                                     pad[1][0]:pad[1][0] + mask.shape[1]]
        elif mask.all():  # one nucleus fills the whole image: it has no contour
            dist = np.ones(mask.shape, dtype=np.float64)
        else:
            dist = ndimage.distance_transform_edt(mask)
        values = dist[mask]
        if raw is not None:
            raw[gy0:gy1, gx0:gx1][mask] = values
        if norm is not None:
            norm[gy0:gy1, gx0:gx1][mask] = values / values.max()
    return raw, norm


def instance_distance(label: np.ndarray, normalize: bool = True, border_is_contour: bool = False) -> np.ndarray:
    """Per-nucleus Euclidean distance of each nucleus pixel to the nearest pixel *not* of that nucleus.

    Background and other nuclei both count as "not this nucleus", so two touching nuclei each get their own distance
    ramp (distance 1 on the shared contour). Pixels outside nuclei are 0. Computed on each nucleus' bounding box
    grown by one pixel, which gives exactly the full-image ``distance_transform_edt`` of the nucleus' mask.

    Args:
        label: instance label map.
        normalize: divide each nucleus' distances by that nucleus' maximum, so every nucleus peaks at exactly 1 —
            the distance map of the two-stage U-Net (Mahbod et al. 2019, Sec. 2, stage-2 target) and of Mask R-CNN+
            (its extra input channel). With ``False`` the distances are in pixels.
        border_is_contour: treat pixels beyond the image border as background (see the module docstring).

    Returns:
        float32 map of the label map's shape.
    """
    label = _as_label(label)
    raw, norm = _distances(label, border_is_contour, want_raw=not normalize, want_norm=normalize)
    return norm if normalize else raw  # type: ignore[return-value]


def distance_map(label: np.ndarray, normalize: bool = True, border_is_contour: bool = False) -> np.ndarray:
    """Distance map target: :func:`instance_distance` (normalised to [0, 1] per nucleus by default).

    Mahbod et al. 2019 ("A two-stage U-Net algorithm for segmentation of nuclei in H&E-stained tissues", Sec. 2.2):
    the second U-Net regresses, for every nucleus pixel, its Euclidean distance to the nucleus border normalised by
    the nucleus' maximum, whose local maxima then seed a marker-controlled watershed. Mask R-CNN+ feeds the same map
    as an extra input channel.
    """
    return instance_distance(label, normalize=normalize, border_is_contour=border_is_contour)


def _boundary(label: np.ndarray, boundary_width: float, border_is_contour: bool) -> np.ndarray:
    """Nucleus pixels with a pixel of another value (background or another nucleus) within ``boundary_width``.

    Equivalent to ``instance_distance(label, normalize=False) <= boundary_width`` on nucleus pixels (a pixel's
    distance to the nearest "other" pixel is at most w iff the disk of radius w around it holds one), but computed
    with two grey-level morphology passes instead of a distance transform per nucleus.
    """
    if boundary_width <= 0:
        raise ValueError(f"boundary_width must be > 0 pixels, got {boundary_width}")
    if label.size == 0:
        return np.zeros(label.shape, dtype=bool)
    lab = label if int(label.max()) < (1 << 24) else relabel_sequential(label)
    if int(lab.max()) >= (1 << 24):
        raise ValueError(f"more than 2^24 nuclei in one label map ({int(lab.max())})")
    f = lab.astype(np.float32)  # exact for integers below 2^24; OpenCV morphology has no int32 path
    kernel = disk(boundary_width).astype(np.uint8)
    # Replicating the edge never creates a nearer "other" pixel than a real one, so it reproduces the "image border
    # is no contour" convention exactly; a constant 0 border makes the image border background.
    border = dict(borderType=cv2.BORDER_CONSTANT, borderValue=0) if border_is_contour else \
        dict(borderType=cv2.BORDER_REPLICATE)
    hi = cv2.dilate(f, kernel, **border)
    lo = cv2.erode(f, kernel, **border)
    return (lab > 0) & ((hi != f) | (lo != f))


def ternary_map(label: np.ndarray, boundary_width: float = 2, border_is_contour: bool = False) -> np.ndarray:
    """Background (0) / boundary (1) / inside (2) map of the nucleus-boundary (NB) model.

    Cui et al. 2019, "A deep learning algorithm for one-step contour aware nuclei segmentation of histopathology
    images" (Med. Biol. Eng. Comput.; arXiv:1803.02786), Sec. "Nucleus-boundary model": the network predicts
    nucleus, boundary and background at once, and touching nuclei are separated by the predicted boundary.

    A nucleus pixel is *boundary* when its Euclidean distance to the nearest pixel outside its own nucleus is at most
    ``boundary_width`` (so ``boundary_width=1`` gives the 4-connected inner contour, 2 a two-pixel band). "Outside"
    includes other nuclei: the contour between two touching nuclei is boundary for both. The boundary lies inside
    the annotation (annotated pixels only), so the nuclei keep their annotated area.
    """
    label = _as_label(label)
    out = (label > 0).astype(np.uint8) * INSIDE
    out[_boundary(label, boundary_width, border_is_contour)] = BOUNDARY
    return out


def boundary_map(label: np.ndarray, boundary_width: float = 2, border_is_contour: bool = False) -> np.ndarray:
    """Binary instance-boundary map: 1 on the boundary class of :func:`ternary_map`, 0 elsewhere (uint8).

    The contour target of contour-aware models (boundary branch of Cui et al. 2019; the boundary channel used to
    separate touching nuclei). Same ``boundary_width`` semantics as :func:`ternary_map`.
    """
    return _boundary(_as_label(label), boundary_width, border_is_contour).astype(np.uint8)


def rebinarize_ternary(ternary: np.ndarray, thresholds: tuple[float, float] = (0.5, 1.5),
                       values: tuple[float, float, float] = (0, 1, 2), enforce_enclosure: bool = True
                       ) -> np.ndarray:
    """Turn an interpolated (augmented) ternary map back into exact classes 0 / 1 / 2.

    Cui et al. 2019 augment image and ternary ground truth together with interpolating transforms (rotation, elastic
    deformation, scaling), which leaves values between the classes, and re-assign them with three rules. We could not
    obtain the exact wording of the rules, so this is **our reading**, chosen so that the invariants of a ternary map
    survive (every nucleus interior stays enclosed by boundary, touching nuclei stay separated):

    1. *Background*: a pixel whose value (rescaled so that ``values`` map to 0, 1, 2) is below ``thresholds[0]``
       (nearest to the background value) becomes background.
    2. *Inside*: a pixel whose rescaled value is at least ``thresholds[1]`` (nearest to the inside value) becomes
       inside.
    3. *Boundary*: every other pixel — i.e. any pixel that got a substantial share of boundary, or a mix of
       background and inside — becomes boundary. Ties at the thresholds favour background/inside only by the
       inequalities above; boundary absorbs the uncertain band, which keeps the separating contour closed.

    With ``enforce_enclosure`` an extra consistency step turns inside pixels that are 4-adjacent to background into
    boundary (interpolation can open a gap in a thin boundary); without it the three rules alone are applied.

    Args:
        ternary: interpolated ternary map (any real dtype); may also be stored with other class values, e.g.
            ``values=(0, 128, 255)``.
        thresholds: decision thresholds on the rescaled 0..2 scale (defaults: nearest class).
        values: the stored values of background, boundary and inside, in that order.

    Returns:
        uint8 map with classes 0 (background), 1 (boundary), 2 (inside).
    """
    t = np.asarray(ternary, dtype=np.float32)
    bg, bd, ins = (float(v) for v in values)
    if not (bg < bd < ins or bg > bd > ins):
        raise ValueError(f"values must be monotonic (background, boundary, inside), got {values}")
    lo, hi = thresholds
    if not 0 <= lo < hi <= 2:
        raise ValueError(f"thresholds must satisfy 0 <= low < high <= 2, got {thresholds}")
    # Piecewise-linear rescale so that bg -> 0, bd -> 1, ins -> 2 (values need not be equally spaced).
    if bg < ins:
        scaled = np.interp(t, [bg, bd, ins], [0.0, 1.0, 2.0])
    else:
        scaled = np.interp(t, [ins, bd, bg], [2.0, 1.0, 0.0])
    out = np.full(t.shape, BOUNDARY, dtype=np.uint8)  # rule 3
    out[scaled < lo] = BACKGROUND  # rule 1
    out[scaled >= hi] = INSIDE  # rule 2
    if enforce_enclosure and out.ndim == 2:
        bgmask = out == BACKGROUND
        near_bg = ndimage.binary_dilation(bgmask, structure=ndimage.generate_binary_structure(2, 1))
        out[(out == INSIDE) & near_bg] = BOUNDARY
    return out


def touching_pixels(label: np.ndarray, connectivity: int = 2) -> np.ndarray:
    """Nucleus pixels that have a neighbour belonging to a *different* nucleus (bool).

    Args:
        connectivity: 1 = 4-neighbourhood, 2 = 8-neighbourhood (3x3).
    """
    label = _as_label(label)
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 (4-neighbours) or 2 (8-neighbours), got {connectivity}")
    if label.size == 0:
        return np.zeros(label.shape, dtype=bool)
    lab = label if int(label.max()) < (1 << 24) - 1 else relabel_sequential(label)
    if int(lab.max()) >= (1 << 24) - 1:
        raise ValueError(f"more than 2^24 nuclei in one label map ({int(lab.max())})")
    kernel = ndimage.generate_binary_structure(2, connectivity).astype(np.uint8)
    f = lab.astype(np.float32)  # exact below 2^24
    hi = cv2.dilate(f, kernel, borderType=cv2.BORDER_REPLICATE)
    # Background must not count as "another nucleus": lift it above every label for the minimum filter.
    lo = cv2.erode(np.where(lab > 0, f, np.float32(1 << 24)), kernel, borderType=cv2.BORDER_REPLICATE)
    # A pixel is touching if a neighbour holds a nucleus other than its own: a larger one shows in the maximum, a
    # smaller one in the minimum (background is lifted above every label there and is thus ignored); background
    # pixels in the maximum are ignored because they are smaller than the pixel's own label.
    return (lab > 0) & ((hi != f) | (lo != f))


def eroded_foreground(label: np.ndarray, erode_radius: int = 1, remove_touching: bool = True,
                      connectivity: int = 2) -> np.ndarray:
    """Stage-1 target of the two-stage U-Net: binarise, cut where nuclei touch, erode (uint8 0/1).

    Mahbod et al. 2019 (Sec. 2.2) train their first U-Net on a *modified* ground truth in which the pixels where two
    nuclei touch are removed and the nuclei are eroded, so that the binary prediction splits touching nuclei into
    separate connected components.

    Args:
        erode_radius: radius in pixels of the disk (OpenCV elliptic kernel of side ``2r+1``; ``r=1`` is the
            4-neighbour cross) by which the foreground is eroded after the touching pixels are removed; 0 = no
            erosion. The image border does not erode (pixels beyond it count as foreground).
        remove_touching: remove pixels that have a neighbour of another nucleus (:func:`touching_pixels`).
        connectivity: neighbourhood used to find touching pixels (1 = 4, 2 = 8).
    """
    label = _as_label(label)
    if erode_radius < 0:
        raise ValueError(f"erode_radius must be >= 0, got {erode_radius}")
    fg = label > 0
    if remove_touching:
        fg &= ~touching_pixels(label, connectivity=connectivity)
    fg = fg.astype(np.uint8)
    if erode_radius > 0 and fg.any():
        r = int(erode_radius)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        fg = cv2.erode(fg, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=1)
    return fg


def hv_map(label: np.ndarray) -> np.ndarray:
    """Horizontal and vertical offsets of every nucleus pixel from its nucleus' centre of mass (``2 x H x W``).

    The targets of HoVer-Net (Graham et al., "HoVer-Net: Simultaneous segmentation and classification of nuclei in
    multi-tissue histology images", Medical Image Analysis 58, 2019): channel 0 is ``x - x_c`` (positive right of the
    centre), channel 1 is ``y - y_c`` (positive below it). Each sign is scaled on its own per nucleus (negative values
    by the largest negative offset, positive ones by the largest positive offset), so every nucleus spans [-1, 1] on
    both axes whatever its size, and the maps jump from about +1 to -1 where two nuclei touch: the gradient that
    :func:`nuclei_d2.postprocess.hv_watershed` cuts them along. Background is 0.

    The centre is the exact (not rounded) mean of the pixel coordinates, so a flip negates one channel and a quarter
    turn swaps them (one negated) exactly: what test-time augmentation inverts (:meth:`TTATransform.invert_map`).
    A nucleus cut by the image border is centred on its visible part (the mapper computes targets on the final crop).
    """
    label = _as_label(label)
    out = np.zeros((2, *label.shape), dtype=np.float32)
    if label.size == 0 or not label.any():
        return out
    seq = relabel_sequential(label)
    for idx, sl in enumerate(ndimage.find_objects(seq)):
        if sl is None:
            continue
        mask = seq[sl] == idx + 1
        ys, xs = np.nonzero(mask)
        for c, coord in enumerate((xs, ys)):
            off = coord - coord.mean()
            lo, hi = off.min(), off.max()
            if lo < 0:
                off[off < 0] /= -lo
            if hi > 0:
                off[off > 0] /= hi
            out[c][sl][mask] = off
    return out


# ---- dispatcher ---------------------------------------------------------------------------------------------------

_TARGETS: dict[str, Callable[..., np.ndarray]] = {
    "foreground": foreground_map,
    "ternary": ternary_map,
    "boundary": boundary_map,
    "distance": functools.partial(distance_map, normalize=True),
    "distance_raw": functools.partial(distance_map, normalize=False),
    "eroded": eroded_foreground,
    "edge_weight": lambda label: np.array(edge_weight_map(label.shape)),  # a writable copy of the cached map
    "hv": hv_map,
}
TARGET_NAMES: tuple[str, ...] = tuple(_TARGETS)
_PARAMS = {"boundary_width", "border_is_contour", "erode_radius", "remove_touching", "connectivity"}


def _accepted(fn: Callable[..., Any]) -> set[str]:
    return set(inspect.signature(fn).parameters) & _PARAMS


def build_targets(label_map: np.ndarray, names: Iterable[str] | Sequence[str], **params: Any
                  ) -> dict[str, np.ndarray]:
    """Compute the dense targets ``names`` (see :data:`TARGET_NAMES`) of one label map.

    Keyword parameters are passed to the target functions that accept them: ``boundary_width``,
    ``border_is_contour``, ``erode_radius``, ``remove_touching``, ``connectivity``. The per-nucleus distance
    transform is computed once and shared by ``ternary``, ``boundary``, ``distance`` and ``distance_raw``.

    Raises:
        ValueError: an unknown target name or parameter.
    """
    names = list(names)
    unknown = [n for n in names if n not in _TARGETS]
    if unknown:
        raise ValueError(f"unknown dense target(s) {unknown}; valid names: {list(TARGET_NAMES)}")
    bad = set(params) - _PARAMS
    if bad:
        raise ValueError(f"unknown target parameter(s) {sorted(bad)}; valid: {sorted(_PARAMS)}")
    label = _as_label(label_map)
    border = bool(params.get("border_is_contour", False))
    want_raw, want_norm = "distance_raw" in names, "distance" in names
    raw, norm = _distances(label, border, want_raw, want_norm) if (want_raw or want_norm) else (None, None)
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name in out:
            continue
        if name == "distance":
            out[name] = norm  # type: ignore[assignment]
        elif name == "distance_raw":
            out[name] = raw  # type: ignore[assignment]
        else:
            fn = _TARGETS[name]
            out[name] = fn(label, **{k: v for k, v in params.items() if k in _accepted(fn)})
    return out
