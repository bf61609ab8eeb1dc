"""Panoptic Mask R-CNN with semantic feature fusion: Liu et al., "Nuclei Segmentation via a Deep Panoptic Model with
Semantic Feature Fusion", IJCAI 2019, pp. 861-868 (https://www.ijcai.org/Proceedings/2019/0121.pdf).

Three additions to Mask R-CNN (FPN P2-P6, RPN, RoIAlign), each switchable from the config so the paper's ablation
runs from configs (see ``docs/panoptic_fusion.md``):

* **Auxiliary semantic branch** (``MODEL.PANOPTIC_FUSION.SEMANTIC_BRANCH``): a GCN decoder on the shared FPN
  (:class:`nuclei_d2.modeling.gcn.GCNSemanticHead`) trained with a cross-entropy against the nucleus foreground,
  L_semseg1. Training only: it shapes the backbone with global context, inference does not run it.
* **Semantic feature fusion in the instance branch** (``MODEL.PANOPTIC_FUSION.FEATURE_FUSION``): P2 is
  mapped to 2 channels and upsampled x4 to input size (F_0); then each mask M_i, resized to its box B_i, replaces
  that box's region of the map in turn, F_i = G_replace(G_reshape(M_i, B_i), sub(F_{i-1}, B_i)); the result F_N is
  trained with a cross-entropy against the foreground, L_semseg2. Gradients reach the mask head through the pasted
  masks, so every mask is also judged in the context of the whole image. See :func:`paste_and_replace`.
* **Dual-modal mask generator** (``MODEL.ROI_MASK_HEAD.NAME: DualModalMaskHead``,
  :mod:`nuclei_d2.modeling.dual_modal_mask_head`) instead of the 4-conv + deconv mask head.

Total loss = RPN + box + mask + w1 * L_semseg1 + w2 * L_semseg2 (w1 = w2 = 1 in the paper).

The foreground target comes from the dataset mapper (setup adds it to ``INPUT.TARGETS``: ``required_targets_of``);
the model only pads it like the images (padding is ignored by the losses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, cat
from detectron2.modeling import META_ARCH_REGISTRY, ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.mask_head import mask_rcnn_loss
from detectron2.modeling.roi_heads.roi_heads import select_foreground_proposals
from detectron2.structures import ImageList, Instances
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils.events import get_event_storage
from torch import nn

from .gcn import GCNSemanticHead
from .rcnn import NucleiRCNN

__all__ = [
    "PanopticFusionRCNN",
    "PanopticFusionROIHeads",
    "SemanticFeatureFusion",
    "paste_and_replace",
    "semantic_cross_entropy",
]

PASTE_ORDERS = ("iou", "sampled")


def paste_and_replace(base: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor,
                      image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Paste each mask, bilinearly resized to its box, over ``base``; later masks overwrite earlier ones.

    This is F_i = G_replace(G_reshape(M_i, B_i), sub(F_{i-1}, B_i)) of Liu et al. 2019 for i = 1..N, done
    at once: an integer "owner" map records, per pixel, the last box covering it, and each owned pixel samples its
    owner's mask bilinearly. The result is differentiable w.r.t. ``base`` (where nothing is pasted) and ``masks``
    (where their pixels are visible; a mask entirely overwritten by later ones gets no gradient); not w.r.t.
    ``boxes``.

    Geometry (Detectron2's pixel model, as ``detector_postprocess`` uses when it pastes masks): pixel ``(y, x)``
    covers ``[x, x+1) x [y, y+1)``, it belongs to box ``(x0, y0, x1, y1)`` when its centre does
    (``x0 <= x + 0.5 < x1``), and it samples the M x M mask at ``(x + 0.5 - x0) / (x1 - x0) * M - 0.5`` (clamped to
    the mask), i.e. exactly ``F.interpolate(mask, (box_h, box_w), mode="bilinear", align_corners=False)`` for a box
    on integer coordinates. Regions are clipped to ``image_size``; boxes empty after clipping paste nothing.

    Args:
        base: (C, H, W) map to paste into (e.g. F_0, logits); not modified in place.
        masks: (N, C, M_h, M_w) values to paste, in the order they are applied.
        boxes: (N, 4) boxes XYXY in pixels of ``base``.
        image_size: (h, w) of the valid region (top-left of ``base``; default its full size), e.g. the unpadded image.

    Returns:
        (C, H, W) tensor: ``base`` where no box reaches, the last covering mask elsewhere.
    """
    if base.dim() != 3:
        raise ValueError(f"paste_and_replace: base must be (C, H, W), got shape {tuple(base.shape)}")
    if masks.dim() != 4 or masks.shape[1] != base.shape[0]:
        raise ValueError(f"paste_and_replace: masks must be (N, {base.shape[0]}, M, M), got {tuple(masks.shape)}")
    n = masks.shape[0]
    if boxes.shape != (n, 4):
        raise ValueError(f"paste_and_replace: boxes must be ({n}, 4), got {tuple(boxes.shape)}")
    if n == 0:
        return base
    _, height, width = base.shape
    h_lim, w_lim = (height, width) if image_size is None else (min(image_size[0], height), min(image_size[1], width))
    b = boxes.detach().to(device=base.device, dtype=torch.float32)
    # Pixel j's centre j + 0.5 lies in [a, c) iff ceil(a - 0.5) <= j < ceil(c - 0.5).
    xs0 = torch.ceil(b[:, 0] - 0.5).clamp(0, w_lim).long().tolist()
    ys0 = torch.ceil(b[:, 1] - 0.5).clamp(0, h_lim).long().tolist()
    xs1 = torch.ceil(b[:, 2] - 0.5).clamp(0, w_lim).long().tolist()
    ys1 = torch.ceil(b[:, 3] - 0.5).clamp(0, h_lim).long().tolist()
    owner = torch.full((h_lim, w_lim), -1, dtype=torch.long, device=base.device)
    for i, (x0, y0, x1, y1) in enumerate(zip(xs0, ys0, xs1, ys1)):
        if x0 < x1 and y0 < y1:
            owner[y0:y1, x0:x1] = i  # painter's order: later boxes overwrite
    ys, xs = torch.nonzero(owner >= 0, as_tuple=True)
    if ys.numel() == 0:
        return base
    idx = owner[ys, xs]
    bb = b[idx]
    mh, mw = masks.shape[-2:]
    # A pixel is owned only if its centre is inside the box, so the box has positive width and height there.
    sx = ((xs.to(torch.float32) + 0.5 - bb[:, 0]) / (bb[:, 2] - bb[:, 0]) * mw - 0.5).clamp(0, mw - 1)
    sy = ((ys.to(torch.float32) + 0.5 - bb[:, 1]) / (bb[:, 3] - bb[:, 1]) * mh - 0.5).clamp(0, mh - 1)
    ix0, iy0 = sx.floor().long(), sy.floor().long()
    ix1, iy1 = (ix0 + 1).clamp(max=mw - 1), (iy0 + 1).clamp(max=mh - 1)
    wx, wy = (sx - ix0).to(masks.dtype)[:, None], (sy - iy0).to(masks.dtype)[:, None]
    flat = masks.reshape(n, masks.shape[1], mh * mw)

    def tap(iy: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:  # (K, C) mask values of each pixel's owner
        return flat[idx, :, iy * mw + ix]

    values = ((1 - wy) * ((1 - wx) * tap(iy0, ix0) + wx * tap(iy0, ix1))
              + wy * ((1 - wx) * tap(iy1, ix0) + wx * tap(iy1, ix1)))
    out = base.clone()
    out[:, ys, xs] = values.t().to(base.dtype)
    return out


def semantic_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_value: int = 255) -> torch.Tensor:
    """Mean pixel-wise cross-entropy of (B, K, H, W) logits against (B, H, W) class indices, skipping ``ignore``."""
    if logits.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"semantic logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in size")
    if not bool((target != ignore_value).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_value, reduction="mean")


