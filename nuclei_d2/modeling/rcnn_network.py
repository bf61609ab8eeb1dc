"""``RCNNNetwork``: the learned part of a :class:`~nuclei_d2.modeling.rcnn.NucleiRCNN` as one tensor-in / tensor-out
module, what ONNX and TorchScript export (issue 27) and what the meta-architecture runs at inference.

Detectron2's R-CNN hands ``Instances`` from stage to stage, which neither ``torch.jit.trace`` nor ONNX carry. This
module runs the same stages on one image and returns plain tensors::

    image (C x H x W float, 0-255, the channels the model takes: RGB + INPUT.EXTRA_CHANNELS)
      -> normalise (MODEL.PIXEL_MEAN/STD), pad to the backbone's size divisibility, [Mask R-CNN+: 1x1 projection]
      -> backbone, RPN (Detectron2's own, traceable), box head
      -> box inference: Detectron2's ``fast_rcnn_inference_single_image`` written without its data-dependent Python
         branch (non-finite rows are always filtered, a no-op when there are none), so the count of detections
         stays dynamic in a trace
      -> mask head on the detections plus one dummy RoI (dropped again), so the RoI pooling and the mask head never
         see an empty batch (ONNX Runtime's RoiAlign and convolutions need at least one RoI)
    outputs: boxes (N, 4) XYXY in input pixels, scores (N,), classes (N,) int64, masks (N, 1, M, M) probabilities

which are the fields of ``GeneralizedRCNN.inference(..., do_postprocess=False)`` (``pred_boxes``, ``scores``,
``pred_classes``, ``pred_masks``): the meta-architecture builds its raw ``Instances`` from them and post-processes
them as before (:func:`~nuclei_d2.modeling.rcnn.crop_postprocess`). Eager, the outputs are those of Detectron2's
own inference (tests/test_export_rcnn.py checks it). The module holds the model's own submodules (no copy of the
weights).

Not every R-CNN variant fits: :func:`check_exportable` names what does not (cascade or other box heads, keypoints,
precomputed proposals, masks off) and why.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.layers import batched_nms
from detectron2.modeling.proposal_generator import RPN
from detectron2.modeling.roi_heads import FastRCNNOutputLayers, StandardROIHeads
from detectron2.modeling.roi_heads.mask_head import BaseMaskRCNNHead
from detectron2.structures import Boxes, ImageList
from torch import nn

from .networks import NetworkIO, NotExportableError

__all__ = ["OUTPUT_NAMES", "RCNNNetwork", "check_exportable", "rcnn_network_io", "unsupported_reason"]

#: Names of the network's outputs, in order (also the ONNX output names).
OUTPUT_NAMES = ("boxes", "scores", "classes", "masks")


def rcnn_network_io(channels: int, mask_side: int, channel_names: tuple[str, ...] = ()) -> NetworkIO:
    """The :class:`NetworkIO` of an R-CNN network: one raw ``C x H x W`` image in, per-detection tensors out."""
    names = f" ({', '.join(channel_names)})" if channel_names else ""
    return NetworkIO(
        inputs=("image",), outputs=OUTPUT_NAMES, channels=(channels,), out_channels=(4, 1, 1, 1), size_multiple=1,
        pad_mode="constant", dynamic_batch=False, input_shapes=((channels, "height", "width"),),
        output_shapes=(("detections", 4), ("detections",), ("detections",), ("detections", 1, mask_side, mask_side)),
        output_dtypes=("float32", "float32", "int64", "float32"),
        meaning=(f"R-CNN on one {channels} x H x W image{names}, 0-255 float, not normalised (the network normalises "
                 "and pads): boxes XYXY in input pixels, scores, classes, masks = per-detection mask probabilities "
                 "in the box (paste each into its box, threshold 0.5), highest score first"))


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot run as an :class:`RCNNNetwork` (and so cannot be exported), or None when it can."""
    rh = getattr(model, "roi_heads", None)
    pg = getattr(model, "proposal_generator", None)
    if not isinstance(pg, RPN):
        return ("it needs Detectron2's RPN as proposal generator (precomputed proposals are an input the export has "
                f"no place for; got {type(pg).__name__})")
    if not isinstance(rh, StandardROIHeads) or type(rh).forward_with_given_boxes is not \
            StandardROIHeads.forward_with_given_boxes:
        return (f"only StandardROIHeads-style ROI heads are supported (got {type(rh).__name__}; cascade heads run "
                "several box stages the exported box inference does not)")
    if type(rh.box_predictor) is not FastRCNNOutputLayers or rh.box_predictor.use_sigmoid_ce:
        return (f"the box predictor must be Detectron2's softmax FastRCNNOutputLayers (got "
                f"{type(rh.box_predictor).__name__})")
    if getattr(rh, "keypoint_on", False):
        return "keypoint heads are not exported (nuclei models have none)"
    if not rh.mask_on or rh.mask_pooler is None or not isinstance(rh.mask_head, BaseMaskRCNNHead) \
            or not hasattr(rh.mask_head, "layers"):
        return ("it needs a mask head with a layers() method (MODEL.MASK_ON and a BaseMaskRCNNHead subclass) on "
                "pooled features (MODEL.ROI_MASK_HEAD.POOLER_TYPE): the exported file returns mask probabilities")
    if rh.box_predictor.test_topk_per_image < 0:
        return "TEST.DETECTIONS_PER_IMAGE must be >= 0 (a bounded number of detections)"
    return None


