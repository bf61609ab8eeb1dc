"""The classical floor: colour deconvolution, Otsu threshold, distance-transform watershed. No learning.

Every comparison table should show what a method gains over a pipeline that needs no training at all (issue 10).
The pipeline, :func:`classical_watershed`, is a plain function on an RGB array:

1. haematoxylin intensity by Ruifrok & Johnston colour deconvolution
   (:func:`nuclei_d2.stain.hematoxylin_channel`), smoothed by a Gaussian of ``smoothing`` px;
2. foreground = haematoxylin above ``threshold_scale`` x its Otsu threshold (per image), holes filled, objects under
   ``min_size`` px removed;
3. the Euclidean distance transform of the foreground, Gaussian-smoothed by ``sigma_factor`` x the mean nucleus
   radius, seeds a marker-controlled watershed inside the foreground
   (:func:`nuclei_d2.postprocess.distance_watershed`, shared with the two-stage U-Net).

Three parameters are tuned on a training split (``threshold_scale``, ``sigma_factor``, ``min_size``) by
:mod:`nuclei_d2.engine.tune_inference` (``tools/tune_classical.py`` is its preset with the default grid); everything
else is fixed. The model computes the haematoxylin maps (:meth:`ClassicalWatershed.output_probs`) apart from the steps
that read the tuned keys (:meth:`ClassicalWatershed.output_from_probs`), so a grid reuses the maps of each image.

:class:`ClassicalWatershed` wraps it as a Detectron2 meta-architecture (``MODEL.META_ARCHITECTURE:
ClassicalWatershed``, ``configs/classical_watershed.yaml``) that returns the project's model contract
(``{"instances", "label_map"}``), so the evaluators, TTA, tiling and ``tools/predict.py`` apply unchanged. It has no
parameters: evaluate it with ``tools/train_net.py --eval-only``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from scipy import ndimage
from torch import nn

from ..postprocess import distance_watershed
from ..stain.deconvolution import hematoxylin_channel
from ..structures import label_map_to_instances, label_values, relabel_sequential

__all__ = ["ClassicalParams", "ClassicalWatershed", "classical_watershed", "foreground_watershed",
           "hematoxylin_foreground", "otsu_threshold", "smoothed_hematoxylin"]


@dataclass(frozen=True)
class ClassicalParams:
    """The parameters of :func:`classical_watershed` (``MODEL.CLASSICAL.*``)."""

    threshold_scale: float = 1.0
    sigma_factor: float = 0.5
    min_size: int = 30
    smoothing: float = 1.0
    min_distance: int = 0
    connectivity: int = 1

    def __post_init__(self) -> None:
        if self.threshold_scale <= 0:
            raise ValueError(f"threshold_scale must be > 0, got {self.threshold_scale}")
        if self.sigma_factor < 0 or self.smoothing < 0:
            raise ValueError(f"sigma_factor and smoothing must be >= 0, got {self.sigma_factor}, {self.smoothing}")
        if self.min_size < 0 or self.min_distance < 0:
            raise ValueError(f"min_size and min_distance must be >= 0, got {self.min_size}, {self.min_distance}")
        if self.connectivity not in (1, 2):
            raise ValueError(f"connectivity must be 1 (4-neighbours) or 2 (8-neighbours), got {self.connectivity}")

    @classmethod
    def from_config(cls, cfg: Any) -> ClassicalParams:
        c = cfg.MODEL.CLASSICAL
        return cls(threshold_scale=float(c.THRESHOLD_SCALE), sigma_factor=float(c.SIGMA_FACTOR),
                   min_size=int(c.MIN_SIZE), smoothing=float(c.SMOOTHING), min_distance=int(c.MIN_DISTANCE),
                   connectivity=int(c.CONNECTIVITY))

    def to_config_opts(self) -> list[str]:
        """``KEY VALUE`` overrides that set these parameters (for ``tools/train_net.py`` and config files)."""
        return [item for k, v in asdict(self).items() for item in (f"MODEL.CLASSICAL.{k.upper()}", str(v))]


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (any shape, float): the cut maximising the between-class variance.

    Returns ``inf`` for an empty or constant input (nothing is above it: an image without contrast has no nuclei).
    """
    from skimage.filters import threshold_otsu

    v = np.asarray(values, dtype=np.float32).ravel()
    if v.size == 0 or float(v.max()) - float(v.min()) < 1e-12:
        return float("inf")
    return float(threshold_otsu(v, nbins=bins))


