"""``NucleiRCNN``: Detectron2's R-CNN handing over its nuclei as crops (:class:`~nuclei_d2.structures.CropMasks`).

Detectron2's ``GeneralizedRCNN`` ends in ``detector_postprocess``, which pastes every ``M x M`` mask into the whole
image (``paste_masks_in_image``): ``N x H x W`` bools, 1 GB for a 1000x1000 tile with 1,000 nuclei, that the evaluator
and TTA then crop again. :func:`crop_postprocess` is its twin: the same box scaling to the requested output size,
clipping and filtering, but each mask is pasted only into the region around its box, with Detectron2's own per-box
paste (``_do_paste_mask``, what ``paste_masks_in_image`` runs one box at a time on the CPU), so the pixels are the
same. The result is a :class:`~nuclei_d2.structures.NucleiInstances`: full-size ``pred_masks`` only when Detectron2
code (COCOEvaluator, Visualizer) reads them.

Every R-CNN meta-architecture of nuclei-d2 is a :class:`NucleiRCNN`: the baseline (``MODEL.META_ARCHITECTURE:
NucleiRCNN`` in ``configs/Base-Nuclei-RCNN-FPN.yaml``), Mask R-CNN+ and the panoptic-fusion R-CNN (subclasses).

Inference runs the learned part as one network, "rcnn" (:class:`~nuclei_d2.modeling.rcnn_network.RCNNNetwork`: one
``C x H x W`` 0-255 image in; boxes, scores, classes and mask probabilities out), through ``run_network``, so an
exported ONNX / TorchScript file (issue 27) replaces it while the raw ``Instances``, the post-processing, tiling and
test-time augmentation around it stay this code. Images of a batch run one by one (each padded on its own).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.structures import Boxes, Instances, ROIMasks
from torch import nn

from ..structures import CropMasks, NucleiInstances
from .networks import ExportableNetworks
from .rcnn_network import OUTPUT_NAMES, RCNNNetwork, unsupported_reason

__all__ = ["NucleiRCNN", "crop_postprocess"]


def crop_postprocess(results: Instances, output_height: int, output_width: int,
                     mask_threshold: float | None = 0.5, min_visible: float = 0.0) -> Instances:
    """``detector_postprocess`` without full-size masks: raw R-CNN outputs at ``output_height x output_width``.

    Boxes are scaled from the network input (``results.image_size``) to the output size, clipped, and instances with
    an empty box dropped, as Detectron2 does. Each mask is pasted into the region Detectron2's CPU paste samples (the
    box rounded out by one pixel, clipped). With ``mask_threshold`` the crops are binary (``>= mask_threshold``, as
    Detectron2 thresholds) and trimmed to their pixels; a mask left without pixels keeps its (all-zero) region, so
    the instances (and ``pred_boxes`` for box AP) stay those Detectron2 returns. ``None`` keeps the probabilities
    in the whole region (the soft masks test-time augmentation merges). ``min_visible`` > 0 (binary masks only)
    drops the instances whose mask keeps less than that fraction of its pixels where better-scored masks overlap it
    (:meth:`~nuclei_d2.structures.CropMasks.hidden`, ``TEST.MIN_VISIBLE_FRACTION``); instances without mask
    pixels stay, as above.

    Returns :class:`NucleiInstances` with ``pred_nuclei`` when the results have masks, else plain ``Instances``.
    """
    h, w = int(output_height), int(output_width)
    fields = dict(results.get_fields())
    masks = fields.pop("pred_masks", None)
    boxes = fields["pred_boxes"].clone()  # detector_postprocess scales in place: leave the raw results alone
    boxes.scale(w / results.image_size[1], h / results.image_size[0])
    boxes.clip((h, w))
    fields["pred_boxes"] = boxes
    keep = boxes.nonempty()
    out = Instances((h, w), **fields)[keep]
    if masks is None:
        return out
    masks = (masks.tensor if isinstance(masks, ROIMasks) else masks[:, 0])[keep]  # N x M x M probabilities
    crops = _paste_crops(masks, out.pred_boxes.tensor, h, w, mask_threshold)
    nuclei = CropMasks((h, w), np.asarray([b for b, _ in crops], np.int64).reshape(-1, 4), [m for _, m in crops],
                       out.scores.detach().cpu().numpy(), out.pred_classes.detach().cpu().numpy())
    inst = NucleiInstances((h, w), **out.get_fields())
    inst.pred_nuclei = nuclei
    if mask_threshold is not None:
        hidden = nuclei.hidden(min_visible, mask_threshold)
        if hidden.any():
            inst = inst[torch.from_numpy(~hidden)]
    return inst


def _paste_crops(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int,
                 threshold: float | None) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """``(box, crop)`` of every mask pasted by Detectron2's per-box paste (see :func:`crop_postprocess`)."""
    from detectron2.layers.mask_ops import _do_paste_mask

    out = []
    for i in range(len(masks)):
        pasted, (sy, sx) = _do_paste_mask(masks[i:i + 1, None], boxes[i:i + 1], height, width, skip_empty=True)
        crop = pasted[0].detach().to("cpu", torch.float32).numpy()
        x0, y0 = int(sx.start), int(sy.start)
        if threshold is not None:
            binary = crop >= threshold
            ys, xs = np.flatnonzero(binary.any(axis=1)), np.flatnonzero(binary.any(axis=0))
            if ys.size:  # trimmed to its pixels; an empty mask keeps its region
                binary = binary[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1]
                x0, y0 = x0 + int(xs[0]), y0 + int(ys[0])
            crop = binary.astype(np.float32)
        out.append(((x0, y0, x0 + crop.shape[1], y0 + crop.shape[0]), np.ascontiguousarray(crop, np.float32)))
    return out


