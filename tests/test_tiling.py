"""Overlapped-tile inference: window placement, exactness for position-free models, no seams with the weighted vote."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nuclei_d2.layers.tiling import (
    TilingParams,
    edge_weight_map,
    patch_weight,
    tile_positions,
    tile_predict,
    tile_windows,
)


@pytest.mark.parametrize("length, patch, stride, expected", [
    (10, 4, 2, [0, 2, 4, 6]),
    (10, 4, 3, [0, 3, 6]),
    (11, 4, 3, [0, 3, 6, 7]),  # the last window is moved back to end at the image's end
    (8, 4, 4, [0, 4]),
    (9, 4, 4, [0, 4, 5]),
    (3, 4, 2, [0]),  # shorter than the patch: one window, the whole side
    (4, 4, 1, [0]),
])
def test_tile_positions(length, patch, stride, expected):
    assert tile_positions(length, patch, stride) == expected


def test_tile_windows_and_bad_arguments():
    assert tile_windows(3, 10, 4, 3) == [(0, 0, 3, 4), (0, 3, 3, 4), (0, 6, 3, 4)]
    with pytest.raises(ValueError, match="stride 5 > patch 4"):
        tile_positions(10, 4, 5)
    with pytest.raises(ValueError, match="positive"):
        tile_positions(10, 0, 1)


def pointwise(batch: torch.Tensor) -> torch.Tensor:
    """A position-free model: each output pixel depends on its own input pixel only."""
    return torch.cat([torch.sigmoid(batch[:, :1] * 0.1 - 1.0), batch[:, 1:2] ** 2 / 100.0], dim=1)


@pytest.mark.parametrize("shape", [(64, 64), (100, 77), (20, 150), (10, 12)])
@pytest.mark.parametrize("weight", ["edge", "uniform"])
@pytest.mark.parametrize("stride", [8, 16, 32])
def test_position_free_model_tiled_equals_whole_image(shape, weight, stride):
    torch.manual_seed(0)
    image = torch.rand(3, *shape) * 255
    whole = pointwise(image[None])[0]
    tiled = tile_predict(pointwise, image, patch=32, stride=stride, weight=weight, batch_size=3)
    assert tiled.shape == (2, *shape) and tiled.dtype == torch.float32
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)


def test_constant_model_gives_a_constant_map():
    image = torch.zeros(3, 90, 70)
    out = tile_predict(lambda b: torch.full((b.shape[0], 1, *b.shape[-2:]), 0.25), image, 32, 16)
    torch.testing.assert_close(out, torch.full((1, 90, 70), 0.25))


def border_error_model(batch: torch.Tensor) -> torch.Tensor:
    """Truth (the image) plus an error that grows towards the patch border, as for a real FCN with less context
    there: 1 at the border, fading linearly to 0 over 8 px (so the model itself changes by at most 1/8 per px)."""
    _, _, h, w = batch.shape
    y = torch.arange(h, dtype=torch.float32)[:, None] + 0.5
    x = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
    de = torch.minimum(torch.minimum(x, w - x), torch.minimum(y, h - y))
    return batch[:, :1] + torch.clamp(1 - de / 8.0, min=0)


def max_jump(m: torch.Tensor) -> float:
    return float(max((m[1:] - m[:-1]).abs().max(), (m[:, 1:] - m[:, :-1]).abs().max()))


def test_weighted_vote_has_no_seams_where_plain_averaging_has():
    image = torch.ones(1, 100, 130)
    weighted = tile_predict(border_error_model, image, patch=32, stride=16, weight="edge")[0]
    uniform = tile_predict(border_error_model, image, patch=32, stride=16, weight="uniform")[0]
    # A seam is a jump larger than the model's own pixel-to-pixel change (1/8): plain averaging has them where a
    # window starts or ends, the edge-weighted vote has none.
    assert max_jump(uniform) > 0.4
    assert max_jump(weighted) <= 1 / 8 + 1e-4
    # ... and the assembled map is closer to the truth: border predictions count less.
    assert (weighted - 1).abs().mean() < 0.7 * (uniform - 1).abs().mean()


def test_weight_map_is_the_nb_papers_and_explicit_weights_work():
    w = patch_weight((32, 24), "edge")
    np.testing.assert_allclose(w.numpy(), edge_weight_map((32, 24)))
    assert w.min() > 0 and float(w.mean()) == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(patch_weight((4, 4), "uniform"), torch.ones(4, 4))
    image = torch.rand(3, 50, 40) * 255
    custom = np.random.default_rng(0).uniform(0.5, 2.0, (16, 16))
    torch.testing.assert_close(tile_predict(pointwise, image, 16, 8, weight=custom), pointwise(image[None])[0],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="must be > 0"):
        patch_weight((2, 2), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="shape"):
        patch_weight((2, 2), np.ones((3, 3)))
    with pytest.raises(ValueError, match="unknown tile weight"):
        patch_weight((2, 2), "gaussian")


def test_edge_weight_of_a_2x4_patch_by_hand():
    """Pixel centres x = 0.5..3.5, y = 0.5, 1.5: De = 0.5 everywhere; Dc = sqrt(1.5^2 + 0.5^2) at the ends and
    sqrt(0.5^2 + 0.5^2) inside; W = alpha * De / (Dc + De) with alpha making the mean 1."""
    end = 0.5 / (0.5 + np.sqrt(2.5))
    mid = 0.5 / (0.5 + np.sqrt(0.5))
    alpha = 1.0 / ((end + mid) / 2)
    expected = alpha * np.array([[end, mid, mid, end]] * 2)
    np.testing.assert_allclose(patch_weight((2, 4), "edge").numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(expected[0], [0.7342, 1.2658, 1.2658, 0.7342], atol=1e-4)


def test_batches_bound_the_model_input():
    calls = []

    def fn(batch):
        calls.append(tuple(batch.shape))
        return batch[:, :1]

    tile_predict(fn, torch.zeros(3, 100, 100), patch=32, stride=16, batch_size=5)
    n_windows = len(tile_positions(100, 32, 16)) ** 2  # 6 x 6
    assert sum(c[0] for c in calls) == n_windows == 36
    assert max(c[0] for c in calls) == 5 and len(calls) == 8
    assert all(c[1:] == (3, 32, 32) for c in calls)


def test_numpy_input_and_wrong_model_output():
    image = np.random.default_rng(0).uniform(0, 255, (40, 30, 3)).astype(np.float32)
    out = tile_predict(pointwise, image, 16, 8)
    torch.testing.assert_close(out, pointwise(torch.from_numpy(image.transpose(2, 0, 1))[None])[0], rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError, match="fn returned shape"):
        tile_predict(lambda b: b[:, :1, :-1], image, 16, 8)
    with pytest.raises(ValueError, match="C x H x W"):
        tile_predict(pointwise, torch.zeros(10, 10), 16, 8)


def test_tiling_params():
    assert TilingParams(patch=64, stride=32).applies_to(65, 10)
    assert not TilingParams(patch=64, stride=32).applies_to(64, 64)
    assert not TilingParams(enabled=False, patch=64, stride=32).applies_to(1000, 1000)
    with pytest.raises(ValueError, match="STRIDE"):
        TilingParams(patch=64, stride=65)
    with pytest.raises(ValueError, match="WEIGHT"):
        TilingParams(weight="cosine")