class SemanticFeatureFusion(nn.Module):
    """F_0 from a backbone level (1x1 conv to 2 channels, bilinear upsampling to input size), then mask pasting.

    The paper upsamples P2 x4 and then convolves to 2 channels; a 1x1 convolution commutes with bilinear
    upsampling, so convolving first is the same map at 1/16 of the cost.
    """

    def __init__(self, in_channels: int, in_stride: int, num_classes: int = 2):
        super().__init__()
        self.in_stride = in_stride
        self.conv = Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.constant_(self.conv.bias, 0.0)

    def initial_map(self, feature: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """F_0: (B, 2, H, W) logits at input size (``output_size``, default feature size x stride)."""
        h, w = feature.shape[-2:]
        size = output_size or (h * self.in_stride, w * self.in_stride)
        return F.interpolate(self.conv(feature), size=size, mode="bilinear", align_corners=False)

    def forward(self, feature: torch.Tensor, mask_logits: list[torch.Tensor], boxes: list[torch.Tensor],
                image_sizes: list[tuple[int, int]], output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """F_N per image: F_0 with each instance's mask logits pasted over its box (later ones win).

        Args:
            feature: (B, C, h, w) backbone level (P2).
            mask_logits: per image, (N_i, M, M) foreground logits of its instances, in paste order.
            boxes: per image, (N_i, 4) XYXY boxes of those instances (input pixels).
            image_sizes: per image, the unpadded (h, w): pasting stays inside it.
            output_size: padded input size (default: feature size x stride).
        """
        f0 = self.initial_map(feature, output_size)
        out = []
        for b, (logits, bx, size) in enumerate(zip(mask_logits, boxes, image_sizes)):
            # A 1-channel sigmoid logit l is the 2-class softmax pair (0, l): softmax(0, l)[1] = sigmoid(l).
            pair = torch.stack([torch.zeros_like(logits), logits], dim=1)
            out.append(paste_and_replace(f0[b], pair, bx, size))
        return torch.stack(out)


@ROI_HEADS_REGISTRY.register()
class PanopticFusionROIHeads(StandardROIHeads):
    """``StandardROIHeads`` that, in training, returns the positive proposals with their mask logits.

    Training returns ``(foreground_proposals, losses)`` where each image's foreground proposals carry
    ``mask_logits`` (N_i, M, M): the mask head's logits of the proposal's ground-truth class, still attached to the
    graph, for the semantic feature fusion. The losses are Detectron2's (box, mask). Inference is unchanged.
    """

    def forward(self, images: ImageList, features: dict[str, torch.Tensor], proposals: list[Instances],
                targets: list[Instances] | None = None):
        if not self.training:
            return super().forward(images, features, proposals, targets)
        if not targets:
            raise ValueError("PanopticFusionROIHeads: ground-truth instances are required in training")
        proposals = self.label_and_sample_proposals(proposals, targets)
        losses = self._forward_box(features, proposals)
        foreground, mask_losses = self._forward_mask_with_logits(features, proposals)
        losses.update(mask_losses)
        losses.update(self._forward_keypoint(features, proposals))
        return foreground, losses

    def _forward_mask_with_logits(self, features: dict[str, torch.Tensor], proposals: list[Instances]
                                  ) -> tuple[list[Instances], dict[str, torch.Tensor]]:
        if not self.mask_on:
            return [], {}
        if self.mask_pooler is None or not hasattr(self.mask_head, "layers"):
            raise ValueError("PanopticFusionROIHeads needs a pooled mask head with a layers() method (a "
                             "BaseMaskRCNNHead subclass and MODEL.ROI_MASK_HEAD.POOLER_TYPE set)")
        foreground, _ = select_foreground_proposals(proposals, self.num_classes)
        x = self.mask_pooler([features[f] for f in self.mask_in_features], [p.proposal_boxes for p in foreground])
        logits = self.mask_head.layers(x)
        loss = mask_rcnn_loss(logits, foreground, self.mask_head.vis_period) * self.mask_head.loss_weight
        if logits.size(1) == 1:
            chosen = logits[:, 0]
        else:
            classes = cat([p.gt_classes for p in foreground], dim=0) if foreground else logits.new_zeros(0).long()
            chosen = logits[torch.arange(logits.size(0), device=logits.device), classes]
        for p, lg in zip(foreground, chosen.split([len(p) for p in foreground])):
            p.mask_logits = lg
        return foreground, {"loss_mask": loss}


@META_ARCH_REGISTRY.register()
class PanopticFusionRCNN(NucleiRCNN):
    """Mask R-CNN + auxiliary GCN semantic branch + semantic feature fusion (Liu et al., IJCAI 2019).

    Training losses: Detectron2's RPN/box/mask losses, ``loss_semseg1`` (semantic branch) and ``loss_semseg2``
    (fused map F_N), each present only when its part is switched on. Inference is :class:`NucleiRCNN`'s: the
    instance branch alone (``[{"instances": NucleiInstances}]``, nuclei as crops), so it costs what the chosen mask
    head costs.
    """

    @configurable
    def __init__(self, *, semantic_branch: nn.Module | None = None,
                 feature_fusion: SemanticFeatureFusion | None = None, fusion_in_feature: str = "p2",
                 semseg1_weight: float = 1.0, semseg2_weight: float = 1.0, ignore_value: int = 255,
                 paste_order: str = "iou", foreground_target: str = "foreground", **kwargs):
        """
        Args:
            semantic_branch: module mapping the backbone features (and an output size) to (B, 2, H, W) logits;
                None switches L_semseg1 off.
            feature_fusion: builds F_0 from ``fusion_in_feature`` and pastes the masks; None switches L_semseg2 off.
                Needs ``roi_heads`` to be :class:`PanopticFusionROIHeads` (it hands back the mask logits).
            semseg1_weight, semseg2_weight: loss weights (the paper sums the losses unweighted).
            ignore_value: target value of padded pixels, skipped by the semantic losses.
            paste_order: training order of the positive proposals' masks (later ones win): "iou" = ascending IoU
                with their ground-truth nucleus, so the best-aligned proposal of each nucleus is written last;
                "sampled" = the order of Detectron2's proposal sampler (random).
            foreground_target: key of the foreground map in each input's ``targets`` (from INPUT.TARGETS).
            kwargs: GeneralizedRCNN's arguments (backbone, proposal_generator, roi_heads, pixel_mean, ...).
        """
        super().__init__(**kwargs)
        if paste_order not in PASTE_ORDERS:
            raise ValueError(f"MODEL.PANOPTIC_FUSION.PASTE_ORDER must be one of {PASTE_ORDERS}, got {paste_order!r}")
        if feature_fusion is not None:
            if not isinstance(self.roi_heads, PanopticFusionROIHeads):
                raise ValueError("MODEL.PANOPTIC_FUSION.FEATURE_FUSION needs MODEL.ROI_HEADS.NAME: "
                                 f"PanopticFusionROIHeads (got {type(self.roi_heads).__name__})")
            if not getattr(self.roi_heads, "mask_on", False):
                raise ValueError("MODEL.PANOPTIC_FUSION.FEATURE_FUSION pastes predicted masks: set MODEL.MASK_ON True")
        self.semantic_branch = semantic_branch
        self.feature_fusion = feature_fusion
        self.fusion_in_feature = fusion_in_feature
        self.semseg1_weight = semseg1_weight
        self.semseg2_weight = semseg2_weight
        self.ignore_value = ignore_value
        self.paste_order = paste_order
        self.foreground_target = foreground_target

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        pf = cfg.MODEL.PANOPTIC_FUSION
        shapes: dict[str, ShapeSpec] = ret["backbone"].output_shape()
        if pf.SEMANTIC_BRANCH:
            ret["semantic_branch"] = GCNSemanticHead(cfg, shapes)
        if pf.FEATURE_FUSION:
            if pf.FUSION_IN_FEATURE not in shapes:
                raise ValueError(f"MODEL.PANOPTIC_FUSION.FUSION_IN_FEATURE: {pf.FUSION_IN_FEATURE!r} is not a backbone "
                                 f"output; choose one of {sorted(shapes)}")
            s = shapes[pf.FUSION_IN_FEATURE]
            ret["feature_fusion"] = SemanticFeatureFusion(s.channels, s.stride)
        ret.update(fusion_in_feature=pf.FUSION_IN_FEATURE, semseg1_weight=pf.SEM_SEG1_WEIGHT,
                   semseg2_weight=pf.SEM_SEG2_WEIGHT, ignore_value=pf.IGNORE_VALUE, paste_order=pf.PASTE_ORDER)
        return ret

    @classmethod
    def required_targets_of(cls, cfg) -> tuple[str, ...]:
        """The dense targets a config's training losses need (added to ``INPUT.TARGETS`` by setup): the foreground
        map of the semantic losses."""
        pf = cfg.MODEL.PANOPTIC_FUSION
        return ("foreground",) if pf.SEMANTIC_BRANCH or pf.FEATURE_FUSION else ()

    def forward(self, batched_inputs: list[dict]):
        if not self.training:
            return self.inference(batched_inputs)
        if "instances" not in batched_inputs[0]:
            raise ValueError("PanopticFusionRCNN: training inputs need 'instances' (use NucleiDatasetMapper)")
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        foreground, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        if self.vis_period > 0 and get_event_storage().iter % self.vis_period == 0:
            self.visualize_training(batched_inputs, proposals)
        losses = {**detector_losses, **proposal_losses}
        if self.semantic_branch is None and self.feature_fusion is None:
            return losses
        target = self.foreground_targets(batched_inputs, images)
        padded = tuple(images.tensor.shape[-2:])
        if self.semantic_branch is not None:
            logits = self.semantic_branch(features, output_size=padded)
            losses["loss_semseg1"] = semantic_cross_entropy(logits, target, self.ignore_value) * self.semseg1_weight
        if self.feature_fusion is not None:
            fused = self.fused_map(features, foreground, images.image_sizes, padded)
            losses["loss_semseg2"] = semantic_cross_entropy(fused, target, self.ignore_value) * self.semseg2_weight
        return losses

    def fused_map(self, features: dict[str, torch.Tensor], foreground: list[Instances],
                  image_sizes: list[tuple[int, int]], output_size: tuple[int, int]) -> torch.Tensor:
        """F_N (B, 2, H, W) of a training batch: the positive proposals' mask logits pasted over F_0."""
        logits, boxes = [], []
        for inst in foreground:
            order = None
            if self.paste_order == "iou" and len(inst):
                iou = matched_pairwise_iou(inst.proposal_boxes, inst.gt_boxes)
                order = torch.argsort(iou, stable=True)  # ascending: best-aligned proposal pasted last
            lg, bx = inst.mask_logits, inst.proposal_boxes.tensor
            logits.append(lg if order is None else lg[order])
            boxes.append(bx if order is None else bx[order])
        return self.feature_fusion(features[self.fusion_in_feature], logits, boxes, image_sizes, output_size)

    def foreground_targets(self, batched_inputs: list[dict], images: ImageList) -> torch.Tensor:
        """(B, H, W) long foreground maps from the mapper, padded like the images with ``ignore_value``."""
        maps = []
        for x, (h, w) in zip(batched_inputs, images.image_sizes):
            t = x.get("targets", {}).get(self.foreground_target)
            name = x.get("file_name", "<input>")
            if t is None:
                raise ValueError(f"{name}: PanopticFusionRCNN needs the {self.foreground_target!r} dense target for "
                                 f"its semantic losses; add it to INPUT.TARGETS (the mapper builds it)")
            if tuple(t.shape[-2:]) != (h, w):
                raise ValueError(f"{name}: {self.foreground_target!r} target is {tuple(t.shape)} but the image is "
                                 f"{h}x{w}")
            maps.append(self._move_to_current_device(t).long())
        padded = ImageList.from_tensors(maps, self.backbone.size_divisibility, pad_value=float(self.ignore_value),
                                        padding_constraints=self.backbone.padding_constraints)
        return padded.tensor.long()