@META_ARCH_REGISTRY.register()
class NucleiRCNN(ExportableNetworks, GeneralizedRCNN):
    """``MODEL.META_ARCHITECTURE: NucleiRCNN``: ``GeneralizedRCNN`` whose post-processing is
    :func:`crop_postprocess` (same weights, same detections; nuclei as crops instead of ``N x H x W`` masks), and
    whose learned part runs as the network "rcnn" (see the module docstring)."""

    #: Name of the R-CNN network in :meth:`networks`.
    rcnn_network = "rcnn"
    #: The "rcnn" network's outputs (the export sidecar's "outputs").
    output_names = OUTPUT_NAMES
    #: The "rcnn" network takes the raw 0-255 image and normalises it itself (the export sidecar says so).
    normalizes_inside = True
    #: Config keys baked into the exported "rcnn" network, recorded in the export sidecar for its readers.
    export_keys = ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", "MODEL.ROI_HEADS.NMS_THRESH_TEST", "TEST.DETECTIONS_PER_IMAGE")

    @configurable
    def __init__(self, *, min_visible_fraction: float = 0.0, mask_threshold: float = 0.5, **kwargs: Any):
        """
        Args:
            min_visible_fraction: ``TEST.MIN_VISIBLE_FRACTION``, for :func:`crop_postprocess` (``min_visible``).
            mask_threshold: ``TEST.MASK_THRESHOLD``, for :func:`crop_postprocess`: mask probabilities at or above it
                are the nucleus.
            kwargs: ``GeneralizedRCNN`` arguments (backbone, proposal_generator, roi_heads, pixel_mean, ...).
        """
        super().__init__(**kwargs)
        if not 0.0 <= min_visible_fraction <= 1.0:
            raise ValueError(f"TEST.MIN_VISIBLE_FRACTION must be in [0, 1], got {min_visible_fraction}")
        if not 0.0 < mask_threshold < 1.0:
            raise ValueError(f"TEST.MASK_THRESHOLD must be in (0, 1), got {mask_threshold}")
        self.min_visible_fraction = float(min_visible_fraction)
        self.mask_threshold = float(mask_threshold)

    @classmethod
    def from_config(cls, cfg: Any) -> dict[str, Any]:
        ret = super().from_config(cfg)
        ret["min_visible_fraction"] = cfg.TEST.MIN_VISIBLE_FRACTION
        ret["mask_threshold"] = cfg.TEST.MASK_THRESHOLD
        return ret

    @property
    def in_channels(self) -> int:
        """Channels of the input image (RGB + ``INPUT.EXTRA_CHANNELS``), as the dense models say it."""
        return int(self.pixel_mean.numel())

    @property
    def export_unsupported(self) -> str | None:
        """Why this model cannot run as exported networks (None: it can): :func:`unsupported_reason`."""
        return unsupported_reason(self)

    def network_modules(self) -> dict[str, nn.Module]:
        """``{"rcnn": RCNNNetwork}`` (built on demand around this model's own modules; not a registered child)."""
        return {self.rcnn_network: RCNNNetwork(self)}

    def network_input(self, inp: dict[str, Any], index: int = 0) -> torch.Tensor:
        """The ``C x H x W`` float 0-255 image the "rcnn" network takes for one batched input."""
        return self._move_to_current_device(inp["image"]).float()

    def raw_instances(self, inp: dict[str, Any], index: int = 0) -> Instances:
        """``GeneralizedRCNN.inference(..., do_postprocess=False)``'s ``Instances`` of one input, from the outputs of
        the "rcnn" network (eager, or the installed runtime's)."""
        image = self.network_input(inp, index)
        boxes, scores, classes, masks = (torch.as_tensor(t, device=self.device)
                                         for t in self.run_network(self.rcnn_network, image))
        return Instances(tuple(image.shape[-2:]), pred_boxes=Boxes(boxes.float()), scores=scores.float(),
                         pred_classes=classes.long(), pred_masks=masks.float())

    def inference(self, batched_inputs: list[dict[str, Any]], detected_instances: list[Instances] | None = None,
                  do_postprocess: bool = True) -> Any:
        """``GeneralizedRCNN.inference`` through the "rcnn" network (``do_postprocess=False`` still gives the raw
        outputs). Given ``detected_instances``, or for a variant the network does not cover, Detectron2's own."""
        if detected_instances is not None or (self.runtime is None and self.export_unsupported):
            results = super().inference(batched_inputs, detected_instances, do_postprocess=False)
        else:
            results = [self.raw_instances(x, i) for i, x in enumerate(batched_inputs)]
        if not do_postprocess:
            return results
        return [{"instances": self.postprocess_raw(r, inp)} for r, inp in zip(results, batched_inputs)]

    def postprocess_raw(self, raw: Instances, inp: dict[str, Any]) -> Instances:
        """One raw output (``inference(..., do_postprocess=False)``) as this model returns it: :func:`crop_postprocess`
        at the input's ``height x width`` with ``TEST.MASK_THRESHOLD`` and ``TEST.MIN_VISIBLE_FRACTION``."""
        return crop_postprocess(raw, inp.get("height", raw.image_size[0]), inp.get("width", raw.image_size[1]),
                                mask_threshold=self.mask_threshold, min_visible=self.min_visible_fraction)
