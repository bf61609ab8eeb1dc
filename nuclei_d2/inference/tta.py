"""Test-time augmentation: transformed copies of an input and the inverse mapping of their predicted nuclei.

Mask R-CNN+ (Bancher et al., MICCAI COMPAY 2021) predicts each image four times -- as is, flipped horizontally,
flipped vertically and with a shifted hue -- maps every prediction back to the original frame and merges the nuclei
(:mod:`nuclei_d2.inference.merge`). H&E sections have no preferred orientation, so the rotations of the dihedral group
are offered too. Everything here is method-agnostic: the input is a mapped dataset dict (``image`` ``C x H x W``,
0-255, RGB + extra channels) and the predictions are :class:`~nuclei_d2.structures.CropMasks`, whatever model
made them.

Transform names (``TEST.AUG.TRANSFORMS``): ``identity``, ``hflip``, ``vflip``, ``rot90``, ``rot180``, ``rot270``
(counter-clockwise, ``np.rot90``), ``hue`` (hue rotation by ``TEST.AUG.HUE_DELTA`` of the colour circle) or
``hue:<delta>``, ``scale:<factor>``; compose with ``+``, applied left to right (``hflip+rot90`` = flip, then rotate).

``scale:<factor>`` is multi-scale testing: the copy is predicted at ``factor`` times the size the model's own mapper
gives the image (``scale:1.333`` on a 1.5x model predicts at 2x the tile's pixels). Every model returns its nuclei
and maps at the input's ``height x width``, so the scale needs no inverse; it is applied by the test-time wrapper
together with a member's own resolution (:func:`scaled_size`), in one resize, after the other operations (it commutes
with flips and quarter turns).

Geometric transforms move every channel (a flipped hematoxylin channel is the hematoxylin channel of the flipped
image). A colour transform changes the RGB channels only, so a ``hematoxylin`` extra channel is recomputed from the
shifted RGB, as the mapper would have computed it for that image. The image operations reuse
:class:`nuclei_d2.data.augment.Rot90Transform` and :class:`~nuclei_d2.data.augment.HueTransform` and fvcore's flips;
the inverse of the geometric part is applied to boxes (``Transform.inverse().apply_box``) and to each mask crop, or,
for dense models whose copies are averaged before post-processing, to the probability maps (``invert_map``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fvcore.transforms.transform import HFlipTransform, Transform, VFlipTransform

from ..data.augment import HueTransform, Rot90Transform
from ..structures import CropMasks

__all__ = ["GT_KEYS", "TTATransform", "parse_tta_transforms", "rescale_input", "scaled_size", "tta_input"]

#: Input keys that hold ground truth in the original frame; a transformed copy drops them.
GT_KEYS = ("instances", "label_map", "targets", "sem_seg", "annotations")

_GEOMETRIC = {"identity": (), "none": (), "hflip": (("hflip", 0.0),), "vflip": (("vflip", 0.0),),
              "rot90": (("rot90", 1.0),), "rot180": (("rot90", 2.0),), "rot270": (("rot90", 3.0),)}


@dataclass(frozen=True)
class TTATransform:
    """One test-time copy: a sequence of elementary operations, applied in order.

    ``ops`` holds ``("hflip", 0)``, ``("vflip", 0)``, ``("rot90", k)`` (``k`` quarter turns counter-clockwise) and
    ``("hue", delta)`` (fraction of the colour circle).
    """

    name: str
    ops: tuple[tuple[str, float], ...] = ()

    @property
    def is_geometric(self) -> bool:
        """Flips or quarter turns: predictions need mapping back (a scale does not, see the module docstring)."""
        return any(op not in ("hue", "scale") for op, _ in self.ops)

    @property
    def scale(self) -> float:
        """The product of the copy's ``scale:<factor>`` operations (1.0 without)."""
        return float(math.prod(v for op, v in self.ops if op == "scale"))

    @property
    def is_photometric(self) -> bool:
        return any(op == "hue" for op, _ in self.ops)

    def geometric_transforms(self, height: int, width: int) -> list[Transform]:
        """The fvcore transforms of the geometric operations for an image of ``height x width``, in order."""
        out: list[Transform] = []
        h, w = int(height), int(width)
        for op, v in self.ops:
            if op == "hflip":
                out.append(HFlipTransform(w))
            elif op == "vflip":
                out.append(VFlipTransform(h))
            elif op == "rot90":
                t = Rot90Transform(h, w, int(v))
                out.append(t)
                h, w = t.output_size
        return out

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` of the transformed copy."""
        h, w = int(height), int(width)
        for op, v in self.ops:
            if op == "rot90" and int(v) % 2:
                h, w = w, h
        return h, w

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """Transform an ``H x W x C`` image (uint8 or float 0-255; colour operations touch channels 0-2 only)."""
        h, w = image.shape[:2]
        for op, v in self.ops:
            if op == "hflip":
                image = HFlipTransform(w).apply_image(image)
            elif op == "vflip":
                image = VFlipTransform(h).apply_image(image)
            elif op == "rot90":
                t = Rot90Transform(h, w, int(v))
                image = t.apply_image(np.ascontiguousarray(image))
                h, w = t.output_size
            elif op == "hue":
                image = HueTransform(float(v)).apply_image(np.ascontiguousarray(image))
        return np.ascontiguousarray(image)

    def invert(self, pred: CropMasks, height: int, width: int) -> CropMasks:
        """Map predictions made on the transformed copy back to the original ``height x width`` frame."""
        th, tw = self.output_size(height, width)
        if pred.image_size != (th, tw):
            raise ValueError(f"TTA {self.name!r}: predictions are {pred.image_size[0]}x{pred.image_size[1]} but the "
                             f"transformed copy of a {height}x{width} image is {th}x{tw}")
        boxes = pred.boxes.astype(np.float64)
        crops = list(pred.masks)
        for t in reversed(self.geometric_transforms(height, width)):
            if len(boxes):
                boxes = t.inverse().apply_box(boxes)
            crops = [_invert_crop(t, c) for c in crops]
        return CropMasks((int(height), int(width)), np.rint(boxes).astype(np.int64).reshape(-1, 4), crops,
                         pred.scores.copy(), pred.classes.copy())


    def invert_map(self, maps: torch.Tensor, height: int, width: int,
                   vectors: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
        """Map ``K x h x w`` dense maps (probabilities) predicted on the transformed copy back to the original
        ``height x width`` frame: what dense models' copies are averaged in (photometric operations need nothing).

        ``vectors`` lists channel pairs ``(x, y)`` that are the two components of a vector field (e.g. the NB U-Net's
        horizontal/vertical offsets from the nucleus centre, :attr:`DenseSegmentor.vector_channels`): besides moving
        the pixels, a flip negates the component along its axis and a quarter turn rotates the vector (swaps the
        components, negating one)."""
        th, tw = self.output_size(height, width)
        if tuple(maps.shape[-2:]) != (th, tw):
            raise ValueError(f"TTA {self.name!r}: maps are {maps.shape[-2]}x{maps.shape[-1]} but the transformed copy "
                             f"of a {height}x{width} image is {th}x{tw}")
        for cx, cy in vectors:
            if not (0 <= cx < maps.shape[0] and 0 <= cy < maps.shape[0]) or cx == cy:
                raise ValueError(f"TTA {self.name!r}: vector channels ({cx}, {cy}) do not fit {maps.shape[0]} maps")
        for t in reversed(self.geometric_transforms(height, width)):
            if isinstance(t, HFlipTransform):
                maps = maps.flip(-1)
                maps = _negate(maps, [cx for cx, _ in vectors])
            elif isinstance(t, VFlipTransform):
                maps = maps.flip(-2)
                maps = _negate(maps, [cy for _, cy in vectors])
            elif isinstance(t, Rot90Transform):  # np.rot90 turns counter-clockwise from rows to columns
                maps = torch.rot90(maps, -t.k, dims=(-2, -1))
                for _ in range(int(t.k) % 4 if vectors else 0):
                    # the copy was turned a quarter counter-clockwise, which took an offset (x, y) (y down) to
                    # (y, -x); turning back takes (x', y') to (-y', x')
                    maps = maps.clone()
                    for cx, cy in vectors:
                        x, y = maps[cx].clone(), maps[cy].clone()
                        maps[cx], maps[cy] = -y, x
            else:
                raise TypeError(f"no map inverse for {type(t).__name__}")
        return maps


def _negate(maps: torch.Tensor, channels: Sequence[int]) -> torch.Tensor:
    if not channels:
        return maps
    maps = maps.clone()
    maps[list(channels)] *= -1
    return maps


def _invert_crop(t: Transform, crop: np.ndarray) -> np.ndarray:
    if isinstance(t, HFlipTransform):
        return np.ascontiguousarray(crop[:, ::-1])
    if isinstance(t, VFlipTransform):
        return np.ascontiguousarray(crop[::-1])
    if isinstance(t, Rot90Transform):
        return np.ascontiguousarray(np.rot90(crop, -t.k))
    raise TypeError(f"no crop inverse for {type(t).__name__}")


def parse_tta_transforms(names: Sequence[str], hue_delta: float = 0.05) -> list[TTATransform]:
    """:class:`TTATransform` objects from names (see the module docstring), e.g. ``["identity", "hflip", "hue"]``.

    Raises:
        ValueError: an unknown name, a bad hue value, or an empty list.
    """
    if isinstance(names, str):
        names = [names]
    out = []
    for name in names:
        ops: list[tuple[str, float]] = []
        for part in str(name).replace(" ", "").lower().split("+"):
            if part in _GEOMETRIC:
                ops.extend(_GEOMETRIC[part])
            elif part.startswith("scale:"):
                try:
                    factor = float(part.split(":", 1)[1])
                except ValueError:
                    factor = float("nan")
                if not (math.isfinite(factor) and 0.1 <= factor <= 10.0):
                    raise ValueError(f"TEST.AUG.TRANSFORMS: bad scale in {name!r}; write e.g. 'scale:1.333' (a factor "
                                     "between 0.1 and 10 of the model's own input size)")
                ops.append(("scale", factor))
            elif part == "hue" or part.startswith("hue:"):
                try:
                    delta = float(part.split(":", 1)[1]) if ":" in part else float(hue_delta)
                except ValueError:
                    raise ValueError(f"TEST.AUG.TRANSFORMS: bad hue shift in {name!r}; write e.g. 'hue:0.05' "
                                     "(a fraction of the colour circle)") from None
                ops.append(("hue", delta))
            else:
                raise ValueError(f"TEST.AUG.TRANSFORMS: unknown transform {part!r} in {name!r}; use identity, hflip, "
                                 "vflip, rot90, rot180, rot270, hue, hue:<delta> or scale:<factor>, composed with '+'")
        out.append(TTATransform(str(name), tuple(ops)))
    if not out:
        raise ValueError("TEST.AUG.TRANSFORMS is empty: list at least one transform (e.g. 'identity')")
    return out


def tta_input(inp: dict[str, Any], t: TTATransform, extra_channels: Sequence[str] = (),
              input_format: str = "RGB") -> dict[str, Any]:
    """A transformed copy of a mapped input dict for the model.

    ``image`` is transformed, ``height``/``width`` (the size the model returns its predictions at) become those of
    the transformed original, ground-truth keys (:data:`GT_KEYS`) are dropped. After a colour operation the
    ``hematoxylin`` channel (if ``extra_channels`` has one) is recomputed from the new RGB.
    """
    image = inp["image"]
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise ValueError(f"{inp.get('file_name', 'input')}: TTA needs a C x H x W image tensor, got "
                         f"{type(image).__name__} {tuple(getattr(image, 'shape', ()))}")
    c, h, w = image.shape
    height, width = int(inp.get("height", h)), int(inp.get("width", w))
    out = {k: v for k, v in inp.items() if k not in GT_KEYS and k != "image"}
    if not t.ops:
        out["image"] = image
        return out
    arr = image.detach().cpu().numpy().transpose(1, 2, 0).astype(np.float32)
    bgr = input_format == "BGR"
    if bgr and t.is_photometric:
        arr[:, :, :3] = arr[:, :, 2::-1].copy()
    arr = t.apply_image(arr)
    if t.is_photometric and "hematoxylin" in extra_channels:
        from ..stain import hematoxylin_channel

        k = 3 + list(extra_channels).index("hematoxylin")
        if k < c:
            u8 = np.clip(np.rint(arr[:, :, :3]), 0, 255).astype(np.uint8)
            arr[:, :, k] = hematoxylin_channel(np.ascontiguousarray(u8)) * 255.0
    if bgr and t.is_photometric:
        arr[:, :, :3] = arr[:, :, 2::-1].copy()
    out["image"] = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(image.dtype)
    out["height"], out["width"] = t.output_size(height, width)
    return out


def scaled_size(size: tuple[int, int], t: TTATransform) -> tuple[int, int]:
    """``size`` (``height, width``) times the copy's :attr:`TTATransform.scale`, rounded, at least 1 pixel."""
    s = t.scale
    if s == 1.0:
        return int(size[0]), int(size[1])
    return max(1, int(round(size[0] * s))), max(1, int(round(size[1] * s)))


def rescale_input(inp: dict[str, Any], size: tuple[int, int], extra_channels: Sequence[str] = (),
                  input_format: str = "RGB") -> dict[str, Any]:
    """A copy of a mapped input dict whose ``image`` is resized to ``size`` (``height``/``width`` kept: predictions
    still come back at the original size); ``inp`` itself when its image already has that size.

    An ensemble member trained at another magnification than the evaluated inputs' (its own ``INPUT.MIN_SIZE_TEST``)
    sees the image as its own mapper would have made it: RGB resized with the mapper's transform
    (:class:`~nuclei_d2.data.augment.RescaleTransform`, bilinear, on the 0-255 values), a ``hematoxylin`` channel
    recomputed from the resized RGB, any other channel resized like RGB.
    """
    from ..data.augment import RescaleTransform

    image = inp["image"]
    c, h, w = image.shape
    new_h, new_w = int(size[0]), int(size[1])
    if (new_h, new_w) == (h, w):
        return inp
    t = RescaleTransform(h, w, new_h, new_w, "linear")
    arr = image.detach().cpu().numpy().transpose(1, 2, 0)
    rgb = arr[:, :, :3]
    if np.array_equal(rgb, np.rint(rgb)) and rgb.min() >= 0 and rgb.max() <= 255:
        rgb = rgb.astype(np.uint8)  # the mapper resizes the uint8 image: the same rounding
    out_rgb = t.apply_image(np.ascontiguousarray(rgb)).astype(np.float32)
    rest = t.apply_image(np.ascontiguousarray(arr[:, :, 3:].astype(np.float32))) if c > 3 else None
    channels = [out_rgb] + ([rest.reshape(new_h, new_w, -1)] if rest is not None else [])
    resized = np.concatenate(channels, axis=2)
    if "hematoxylin" in extra_channels:
        from ..stain import hematoxylin_channel

        k = 3 + list(extra_channels).index("hematoxylin")
        if k < c:
            u8 = np.clip(np.rint(out_rgb), 0, 255).astype(np.uint8)
            if input_format == "BGR":
                u8 = np.ascontiguousarray(u8[:, :, ::-1])
            resized[:, :, k] = hematoxylin_channel(np.ascontiguousarray(u8)) * 255.0
    out = dict(inp)
    out["image"] = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))).to(image.dtype)
    return out
