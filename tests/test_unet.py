"""The configurable U-Net: shapes for any input size, the papers' variants, config/registry construction, errors."""

from __future__ import annotations

import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone
from torch import nn

from nuclei_d2 import add_nuclei_config
from nuclei_d2.modeling.unet import UNet, UNetBackbone, build_unet


def _count(net: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in net.modules())


@pytest.mark.parametrize("shape", [(64, 64), (37, 50), (5, 3), (1, 1)])
def test_any_input_size_gives_the_same_output_size(shape):
    net = UNet(in_channels=4, out_channels=3, depth=3, base_channels=4).eval()
    x = torch.randn(2, 4, *shape)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 3, *shape)


def test_padding_does_not_change_a_divisible_input():
    """Cropping back after padding: the top-left part of a padded prediction is what forward() returns."""
    torch.manual_seed(0)
    net = UNet(in_channels=3, out_channels=2, depth=2, base_channels=4).eval()
    x = torch.randn(1, 3, 30, 22)  # padded internally to 32 x 24 by reflection
    padded = torch.nn.functional.pad(x, (0, 2, 0, 2), mode="reflect")
    with torch.no_grad():
        assert torch.allclose(net(x), net.head(net.features(padded))[..., :30, :22], atol=1e-6)


def test_nb_variant_selu_no_norm_dropout_after_each_conv_glorot():
    """Cui et al.'s NB network: SELU, no normalisation, dropout 0.2 after each conv, Glorot-uniform, 3 classes."""
    torch.manual_seed(0)
    net = UNet(in_channels=3, out_channels=3, depth=4, base_channels=16, activation="selu", norm="", dropout=0.2,
               dropout_at="conv", init="glorot_uniform")
    n_block_convs = 2 * (4 + 1) + 2 * 4  # encoder levels + decoder levels, 2 convs each
    assert _count(net, nn.Conv2d) == n_block_convs + 1  # + the 1x1 head
    assert _count(net, nn.SELU) == n_block_convs and _count(net, nn.ReLU) == 0
    drops = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == n_block_convs and all(d.p == 0.2 for d in drops)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)) for m in net.modules())
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(m.weight)
            bound = math.sqrt(6.0 / (fan_in + fan_out))  # Glorot uniform: U(-bound, bound)
            assert m.weight.abs().max() <= bound + 1e-6
            assert m.weight.abs().max() > 0.8 * bound
            assert torch.count_nonzero(m.bias) == 0
    assert all(m.kernel_size == (3, 3) and m.padding == (1, 1) for m in net.modules()
               if isinstance(m, nn.Conv2d) and m is not net.head)
    assert net.head.out_channels == 3


def test_mask_rcnn_plus_distance_unet_variant():
    """Five max-pooling levels, five transposed convolutions, dropout 0.1, ReLU, linear output (issue 5)."""
    node = add_nuclei_config(get_cfg()).MODEL.UNET.clone()
    node.DEPTH, node.DROPOUT, node.ACTIVATION, node.BASE_CHANNELS = 5, 0.1, "relu", 4
    net = build_unet(node, in_channels=3, out_channels=1)
    assert net.depth == 5 and net.size_divisibility == 32
    assert _count(net, nn.ConvTranspose2d) == 5
    assert len(net.encoder) == 6  # 5 poolings between 6 levels
    assert all(d.p == 0.1 for d in net.modules() if isinstance(d, nn.Dropout))
    assert _count(net, nn.ReLU) > 0 and _count(net, nn.Sigmoid) == 0
    # Linear output: the last module run is the 1x1 head, so outputs are unbounded and scale with its weights.
    net.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y1 = net(x)
        net.head.weight.mul_(10.0)
        net.head.bias.mul_(10.0)
        assert torch.allclose(net(x), 10.0 * y1, atol=1e-4)


def test_block_dropout_sits_between_the_two_convs():
    net = UNet(in_channels=3, out_channels=1, depth=1, base_channels=4, dropout=0.1, dropout_at="block")
    block = list(net.encoder[0])
    kinds = [type(m).__name__ for m in block]
    assert kinds == ["Conv2d", "ReLU", "Dropout", "Conv2d", "ReLU"]


def test_explicit_widths_norms_and_bilinear_upsampling():
    net = UNet(in_channels=5, out_channels=2, depth=2, channels=[6, 12, 20], norm="GN", upsample="bilinear")
    assert net.widths == [6, 12, 20]
    assert _count(net, nn.GroupNorm) == 2 * 3 + 2 * 2 and _count(net, nn.ConvTranspose2d) == 0
    gn = next(m for m in net.modules() if isinstance(m, nn.GroupNorm))
    assert gn.num_groups == math.gcd(32, gn.num_channels)
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 5, 20, 20)).shape == (1, 2, 20, 20)
    assert _count(UNet(depth=1, base_channels=4, norm="BN"), nn.BatchNorm2d) == 2 * 2 + 2


def test_features_without_head_and_backbone_registry():
    cfg = add_nuclei_config(get_cfg())
    cfg.MODEL.UNET.DEPTH, cfg.MODEL.UNET.BASE_CHANNELS = 2, 4
    cfg.MODEL.BACKBONE.NAME = "build_unet_backbone"
    assert "build_unet_backbone" in BACKBONE_REGISTRY
    bb = build_backbone(cfg, ShapeSpec(channels=3))
    assert isinstance(bb, UNetBackbone) and bb.size_divisibility == 4
    assert bb.output_shape()["unet"].channels == 4 and bb.output_shape()["unet"].stride == 1
    out = bb(torch.randn(1, 3, 16, 12))
    assert set(out) == {"unet"} and out["unet"].shape == (1, 4, 16, 12)


def test_from_config_reads_model_unet_and_pixel_mean():
    cfg = add_nuclei_config(get_cfg())
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [0.0] * 4, [1.0] * 4
    cfg.MODEL.UNET.DEPTH, cfg.MODEL.UNET.BASE_CHANNELS, cfg.MODEL.UNET.ACTIVATION = 3, 8, "elu"
    net = UNet(cfg, out_channels=2)
    assert net.in_channels == 4 and net.out_channels == 2 and net.widths == [8, 16, 32, 64]
    assert _count(net, nn.ELU) > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"depth": 2, "channels": [4, 8]}, "depth \\+ 1 = 3 widths"),
    ({"activation": "swish"}, "unknown U-Net activation 'swish'"),
    ({"norm": "LN"}, "unknown U-Net normalisation 'LN'"),
    ({"init": "orthogonal"}, "unknown U-Net init"),
    ({"kernel_size": 4}, "must be odd"),
    ({"dropout": 1.0}, "dropout must be in"),
    ({"dropout_at": "layer"}, "unknown U-Net dropout_at"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(**{"base_channels": 4, "depth": 2, **kwargs})


def test_wrong_input_channels_is_a_clear_error():
    with pytest.raises(ValueError, match="expects B x 3 x H x W"):
        UNet(depth=1, base_channels=4)(torch.zeros(1, 4, 8, 8))


def test_learns_a_simple_mapping():
    """A few Adam steps fit 'foreground = bright pixel' on a fixed batch (the net trains, gradients flow)."""
    torch.manual_seed(0)
    net = UNet(in_channels=1, out_channels=1, depth=2, base_channels=4)
    x = torch.rand(2, 1, 16, 16)
    y = (x > 0.5).float()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = nn.functional.binary_cross_entropy_with_logits(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
