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
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.structures import Instances, ROIMasks

from ..structures import CropMasks, NucleiInstances

__all__ = ["NucleiRCNN", "crop_postprocess"]


def crop_postprocess(results: Instances, output_height: int, output_width: int,
                     mask_threshold: float | None = 0.5) -> Instances:
    """``detector_postprocess`` without full-size masks: raw R-CNN outputs at ``output_height x output_width``.

    Boxes are scaled from the network input (``results.image_size``) to the output size, clipped, and instances with
    an empty box dropped, as Detectron2 does. Each mask is pasted into the region Detectron2's CPU paste samples (the
    box rounded out by one pixel, clipped). With ``mask_threshold`` the crops are binary (``>= mask_threshold``, as
    Detectron2 thresholds) and trimmed to their pixels; a mask left without pixels keeps its (all-zero) region, so
    the instances (and ``pred_boxes`` for box AP) stay those Detectron2 returns. ``None`` keeps the probabilities
    in the whole region (the soft masks test-time augmentation merges).

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
class NucleiRCNN(GeneralizedRCNN):
    """``MODEL.META_ARCHITECTURE: NucleiRCNN``: ``GeneralizedRCNN`` whose post-processing is
    :func:`crop_postprocess` (same weights, same detections; nuclei as crops instead of ``N x H x W`` masks)."""

    def inference(self, batched_inputs: list[dict[str, Any]], detected_instances: list[Instances] | None = None,
                  do_postprocess: bool = True) -> Any:
        """``GeneralizedRCNN.inference`` (``do_postprocess=False`` still gives the raw outputs)."""
        results = super().inference(batched_inputs, detected_instances, do_postprocess=False)
        if not do_postprocess:
            return results
        return [{"instances": crop_postprocess(r, inp.get("height", r.image_size[0]),
                                               inp.get("width", r.image_size[1]))}
                for r, inp in zip(results, batched_inputs)]
