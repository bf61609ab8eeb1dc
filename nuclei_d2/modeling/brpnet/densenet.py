"""DenseNet-121 encoder of BRP-Net's TAFE, adapted to full-resolution features (Chen et al., MICCAI 2020).

Chen, Li, Wang, Heng, "Boundary-assisted Region Proposal Networks for Nucleus Segmentation", MICCAI 2020
(arXiv:2006.02695), Sec. 2.1 and supplementary Table: a DenseNet-121 (growth rate 32) whose first convolution has
stride 1 and whose max-pooling is removed, so the four dense blocks give features at strides 1, 2, 4 and 8 with
256 / 512 / 1024 / 1024 channels.

Discrepancy: the supplement's text lists 6 / 12 / 18 / 24 layers per block; torchvision's (i.e. the standard,
pretrainable) DenseNet-121 has 6 / 12 / 24 / 16. We use the standard one by default (``block_config``) so ImageNet
weights load; both give the 256 / 512 / 1024 / 1024 channel counts only with 6 / 12 / 24 / 16.

The building blocks are torchvision's ``_DenseBlock`` / ``_Transition`` (a library dependency, not copied code);
module names follow torchvision's ``features.*`` so its ``densenet121`` state dicts load by path
(:meth:`DenseNetEncoder.load_torchvision_weights`). Nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.densenet import _DenseBlock, _Transition

from ...checkpoint import load_checkpoint_file

__all__ = ["DenseNetEncoder"]

logger = logging.getLogger(__name__)


class DenseNetEncoder(nn.Module):
    """DenseNet feature extractor returning the output of every dense block (strides 1, 2, 4, 8 by default).

    Args:
        in_channels: input channels (3 = RGB; more when INPUT.EXTRA_CHANNELS adds some — the stem conv of a loaded
            ImageNet checkpoint is then only copied for the first 3 channels).
        growth_rate, block_config, num_init_features, bn_size: DenseNet hyper-parameters (DenseNet-121: 32,
            (6, 12, 24, 16), 64, 4).
        stem_stride: stride of the 7x7 stem convolution (BRP-Net: 1; the standard DenseNet: 2).
        stem_pool: keep the stem's 3x3 stride-2 max-pooling (BRP-Net: False).
    """

    def __init__(self, in_channels: int = 3, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, stem_stride: int = 1, stem_pool: bool = False):
        super().__init__()
        if len(block_config) < 1 or any(int(n) < 1 for n in block_config):
            raise ValueError(f"block_config needs at least one block of >= 1 layer, got {list(block_config)}")
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(in_channels, num_init_features, 7, stem_stride, 3, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(num_init_features))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        if stem_pool:
            self.features.add_module("pool0", nn.MaxPool2d(3, 2, 1))
        ch = num_init_features
        self.out_channels: list[int] = []
        self.strides: list[int] = []
        stride = stem_stride * (2 if stem_pool else 1)
        for i, n in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(int(n), ch, bn_size, growth_rate, 0.0))
            ch += int(n) * growth_rate
            self.out_channels.append(ch)
            self.strides.append(stride)
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(ch, ch // 2))
                ch //= 2
                stride *= 2
        self.features.add_module("norm5", nn.BatchNorm2d(ch))
        self.in_channels = int(in_channels)
        self.num_blocks = len(block_config)

    @property
    def size_divisibility(self) -> int:
        return self.strides[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features after each dense block (the last one after ``norm5`` + ReLU), finest first."""
        outs: list[torch.Tensor] = []
        for name, module in self.features.named_children():
            x = module(x)
            if name.startswith("denseblock"):
                outs.append(x)
        outs[-1] = torch.relu(self.features.norm5(outs[-1]))
        return outs

    def load_torchvision_weights(self, path: str, *, allow_pickle: bool = False) -> list[str]:
        """Load a torchvision ``densenet121`` state dict (e.g. ``densenet121-a639ec97.pth``) from ``path``.

        Accepts the old ``norm.1`` key style, a ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper and keys with or
        without the ``features.`` prefix; the classifier is ignored. With more than 3 input channels, the stem's
        extra input channels keep their random initialisation. Returns the names of parameters not found in the file.

        Raises:
            FileNotFoundError / ValueError: missing file, or a file whose tensors do not fit this encoder.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: DenseNet weights file not found (MODEL.BRPNET.DENSENET_WEIGHTS)")
        state = load_checkpoint_file(path, allow_pickle=allow_pickle, what="MODEL.BRPNET.DENSENET_WEIGHTS")
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
        pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|"
                             r"running_var|num_batches_tracked))$")
        clean: dict[str, torch.Tensor] = {}
        for k, v in state.items():
            m = pattern.match(k)
            if m:
                k = m.group(1) + m.group(2)
            if k.startswith("module."):
                k = k[len("module."):]
            if not k.startswith("features."):
                if k.startswith("classifier"):
                    continue
                k = "features." + k
            clean[k] = v
        own = self.state_dict()
        conv0 = clean.get("features.conv0.weight")
        if conv0 is not None and conv0.shape[1] != own["features.conv0.weight"].shape[1]:
            w = own["features.conv0.weight"].clone()
            c = min(conv0.shape[1], w.shape[1])
            w[:, :c] = conv0[:, :c]
            clean["features.conv0.weight"] = w
        bad = [k for k, v in clean.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if bad:
            raise ValueError(f"{path}: {len(bad)} tensors do not fit this DenseNet (e.g. {bad[0]}: "
                             f"{tuple(clean[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}); check MODEL.BRPNET.DENSENET"
                             )
        usable = {k: v for k, v in clean.items() if k in own}
        if not usable:
            raise ValueError(f"{path}: no DenseNet tensors found (is it a torchvision densenet121 state dict?)")
        self.load_state_dict(usable, strict=False)
        missing = sorted(set(own) - set(usable))
        logger.info(f"[BRP-Net] loaded {len(usable)} DenseNet tensors from {path}; {len(missing)} not in the file")
        return missing
