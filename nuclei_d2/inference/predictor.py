"""``NucleiPredictor``: a trained model from a config + weights, applied to RGB arrays."""

from __future__ import annotations

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import Instances

from ..data.io import to_rgb_uint8
from ..data.mapper import NucleiDatasetMapper

__all__ = ["NucleiPredictor"]


class NucleiPredictor:
    """Run any nuclei-d2 model on one RGB image and return its ``Instances`` at the image's size.

    The image goes through the same :class:`NucleiDatasetMapper` (inference mode) as evaluation does, so extra input
    channels and test-time resizing match what the model was trained and evaluated with.
    """

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        if cfg.MODEL.WEIGHTS:
            DetectionCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.mapper = NucleiDatasetMapper(self.cfg, is_train=False)

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> Instances:
        """Args: image: H x W x 3 RGB (uint8, or anything :func:`to_rgb_uint8` accepts). Returns CPU Instances."""
        image = to_rgb_uint8(image)
        h, w = image.shape[:2]
        inputs = self.mapper({"image": image, "height": h, "width": w})
        return self.model([inputs])[0]["instances"].to("cpu")