def smoothed_hematoxylin(image: np.ndarray, smoothing: float = 1.0, stains: np.ndarray | None = None) -> np.ndarray:
    """The haematoxylin intensity the threshold applies to: Gaussian-smoothed by ``smoothing`` px (0 = raw)."""
    h = hematoxylin_channel(image, stains)
    return ndimage.gaussian_filter(h, float(smoothing)) if smoothing > 0 else h


def hematoxylin_foreground(image: np.ndarray, threshold_scale: float = 1.0, smoothing: float = 1.0,
                           stains: np.ndarray | None = None) -> np.ndarray:
    """Boolean nucleus foreground: smoothed haematoxylin above ``threshold_scale`` x its Otsu threshold."""
    h = smoothed_hematoxylin(image, smoothing, stains)
    return h > threshold_scale * otsu_threshold(h)


def classical_watershed(image: np.ndarray, params: ClassicalParams | None = None) -> np.ndarray:
    """Int32 label map (1..N) of the nuclei of an ``H x W x 3`` uint8 H&E image; see the module docstring.

    Args:
        image: RGB, uint8.
        params: the pipeline's parameters (defaults: :class:`ClassicalParams`).
    """
    p = params or ClassicalParams()
    return foreground_watershed(hematoxylin_foreground(image, p.threshold_scale, p.smoothing), p)


def foreground_watershed(foreground: np.ndarray, params: ClassicalParams | None = None) -> np.ndarray:
    """Steps 2-3 after the threshold: holes filled, distance-transform watershed, small objects dropped (int32 label
    map 1..N of a boolean foreground; ``params``' threshold and smoothing are not read here)."""
    p = params or ClassicalParams()
    fg = ndimage.binary_fill_holes(foreground)  # filled once here, so the watershed's regions need no filling
    if not fg.any():
        return np.zeros(fg.shape, dtype=np.int32)
    dist = ndimage.distance_transform_edt(fg).astype(np.float32)
    return distance_watershed(fg.astype(np.float32), dist, threshold=0.5, sigma_factor=p.sigma_factor,
                              min_distance=p.min_distance, peak_threshold=0.5, min_size=p.min_size, fill=False,
                              connectivity=p.connectivity)