def check_exportable(model: nn.Module) -> None:
    """Raise :class:`~nuclei_d2.modeling.networks.NotExportableError` naming the meta-architecture and the part that
    keeps it from running as an :class:`RCNNNetwork` (see :func:`unsupported_reason`)."""
    reason = unsupported_reason(model)
    if reason:
        raise NotExportableError(f"{type(model).__name__} cannot be exported: {reason}")


class RCNNNetwork(nn.Module):
    """One image through a Detectron2 R-CNN, tensors in and out (see the module docstring)."""

    def __init__(self, model: nn.Module):
        """``model``: a :class:`~nuclei_d2.modeling.rcnn.NucleiRCNN` (any meta-architecture built on
        ``GeneralizedRCNN``, with an optional ``input_proj`` 1x1 convolution after padding, as Mask R-CNN+ has)."""
        super().__init__()
        check_exportable(model)
        self.backbone = model.backbone
        self.proposal_generator = model.proposal_generator
        self.roi_heads = model.roi_heads
        self.input_proj = getattr(model, "input_proj", None)
        self.register_buffer("pixel_mean", model.pixel_mean, persistent=False)
        self.register_buffer("pixel_std", model.pixel_std, persistent=False)
        self.in_channels = int(model.pixel_mean.numel())
        predictor = self.roi_heads.box_predictor
        self.score_thresh = float(predictor.test_score_thresh)
        self.nms_thresh = float(predictor.test_nms_thresh)
        self.topk = int(predictor.test_topk_per_image)
        self.num_bbox_reg_classes = int(predictor.bbox_pred.out_features) // 4
        self.channel_names = tuple(getattr(model, "channel_names", ()))

    @property
    def io(self) -> NetworkIO:
        """Its inputs and outputs for the exporter (the mask side is probed from the mask head: 2x the pooled side
        for Detectron2's deconvolution and the dual-modal head's pixel shuffle)."""
        side = int(self.roi_heads.mask_pooler.output_size[0])
        channels = int(self.backbone.output_shape()[self.roi_heads.mask_in_features[0]].channels)
        with torch.no_grad():
            probe = self.roi_heads.mask_head.layers(torch.zeros(1, channels, side, side,
                                                                device=self.pixel_mean.device))
        return rcnn_network_io(self.in_channels, int(probe.shape[-1]), self.channel_names)

    def export_examples(self, seed: int = 0) -> tuple[tuple[torch.Tensor], tuple[torch.Tensor]]:
        """(traced, check) inputs for the exporter: single 0-255 noise images of two sizes that are not multiples of
        the backbone's stride (the network pads them), so a trace that baked in a size or a detection count fails
        the check."""
        g = torch.Generator().manual_seed(seed)
        c = self.in_channels
        return ((torch.rand(c, 88, 120, generator=g) * 255.0,), (torch.rand(c, 136, 104, generator=g) * 255.0,))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``C x H x W`` 0-255 float image -> (boxes, scores, classes, masks); see :data:`OUTPUT_NAMES`."""
        x = (image - self.pixel_mean) / self.pixel_std
        images = ImageList.from_tensors([x], self.backbone.size_divisibility,
                                        padding_constraints=self.backbone.padding_constraints)
        t = images.tensor
        if self.input_proj is not None:
            t = self.input_proj(t)
        images = ImageList(t, images.image_sizes)
        features = self.backbone(images.tensor)
        proposals, _ = self.proposal_generator(images, features, None)
        boxes, scores, classes = self._detect(features, proposals[0].proposal_boxes, images.image_sizes[0])
        return boxes, scores, classes, self._masks(features, boxes, classes)

    def _detect(self, features: dict[str, torch.Tensor], proposal_boxes: Boxes, image_size
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Box head and Detectron2's ``fast_rcnn_inference_single_image``, with a dynamic number of detections."""
        rh = self.roi_heads
        x = rh.box_pooler([features[f] for f in rh.box_in_features], [proposal_boxes])
        logits, deltas = rh.box_predictor(rh.box_head(x))
        boxes = rh.box_predictor.box2box_transform.apply_deltas(deltas, proposal_boxes.tensor)
        scores = F.softmax(logits, dim=-1)
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
        boxes, scores = boxes[valid], scores[valid][:, :-1]  # always filtered: no Python branch on the data
        clipped = Boxes(boxes.reshape(-1, 4))
        clipped.clip(image_size)
        boxes = clipped.tensor.view(-1, self.num_bbox_reg_classes, 4)
        keep_mask = scores > self.score_thresh
        inds = keep_mask.nonzero()
        boxes = boxes[inds[:, 0], 0] if self.num_bbox_reg_classes == 1 else boxes[keep_mask]
        scores = scores[keep_mask]
        keep = batched_nms(boxes, scores, inds[:, 1], self.nms_thresh)[:self.topk]
        return boxes[keep], scores[keep], inds[keep][:, 1]

    def _masks(self, features: dict[str, torch.Tensor], boxes: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(N, 1, M, M) mask probabilities of the detections' classes (Detectron2's ``mask_rcnn_inference``)."""
        rh = self.roi_heads
        dummy = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=boxes.dtype, device=boxes.device)
        x = rh.mask_pooler([features[f] for f in rh.mask_in_features], [Boxes(torch.cat([boxes, dummy]))])
        logits = rh.mask_head.layers(x)[:-1]
        # A class-agnostic head has one channel: the clamp picks it for every class, no branch on the shape.
        channel = classes.clamp(max=logits.shape[1] - 1)
        chosen = logits[torch.arange(logits.shape[0], device=logits.device), channel]
        return chosen[:, None].sigmoid()
