"""One configurable U-Net (Ronneberger et al. 2015), reused by every dense method of the project.

The seed papers use U-Nets that differ only in a handful of choices, all exposed here:

==========================  ============================================================================================
paper                       what they need
==========================  ============================================================================================
Cui et al. 2019 (NB model)  3 output classes, SELU, no normalisation, dropout 0.2 after each conv, Glorot-uniform init
Mahbod et al. 2019          4 poolings / 4 transposed convolutions, ReLU; 1 sigmoid output (stage 1), 1 linear output
                            (stage 2, distance regression)
Mask R-CNN+ distance U-Net  5 poolings / 5 transposed convolutions, dropout 0.1, ReLU, linear output (MSE)
==========================  ============================================================================================

Architecture: ``depth + 1`` levels of ``convs_per_block`` 3x3 "same" convolutions (conv -> norm -> activation ->
dropout), max-pooling 2x2 between encoder levels, 2x2 stride-2 transposed convolutions (or bilinear upsampling + 1x1
conv) in the decoder, skip connections by concatenation, and a 1x1 convolution to ``out_channels`` with a *linear*
output (the meta-architecture applies softmax / sigmoid, so losses can use the numerically stable logit forms).

Any input size works: :meth:`UNet.forward` pads the input to a multiple of ``2 ** depth`` (reflection) and crops
the output back, so a caller never has to think about divisibility.

Build it from code (``UNet(in_channels=3, out_channels=1, depth=5, dropout=0.1)``), from a config node with the keys
of ``MODEL.UNET`` (:func:`build_unet`), or as a Detectron2 backbone (``MODEL.BACKBONE.NAME: build_unet_backbone``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

__all__ = ["ACTIVATIONS", "INITS", "NORMS", "UNet", "UNetBackbone", "build_unet", "build_unet_backbone",
           "unet_kwargs_from_node"]

ACTIVATIONS = ("relu", "selu", "elu", "leaky_relu", "gelu")
NORMS = ("", "none", "BN", "GN", "IN", "SyncBN")
INITS = ("default", "glorot_uniform", "he_normal", "lecun_normal")
DROPOUT_TYPES = ("standard", "alpha")
DROPOUT_PLACES = ("conv", "block")
UPSAMPLES = ("transpose", "bilinear")


def _activation(name: str) -> nn.Module:
    name = name.lower()
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "selu":
        return nn.SELU(inplace=True)
    if name == "elu":
        return nn.ELU(inplace=True)
    if name == "leaky_relu":
        return nn.LeakyReLU(0.01, inplace=True)
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown U-Net activation {name!r}; use one of {ACTIVATIONS}")


def _norm(name: str, channels: int) -> nn.Module | None:
    if name in ("", "none"):
        return None
    if name == "BN":
        return nn.BatchNorm2d(channels)
    if name == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if name == "IN":
        return nn.InstanceNorm2d(channels, affine=True)
    if name == "GN":
        # Up to 32 groups (Wu & He 2018), but a divisor of the channel count so narrow test networks work too.
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"unknown U-Net normalisation {name!r}; use one of {NORMS}")


def _dropout(p: float, kind: str) -> nn.Module | None:
    if p <= 0:
        return None
    if kind == "standard":
        return nn.Dropout(p)
    if kind == "alpha":  # keeps SELU's self-normalising mean/variance (Klambauer et al. 2017)
        return nn.AlphaDropout(p)
    raise ValueError(f"unknown dropout type {kind!r}; use one of {DROPOUT_TYPES}")


class _ConvBlock(nn.Sequential):
    """``n`` x [3x3 conv ("same") -> norm -> activation -> dropout]; with ``dropout_at="block"`` the dropout sits
    once between the first and the second convolution instead (the Keras U-Net of the 2018 Data Science Bowl)."""

    def __init__(self, in_ch: int, out_ch: int, *, n: int, kernel_size: int, activation: str, norm: str,
                 dropout: float, dropout_type: str, dropout_at: str):
        layers: list[nn.Module] = []
        for i in range(n):
            nm = _norm(norm, out_ch)
            layers.append(nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, kernel_size, padding=kernel_size // 2,
                                    bias=nm is None))
            if nm is not None:
                layers.append(nm)
            layers.append(_activation(activation))
            if dropout_at == "conv" or (dropout_at == "block" and i == 0 and n > 1):
                dp = _dropout(dropout, dropout_type)
                if dp is not None:
                    layers.append(dp)
        super().__init__(*layers)


class UNet(nn.Module):
    """U-Net with configurable depth, widths, activation, normalisation, dropout, initialisation and upsampling.

    ``forward(x)`` maps ``B x in_channels x H x W`` to ``B x out_channels x H x W`` logits (linear output) for any
    ``H, W``; with ``out_channels == 0`` it returns the last decoder features (``B x widths[0] x H x W``).
    """

    @configurable
    def __init__(self, *, in_channels: int = 3, out_channels: int = 1, depth: int = 4, base_channels: int = 64,
                 channels: Sequence[int] = (), convs_per_block: int = 2, kernel_size: int = 3,
                 activation: str = "relu", norm: str = "", dropout: float = 0.0, dropout_type: str = "standard",
                 dropout_at: str = "conv", init: str = "he_normal", upsample: str = "transpose",
                 pad_mode: str = "reflect"):
        """
        Args:
            in_channels: input channels (3 for RGB, more with extra channels).
            out_channels: output channels of the final 1x1 convolution (0 = no head: return features).
            depth: number of max-pooling steps (= transposed convolutions); the net has ``depth + 1`` levels.
            base_channels: width of the first level; level ``i`` has ``base_channels * 2**i`` unless ``channels``.
            channels: explicit widths of the ``depth + 1`` levels (overrides ``base_channels``).
            convs_per_block: convolutions per level (2 in the original U-Net).
            kernel_size: odd convolution size ("same" padding).
            activation: one of :data:`ACTIVATIONS`.
            norm: "" (none), "BN", "SyncBN", "GN" (groups = gcd(32, width)) or "IN".
            dropout: dropout probability (0 = none).
            dropout_type: "standard" (``nn.Dropout``) or "alpha" (``nn.AlphaDropout``, for SELU).
            dropout_at: "conv" (after every convolution) or "block" (once per level, between its first two convs).
            init: "default" (PyTorch's), "glorot_uniform" (Xavier uniform), "he_normal" (Kaiming normal, fan-in) or
                "lecun_normal" (the init SELU assumes); biases start at 0 except with "default".
            upsample: "transpose" (2x2 stride-2 transposed convolution) or "bilinear" (+ 1x1 convolution).
            pad_mode: how inputs are padded to a multiple of ``2 ** depth``: "reflect", "replicate" or "constant".
        """
        super().__init__()
        if depth < 0:
            raise ValueError(f"U-Net depth must be >= 0, got {depth}")
        widths = list(channels) if channels else [int(base_channels) * 2 ** i for i in range(depth + 1)]
        if len(widths) != depth + 1:
            raise ValueError(f"U-Net channels must list depth + 1 = {depth + 1} widths, got {widths}")
        if any(int(w) <= 0 for w in widths):
            raise ValueError(f"U-Net widths must be positive, got {widths}")
        if kernel_size % 2 != 1:
            raise ValueError(f"U-Net kernel_size must be odd for 'same' padding, got {kernel_size}")
        if convs_per_block < 1:
            raise ValueError(f"U-Net convs_per_block must be >= 1, got {convs_per_block}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"U-Net dropout must be in [0, 1), got {dropout}")
        _activation(activation)
        _norm(norm, 8)
        for value, allowed, what in ((dropout_type, DROPOUT_TYPES, "dropout_type"), (dropout_at, DROPOUT_PLACES,
                                     "dropout_at"), (init, INITS, "init"), (upsample, UPSAMPLES, "upsample"),
                                     (pad_mode, ("reflect", "replicate", "constant"), "pad_mode")):
            if value not in allowed:
                raise ValueError(f"unknown U-Net {what} {value!r}; use one of {allowed}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.depth = int(depth)
        self.widths = [int(w) for w in widths]
        self.pad_mode = pad_mode
        block = dict(n=convs_per_block, kernel_size=kernel_size, activation=activation, norm=norm, dropout=dropout,
                     dropout_type=dropout_type, dropout_at=dropout_at)
        self.encoder = nn.ModuleList()
        prev = self.in_channels
        for w in self.widths:
            self.encoder.append(_ConvBlock(prev, w, **block))
            prev = w
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in range(self.depth - 1, -1, -1):
            hi, lo = self.widths[i + 1], self.widths[i]
            if upsample == "transpose":
                self.up.append(nn.ConvTranspose2d(hi, lo, kernel_size=2, stride=2))
            else:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                             nn.Conv2d(hi, lo, kernel_size=1)))
            self.decoder.append(_ConvBlock(2 * lo, lo, **block))
        self.head = nn.Conv2d(self.widths[0], self.out_channels, kernel_size=1) if self.out_channels > 0 else None
        self._init_weights(init)

    @classmethod
    def from_config(cls, cfg: CfgNode, in_channels: int | None = None, out_channels: int = 1,
                    node: CfgNode | None = None) -> dict[str, Any]:
        """Keyword arguments from ``node`` (default ``cfg.MODEL.UNET``); ``in_channels`` defaults to the number of
        ``MODEL.PIXEL_MEAN`` entries (3 + extra input channels)."""
        node = cfg.MODEL.UNET if node is None else node
        if in_channels is None:
            in_channels = len(cfg.MODEL.PIXEL_MEAN)
        return unet_kwargs_from_node(node, in_channels=in_channels, out_channels=out_channels)

    def _init_weights(self, init: str) -> None:
        if init == "default":
            return
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                if init == "glorot_uniform":
                    nn.init.xavier_uniform_(m.weight)
                elif init == "he_normal":
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                elif init == "lecun_normal":
                    # ConvTranspose2d stores (in, out, k, k); its fan-in is out * k * k as PyTorch computes it.
                    fan_in = nn.init._calculate_fan_in_and_fan_out(m.weight)[0]
                    nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(fan_in))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def size_divisibility(self) -> int:
        """Inputs whose sides are multiples of this need no internal padding."""
        return 2 ** self.depth

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last decoder features for an input whose sides are multiples of :attr:`size_divisibility`."""
        skips = []
        for i, enc in enumerate(self.encoder):
            x = enc(x)
            if i < self.depth:
                skips.append(x)
                x = self.pool(x)
        for up, dec in zip(self.up, self.decoder):
            x = up(x)
            x = dec(torch.cat([skips.pop(), x], dim=1))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"U-Net expects B x {self.in_channels} x H x W input, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        d = self.size_divisibility
        ph, pw = (-h) % d, (-w) % d
        if ph or pw:
            # Reflection needs the pad to be smaller than the side; fall back to replication for tiny inputs.
            mode = self.pad_mode if not (self.pad_mode == "reflect" and (ph >= h or pw >= w)) else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        y = self.features(x)
        if self.head is not None:
            y = self.head(y)
        return y[..., :h, :w] if (ph or pw) else y


def unet_kwargs_from_node(node: CfgNode, in_channels: int, out_channels: int) -> dict[str, Any]:
    """:class:`UNet` keyword arguments from a config node with the keys of ``MODEL.UNET``."""
    return {
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "depth": int(node.DEPTH),
        "base_channels": int(node.BASE_CHANNELS),
        "channels": [int(c) for c in node.CHANNELS],
        "convs_per_block": int(node.CONVS_PER_BLOCK),
        "kernel_size": int(node.KERNEL_SIZE),
        "activation": str(node.ACTIVATION),
        "norm": str(node.NORM),
        "dropout": float(node.DROPOUT),
        "dropout_type": str(node.DROPOUT_TYPE),
        "dropout_at": str(node.DROPOUT_AT),
        "init": str(node.INIT),
        "upsample": str(node.UPSAMPLE),
        "pad_mode": str(node.PAD_MODE),
    }


def build_unet(node: CfgNode, in_channels: int = 3, out_channels: int = 1) -> UNet:
    """A :class:`UNet` from a config node with the keys of ``MODEL.UNET`` (see ``nuclei_d2/config.py``).

    Other methods keep their own node with the same keys, e.g. the Mask R-CNN+ distance U-Net (five poolings, five
    transposed convolutions, dropout 0.1, ReLU, linear output)::

        node = cfg.MODEL.UNET.clone(); node.DEPTH = 5; node.DROPOUT = 0.1
        net = build_unet(node, in_channels=3, out_channels=1)
    """
    return UNet(**unet_kwargs_from_node(node, in_channels, out_channels))


class UNetBackbone(Backbone):
    """The U-Net as a Detectron2 backbone: one full-resolution feature map ``"unet"`` (stride 1)."""

    def __init__(self, unet: UNet, out_feature: str = "unet"):
        super().__init__()
        if unet.head is not None:
            raise ValueError("UNetBackbone wants a U-Net built with out_channels=0 (features, no head)")
        self.unet = unet
        self._out_feature = out_feature
        self._out_features = [out_feature]
        self._out_feature_channels = {out_feature: unet.widths[0]}
        self._out_feature_strides = {out_feature: 1}

    @property
    def size_divisibility(self) -> int:
        return self.unet.size_divisibility

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self._out_feature: self.unet(x)}

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {self._out_feature: ShapeSpec(channels=self.unet.widths[0], stride=1)}


@BACKBONE_REGISTRY.register()
def build_unet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> UNetBackbone:
    """``MODEL.BACKBONE.NAME: build_unet_backbone``: a head-less :class:`UNet` from ``MODEL.UNET``."""
    return UNetBackbone(UNet(cfg, in_channels=input_shape.channels, out_channels=0))