@META_ARCH_REGISTRY.register()
class ClassicalWatershed(nn.Module):
    """``MODEL.META_ARCHITECTURE: ClassicalWatershed``: the no-training baseline as a model (module docstring)."""

    #: (nuclei_d2/modeling/networks.py) nothing to export: the exporter's error says so.
    export_unsupported = ("it has no network to export: its whole pipeline is colour deconvolution, thresholds and a "
                          "watershed (classical image processing, no learned weights); run it as it is")

    #: Config keys read only after :meth:`output_probs` (by :meth:`output_from_probs`): a grid over them reuses each
    #: image's haematoxylin maps (``tools/tune_inference.py``). ``SMOOTHING`` changes the maps, so it is not here.
    postprocess_keys: tuple[str, ...] = tuple(f"MODEL.CLASSICAL.{k}" for k in (
        "THRESHOLD_SCALE", "SIGMA_FACTOR", "MIN_SIZE", "MIN_DISTANCE", "CONNECTIVITY"))

    @configurable
    def __init__(self, *, params: ClassicalParams):
        super().__init__()
        self.params = params
        # No parameters; a buffer so that ``.to(device)`` and ``model.device`` work like for the other models.
        self.register_buffer("_device_tracker", torch.zeros(0), False)

    @classmethod
    def from_config(cls, cfg: Any) -> dict[str, Any]:
        if len(cfg.INPUT.EXTRA_CHANNELS):
            raise ValueError("ClassicalWatershed works on RGB only; set INPUT.EXTRA_CHANNELS [] (now "
                             f"{list(cfg.INPUT.EXTRA_CHANNELS)})")
        return {"params": ClassicalParams.from_config(cfg)}

    @property
    def device(self) -> torch.device:
        return self._device_tracker.device

    def forward(self, batched_inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.training:
            raise RuntimeError("ClassicalWatershed has nothing to train: evaluate it with tools/train_net.py "
                               "--eval-only, and tune its parameters with tools/tune_classical.py")
        return self.inference(batched_inputs)

    def hematoxylin_maps(self, image: np.ndarray) -> np.ndarray:
        """``2 x H x W`` float32 of an ``H x W x 3`` uint8 RGB image: the haematoxylin smoothed by ``smoothing`` (what
        the threshold applies to) and raw (the scores' source). Nothing in :attr:`postprocess_keys` changes them."""
        h = hematoxylin_channel(image)
        s = self.params.smoothing  # as smoothed_hematoxylin, without deconvolving twice
        return np.stack([ndimage.gaussian_filter(h, float(s)) if s > 0 else h, h])

    def label_from_maps(self, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(label map, scores)`` from :meth:`hematoxylin_maps`; scores = mean foreground confidence proxy (the
        nucleus's mean haematoxylin intensity, in [0, 1]), so COCO-style ranking has something to sort by."""
        smoothed, h = maps
        label = foreground_watershed(smoothed > self.params.threshold_scale * otsu_threshold(smoothed), self.params)
        n = int(label.max())
        if n == 0:
            return label, np.zeros(0, dtype=np.float32)
        scores = ndimage.mean(h, label, np.arange(1, n + 1))
        return label, np.clip(np.asarray(scores, dtype=np.float32), 0.0, 1.0)

    def predict_label_map(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(label map, scores)`` of an ``H x W x 3`` uint8 RGB image (:meth:`label_from_maps`)."""
        return self.label_from_maps(self.hematoxylin_maps(image))

    @torch.no_grad()
    def output_probs(self, inp: dict[str, Any]) -> torch.Tensor:
        """The :meth:`hematoxylin_maps` of one batched input's image (at the mapped size): what a grid over
        :attr:`postprocess_keys` computes once per image (``tools/tune_inference.py``; the dense models' interface)."""
        image = inp["image"]
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"ClassicalWatershed: expected a 3 x H x W RGB image for "
                             f"{inp.get('file_name', 'input')}, got shape {tuple(image.shape)}")
        rgb = image.detach().to("cpu").permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).numpy()
        return torch.from_numpy(self.hematoxylin_maps(np.ascontiguousarray(rgb)))

    def output_from_probs(self, maps: torch.Tensor, inp: dict[str, Any]) -> dict[str, Any]:
        """One input's output in the project's contract from its :meth:`output_probs` (threshold, watershed, scores;
        back to the input's ``height`` x ``width`` where the mapper resized the image)."""
        label, scores = self.label_from_maps(maps.numpy())
        height, width = int(inp.get("height", label.shape[0])), int(inp.get("width", label.shape[1]))
        if (height, width) != label.shape:  # the mapper resized the image: back to the original, nearest
            zoom = (height / label.shape[0], width / label.shape[1])
            label = ndimage.zoom(label, zoom, order=0)[:height, :width].astype(np.int32)
            present = label_values(label)
            scores = scores[present - 1]
            label = relabel_sequential(label)
        return {"instances": label_map_to_instances(label, scores), "label_map": torch.from_numpy(label)}

    @torch.no_grad()
    def inference(self, batched_inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self.output_from_probs(self.output_probs(inp), inp) for inp in batched_inputs]
