"""Dense (per-pixel) meta-architectures: the part every U-Net-like method shares.

:class:`DenseSegmentor` turns Detectron2's batched inputs into normalised tensors, pads training crops to a common
size (padding is masked out of the losses), runs inference on images of any size (whole, or through the overlapped
tiles of :func:`nuclei_d2.layers.tiling.tile_predict` when the image is larger than ``MODEL.TILING.PATCH_SIZE``),
resizes the probability maps back to the input's ``height`` x ``width``, post-processes them with a plain function of
:mod:`nuclei_d2.postprocess`, and returns the project's model contract::

    [{"instances": NucleiInstances(pred_nuclei, pred_boxes, scores, pred_classes),
      "label_map": H x W int32 tensor (the same nuclei, 1..N in instance order), "probs": K x H x W tensor}, ...]

``pred_nuclei`` (:class:`nuclei_d2.structures.CropMasks`) are the nuclei as crops; full-size ``pred_masks`` are built
only if Detectron2 code reads them (COCOEvaluator), so any number of nuclei fits.

A method subclasses it and provides four things: the networks (and :meth:`DenseSegmentor.network_modules`, their
tensor-in / tensor-out wrappers for export: :mod:`nuclei_d2.modeling.networks`), :meth:`DenseSegmentor.dense_probs`
(normalised ``B x C x h x w`` input -> ``B x K x h x w`` probabilities, through ``run_network``),
:meth:`DenseSegmentor.dense_losses` and :meth:`DenseSegmentor.postprocess` (``K x H x W`` numpy probabilities ->
label map and scores), and lists in ``postprocess_keys`` the config keys only its post-processing reads. The methods:
:class:`nuclei_d2.modeling.nb_unet.NucleusBoundaryUNet`, :class:`nuclei_d2.modeling.two_stage_unet.TwoStageUNet`,
:class:`nuclei_d2.modeling.brpnet.BRPNet` (whose :meth:`DenseSegmentor.segment_probs` also refines with the image).

Inference is :meth:`DenseSegmentor.output_probs` (maps at the output size) then :meth:`DenseSegmentor.dense_output`
(post-processing, the contract); test-time wrappers and ``tools/tune_inference.py`` call the two halves apart.

Inputs follow :class:`nuclei_d2.data.mapper.NucleiDatasetMapper`: ``image`` is ``C x H x W`` float 0-255 (RGB +
extra channels), dense training targets come under ``targets`` (``INPUT.TARGETS``), never computed here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..layers.tiling import TilingParams, tile_predict
from ..structures import label_map_to_instances
from .networks import ExportableNetworks

__all__ = ["DenseSegmentor", "dense_base_kwargs"]

logger = logging.getLogger(__name__)


def dense_base_kwargs(cfg: Any) -> dict[str, Any]:
    """The :class:`DenseSegmentor` keyword arguments every dense method reads from the config."""
    mean, std = list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD)
    expected = 3 + len(cfg.INPUT.EXTRA_CHANNELS)
    if len(mean) != expected or len(std) != expected:
        raise ValueError(f"MODEL.PIXEL_MEAN / PIXEL_STD have {len(mean)} / {len(std)} entries but the input has "
                         f"{expected} channels (RGB + INPUT.EXTRA_CHANNELS {list(cfg.INPUT.EXTRA_CHANNELS)})")
    return {"pixel_mean": mean, "pixel_std": std, "tiling": TilingParams.from_config(cfg),
            "return_probs": bool(cfg.MODEL.DENSE.RETURN_PROBS)}


class DenseSegmentor(ExportableNetworks, nn.Module):
    """Base class of the dense meta-architectures (see the module docstring).

    :meth:`dense_probs` runs the learned part through :meth:`~.networks.ExportableNetworks.run_network` (names of
    :meth:`network_modules`), so an exported runtime (:mod:`nuclei_d2.export`) replaces the networks alone and the
    tiling, test-time augmentation and post-processing around them stay this code."""

    #: Names of the probability maps :meth:`dense_probs` returns, in channel order.
    prob_names: tuple[str, ...] = ()
    #: Config keys read only by :meth:`segment_probs` (never by :meth:`output_probs`): a grid over them post-processes
    #: the same maps, which ``tools/tune_inference.py`` then computes once per image. Leave out any key in doubt.
    postprocess_keys: tuple[str, ...] = ()
    #: What a map estimates, for ensembles that average maps across methods (``TEST.MERGE.MODE`` "shared"): maps of
    #: different models with one meaning are averaged. A map not listed means its own name. "interior": the nucleus
    #: body shrunk so that touching nuclei come apart (thresholded at 0.5 into one component per nucleus, then grown
    #: back); "boundary": the ``INPUT.BOUNDARY_WIDTH`` band inside each contour.
    map_meanings: Mapping[str, str] = MappingProxyType({})
    #: Pairs of maps ``(x, y)`` that are the two components of a vector field (not probabilities): test-time
    #: augmentation negates or swaps them when it maps a copy back (``TTATransform.invert_map``).
    vector_maps: tuple[tuple[str, str], ...] = ()

    @property
    def vector_channels(self) -> tuple[tuple[int, int], ...]:
        """Channel indices of the :attr:`vector_maps` this model predicts."""
        names = list(self.prob_names)
        return tuple((names.index(x), names.index(y)) for x, y in self.vector_maps if x in names and y in names)

    @property
    def map_meaning_names(self) -> tuple[str, ...]:
        """The meaning of each map of :attr:`prob_names`, in channel order."""
        return tuple(self.map_meanings.get(n, n) for n in self.prob_names)

    def __init__(self, *, pixel_mean: list[float], pixel_std: list[float], tiling: TilingParams | None = None,
                 return_probs: bool = True, size_divisibility: int = 1):
        """
        Args:
            pixel_mean, pixel_std: per-channel normalisation of the 0-255 input (``MODEL.PIXEL_MEAN/STD``).
            tiling: overlapped-tile inference settings (``MODEL.TILING``); None = always whole images.
            return_probs: also return the probability maps under ``"probs"``.
            size_divisibility: training batches are padded to a multiple of this (the U-Net's ``2 ** depth``).
        """
        super().__init__()
        if len(pixel_mean) != len(pixel_std):
            raise ValueError(f"PIXEL_MEAN has {len(pixel_mean)} entries but PIXEL_STD {len(pixel_std)}")
        if any(s <= 0 for s in pixel_std):
            raise ValueError(f"PIXEL_STD must be positive, got {list(pixel_std)}")
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.tiling = tiling if tiling is not None else TilingParams(enabled=False)
        self.return_probs = bool(return_probs)
        self.size_divisibility = int(size_divisibility)

    # ---- to implement by a method ----------------------------------------------------------------------------------
    @property
    def required_targets(self) -> tuple[str, ...]:
        """Dense targets (``INPUT.TARGETS`` names) the training losses need."""
        return ()

    def dense_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``B x C x h x w`` input -> ``B x K x h x w`` probabilities (K = ``len(prob_names)``)."""
        raise NotImplementedError

    def dense_losses(self, x: torch.Tensor, targets: dict[str, torch.Tensor], valid: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
        """Loss dict from a normalised batch, its targets (``B x H x W`` each; ``B x K x H x W`` for a K-channel
        target) and the valid-pixel mask."""
        raise NotImplementedError

    def postprocess(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``K x H x W`` probabilities -> (int32 label map 1..N, float scores of the N instances)."""
        raise NotImplementedError

    # ---- shared ----------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def in_channels(self) -> int:
        return int(self.pixel_mean.shape[0])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - PIXEL_MEAN) / PIXEL_STD`` for a ``C x H x W`` or ``B x C x H x W`` 0-255 tensor."""
        return (x.to(self.device, torch.float32) - self.pixel_mean) / self.pixel_std

    def _check_image(self, image: torch.Tensor, where: str) -> None:
        if image.dim() != 3 or image.shape[0] != self.in_channels:
            raise ValueError(f"{where}: expected a {self.in_channels} x H x W image (RGB + INPUT.EXTRA_CHANNELS, "
                             f"matching MODEL.PIXEL_MEAN), got shape {tuple(image.shape)}")

    def forward(self, batched_inputs: list[dict[str, Any]]) -> Any:
        if self.training:
            x, targets, valid = self.prepare_training_batch(batched_inputs)
            return self.dense_losses(x, targets, valid)
        return self.inference(batched_inputs)

    def prepare_training_batch(self, batched_inputs: list[dict[str, Any]]
                               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Normalised images padded to a common size (a multiple of :attr:`size_divisibility`), the required
        targets padded alike, and the mask of real (non-padding) pixels."""
        if not batched_inputs:
            raise ValueError("empty training batch")
        sizes = []
        for i, inp in enumerate(batched_inputs):
            self._check_image(inp["image"], f"training input {i} ({inp.get('file_name', '?')})")
            sizes.append(tuple(inp["image"].shape[-2:]))
            have = inp.get("targets", {})
            missing = [t for t in self.required_targets if t not in have and t != "edge_weight"]
            if missing:
                raise ValueError(f"{type(self).__name__} needs the dense target(s) {missing} in every training input "
                                 f"but {inp.get('file_name', 'input ' + str(i))} has {sorted(have)}: add them to "
                                 f"INPUT.TARGETS (now {sorted(have) or 'empty'})")
        d = max(1, self.size_divisibility)
        hp = -(-max(s[0] for s in sizes) // d) * d
        wp = -(-max(s[1] for s in sizes) // d) * d
        b = len(batched_inputs)
        x = torch.zeros((b, self.in_channels, hp, wp), dtype=torch.float32, device=self.device)
        valid = torch.zeros((b, hp, wp), dtype=torch.bool, device=self.device)
        targets: dict[str, torch.Tensor] = {}
        for i, (inp, (h, w)) in enumerate(zip(batched_inputs, sizes)):
            x[i, :, :h, :w] = self.normalize(inp["image"])
            valid[i, :h, :w] = True
            for name in self.required_targets:
                t = inp.get("targets", {}).get(name)
                if t is None:  # only edge_weight can be missing: it depends on the patch shape alone
                    from ..layers.tiling import edge_weight_map

                    t = torch.from_numpy(np.array(edge_weight_map((h, w))))
                if tuple(t.shape[-2:]) != (h, w):
                    raise ValueError(f"target {name!r} has shape {tuple(t.shape)} but the image is {h}x{w}")
                if name not in targets:  # B x H x W, or B x K x H x W for a K-channel target ("hv")
                    dtype = torch.float32 if t.is_floating_point() else torch.int64
                    targets[name] = torch.zeros((b, *t.shape[:-2], hp, wp), dtype=dtype, device=self.device)
                targets[name][i, ..., :h, :w] = t.to(self.device, targets[name].dtype)
        return x, targets, valid

    @torch.no_grad()
    def predict_probs(self, image: torch.Tensor) -> torch.Tensor:
        """``K x H x W`` CPU probabilities of one ``C x H x W`` 0-255 image, tiled when ``MODEL.TILING`` applies.

        The building block for wrappers (test-time augmentation, ensembles) that merge dense maps before
        post-processing.
        """
        self._check_image(image, "inference input")
        h, w = image.shape[-2:]

        def fn(batch: torch.Tensor) -> torch.Tensor:
            return self.dense_probs(self.normalize(batch))

        if self.tiling.applies_to(h, w):
            t = self.tiling
            return tile_predict(fn, image, t.patch, t.stride, t.weight, t.batch_size, progress=t.progress)
        return fn(image[None])[0].to("cpu", torch.float32)

    def segment_probs(self, probs: np.ndarray, image: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The method's whole post-processing: ``K x H x W`` probabilities -> (label map 1..N, scores).

        ``image`` (``C x H x W`` 0-255, at the maps' size) is for methods whose last step looks at the pixels again
        (BRP-Net's refinement networks); the others use :meth:`postprocess` alone. Wrappers that average dense maps
        (test-time augmentation, ensembles) end here.
        """
        return self.postprocess(probs)

    def postprocess_probs(self, probs: torch.Tensor | np.ndarray, image: torch.Tensor | None = None
                          ) -> tuple[Any, np.ndarray]:
        """``(Instances, label map)`` of a ``K x H x W`` probability map (at the output resolution), through
        :meth:`segment_probs` (``image``: see there). The instances hold the nuclei as crops
        (:class:`~nuclei_d2.structures.NucleiInstances`), so their memory follows the nuclei, not ``N x H x W``."""
        arr = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
        label, scores = self.segment_probs(arr, image)
        return label_map_to_instances(label, scores), label

    def dense_output(self, probs: torch.Tensor, image: torch.Tensor | None = None) -> dict[str, Any]:
        """One image's output in the project's contract, ``{"instances", "label_map"}`` plus ``"probs"`` when
        ``return_probs``, from its ``K x H x W`` probabilities at the output resolution (``image``: see
        :meth:`segment_probs`). The one place the dense output is assembled: this model's inference, BRP-Net's,
        and the test-time wrapper's averaged maps all end here."""
        instances, label = self.postprocess_probs(probs, image)
        out: dict[str, Any] = {"instances": instances, "label_map": torch.from_numpy(label)}
        if self.return_probs:
            out["probs"] = probs
        return out

    @torch.no_grad()
    def output_probs(self, inp: dict[str, Any]) -> torch.Tensor:
        """``K x H x W`` probabilities of one batched input at its output size (``height`` x ``width``, where the
        mapper may have resized the image: ``INPUT.MIN_SIZE_TEST``). Everything before post-processing, so a
        caller that post-processes the same maps several ways (``tools/tune_inference.py``) computes them once."""
        probs = self.predict_probs(inp["image"])
        h, w = probs.shape[-2:]
        height, width = int(inp.get("height", h)), int(inp.get("width", w))
        if (height, width) != (h, w):
            probs = F.interpolate(probs[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        return probs

    @staticmethod
    def output_image(inp: dict[str, Any], size: tuple[int, int]) -> torch.Tensor:
        """The input's ``C x H x W`` image at ``size`` (the output size of :meth:`output_probs`), for
        :meth:`segment_probs`."""
        image = inp["image"]
        if tuple(image.shape[-2:]) != tuple(size):
            image = F.interpolate(image[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]
        return image

    @torch.no_grad()
    def inference(self, batched_inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self.output_from_probs(self.output_probs(inp), inp) for inp in batched_inputs]

    def output_from_probs(self, probs: torch.Tensor, inp: dict[str, Any]) -> dict[str, Any]:
        """The second half of inference: ``inp``'s output from its :meth:`output_probs` (``tools/tune_inference.py``
        calls it once per grid point on maps it computed once)."""
        return self.dense_output(probs, self.output_image(inp, probs.shape[-2:]))
