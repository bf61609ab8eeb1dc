"""``build_nuclei_model``: Detectron2's ``build_model`` plus the CPU speed settings ``MODEL.CHANNELS_LAST`` (memory
format) and ``MODEL.ROI_ALIGN_CPU`` (how R-CNN heads pool their boxes).

Every place that builds a model for training or inference (trainer, predictor, ensemble members, benchmarks) goes
through here, so a config trains and predicts with the same layout and pooling.
"""

from __future__ import annotations

import torch
from detectron2.modeling import build_model

from ..layers.roi_align import use_sparse_roi_align

__all__ = ["build_nuclei_model", "to_memory_format"]


def to_memory_format(model: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """Store the model's 4-D weights channels-last (NHWC) or contiguous (NCHW), in place; returns the model.

    With channels-last weights, PyTorch's CPU convolutions (oneDNN) also produce channels-last activations: 1.12-1.21x
    faster training steps for the width-16 U-Nets and BRP-Net's narrow TAFE on one thread, 1.04x for the ResNet-18
    Mask R-CNN+ (``benchmarks/bench_memory_format.py``). Inputs need no conversion. A checkpoint loaded afterwards
    keeps the layout (its values are copied into the parameters), and either layout loads either kind of checkpoint.
    """
    return model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def build_nuclei_model(cfg) -> torch.nn.Module:
    """``detectron2.modeling.build_model(cfg)``, then ``MODEL.ROI_ALIGN_CPU`` and ``MODEL.CHANNELS_LAST`` applied."""
    impl = cfg.MODEL.ROI_ALIGN_CPU
    if impl not in ("sparse", "torchvision"):
        raise ValueError(f"MODEL.ROI_ALIGN_CPU must be 'sparse' or 'torchvision', got {impl!r}")
    model = build_model(cfg)
    if impl == "sparse":
        use_sparse_roi_align(model)
    if cfg.MODEL.CHANNELS_LAST:
        to_memory_format(model, True)
    return model
