"""The dual-modal mask generator of Liu et al., "Nuclei Segmentation via a Deep Panoptic Model with Semantic Feature
Fusion", IJCAI 2019 (the "dual-modal mask generator"), as a Detectron2 mask head.

A standard Mask R-CNN mask head sees only its 14x14 RoI through 3x3 convolutions and a deconvolution, so every output
pixel has a local receptive field. The dual-modal generator adds a fully connected path, whose every output pixel
sees the whole RoI (as in PANet's fused mask head), and replaces the deconvolution by a sub-pixel (pixel shuffle)
upscaling path; the two predictions are summed pixel-wise.

Layers per RoI (paper's table, with ``C = CONV_DIM = 256``, ``F = FC_CONV_DIM = 128`` and ``K`` mask classes)::

    input                       C x 14 x 14
    3 x [conv 3x3, C]           C x 14 x 14         shared trunk
    (a) FC path
        conv1 3x3, C            C x 14 x 14
        conv2 3x3, F            F x 14 x 14
        FC -> 784               784                 (2 * 14)^2
        reshape                 1 x 28 x 28
        duplicate               K x 28 x 28
    (b) upscaling path
        conv3 3x3, C            C x 14 x 14
        conv4 3x3, 4C           4C x 14 x 14        (1024 for C = 256)
        pixel shuffle (x2)      C x 28 x 28
        conv5 1x1, K            K x 28 x 28
    output = (a) + (b)          K x 28 x 28

The paper lists ``K = 2`` because maskrcnn-benchmark counts the background as a class; Detectron2 does not, so with
``MODEL.ROI_HEADS.NUM_CLASSES: 1`` (nuclei) the output is 1 x 28 x 28 and the losses/inference are Detectron2's own
(per-class sigmoid, :func:`detectron2.modeling.roi_heads.mask_head.mask_rcnn_loss`). Build it with
``num_classes=2`` to get the paper's table verbatim.
"""

from __future__ import annotations

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY, BaseMaskRCNNHead
from torch import nn

__all__ = ["DualModalMaskHead"]


def _conv3x3(cin: int, cout: int, norm: str) -> Conv2d:
    conv = Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=not norm, norm=get_norm(norm, cout),
                  activation=nn.ReLU())
    weight_init.c2_msra_fill(conv)
    return conv


@ROI_MASK_HEAD_REGISTRY.register()
class DualModalMaskHead(BaseMaskRCNNHead):
    """Dual-modal mask generator (Liu et al. 2019): shared convs, then an FC path and a pixel-shuffle path, summed.

    ``NORM`` applies to every 3x3 conv (GroupNorm in the nuclei configs: "no batch norm in heads"); the FC layer and
    the 1x1 predictor have no norm and no activation (they produce logits).
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, num_classes: int, conv_dim: int = 256, fc_conv_dim: int = 128,
                 num_shared_conv: int = 3, upscale: int = 2, conv_norm: str = "", **kwargs):
        """
        Args:
            input_shape: shape of the pooled RoI features (channels, height = width = pooler resolution).
            num_classes: number of mask channels (foreground classes; 1 if class-agnostic).
            conv_dim: channels of the shared trunk, conv1, conv3 and of the pixel-shuffled map (paper: 256).
            fc_conv_dim: channels of conv2, the input of the FC layer (paper: 128).
            num_shared_conv: 3x3 convs of the shared trunk (paper: 3).
            upscale: output side / RoI side; the pixel shuffle factor (paper: 2, 14 -> 28).
            conv_norm: normalisation of the 3x3 convs ("", "GN", ...).
        """
        super().__init__(**kwargs)
        if input_shape.height != input_shape.width:
            raise ValueError(f"DualModalMaskHead needs square RoI features, got {input_shape.height}x"
                             f"{input_shape.width}")
        if num_shared_conv < 0 or conv_dim <= 0 or fc_conv_dim <= 0 or upscale < 1:
            raise ValueError(f"DualModalMaskHead: bad sizes conv_dim={conv_dim} fc_conv_dim={fc_conv_dim} "
                             f"num_shared_conv={num_shared_conv} upscale={upscale}")
        self.num_classes = num_classes
        self.roi_side = input_shape.height
        self.out_side = input_shape.height * upscale
        cin = input_shape.channels
        self.shared = nn.Sequential(*[_conv3x3(cin if i == 0 else conv_dim, conv_dim, conv_norm)
                                      for i in range(num_shared_conv)])
        trunk_out = conv_dim if num_shared_conv else cin
        # (a) FC path: every output pixel sees the whole RoI.
        self.fc_conv1 = _conv3x3(trunk_out, conv_dim, conv_norm)
        self.fc_conv2 = _conv3x3(conv_dim, fc_conv_dim, conv_norm)
        self.fc = nn.Linear(fc_conv_dim * self.roi_side ** 2, self.out_side ** 2)
        # (b) upscaling path: sub-pixel convolution (Shi et al. 2016) instead of a deconvolution.
        self.up_conv3 = _conv3x3(trunk_out, conv_dim, conv_norm)
        self.up_conv4 = _conv3x3(conv_dim, conv_dim * upscale ** 2, conv_norm)
        self.pixel_shuffle = nn.PixelShuffle(upscale)
        self.up_conv5 = Conv2d(conv_dim, num_classes, kernel_size=1)
        # Small initial logits on both paths (as Detectron2 does for its mask predictor).
        nn.init.normal_(self.fc.weight, std=0.001)
        nn.init.constant_(self.fc.bias, 0)
        nn.init.normal_(self.up_conv5.weight, std=0.001)
        nn.init.constant_(self.up_conv5.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        ret = super().from_config(cfg, input_shape)
        dm = cfg.MODEL.ROI_MASK_HEAD.DUAL_MODAL
        ret.update(
            input_shape=input_shape,
            num_classes=1 if cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK else cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            conv_dim=cfg.MODEL.ROI_MASK_HEAD.CONV_DIM,
            fc_conv_dim=dm.FC_CONV_DIM,
            num_shared_conv=dm.NUM_SHARED_CONV,
            upscale=dm.UPSCALE,
            conv_norm=cfg.MODEL.ROI_MASK_HEAD.NORM,
        )
        return ret

    def fc_path(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) trunk features -> (N, K, 2S, 2S): FC prediction duplicated over the K mask channels."""
        x = self.fc_conv2(self.fc_conv1(x))
        x = self.fc(x.flatten(1)).view(-1, 1, self.out_side, self.out_side)
        return x.expand(-1, self.num_classes, -1, -1)

    def upscale_path(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) trunk features -> (N, K, 2S, 2S) via conv3, conv4, pixel shuffle and the 1x1 conv5."""
        return self.up_conv5(self.pixel_shuffle(self.up_conv4(self.up_conv3(x))))

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        """Mask logits (N, K, 2S, 2S) of RoI features (N, C, S, S): pixel-wise sum of the two paths."""
        x = self.shared(x)
        return self.fc_path(x) + self.upscale_path(x)
