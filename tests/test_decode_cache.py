"""DecodeCache (byte-bounded LRU of decoded tiles) and the mapper's use of it in training."""

from __future__ import annotations

import os

import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from PIL import Image

from nuclei_d2.config import add_nuclei_config
from nuclei_d2.data.decode_cache import DecodeCache
from nuclei_d2.data.mapper import NucleiDatasetMapper
from nuclei_d2.structures import label_map_to_annotations


def test_lru_eviction_is_bounded_by_bytes():
    cache = DecodeCache(max_bytes=300)
    a, b, c = (np.full(100, i, np.uint8) for i in range(3))
    cache.put("a", (a,))
    cache.put("b", (b, None))
    cache.put("c", (c,))
    assert len(cache) == 3 and cache.nbytes == 300
    assert cache.get("a") is not None  # "a" is now the most recent; "b" the least
    cache.put("d", (np.zeros(100, np.uint8),))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.nbytes == 300 and (cache.hits, cache.misses) == (3, 1)
    cache.put("big", (np.zeros(301, np.uint8),))  # larger than the whole budget: not stored, nothing evicted
    assert cache.get("big") is None and len(cache) == 3
    cache.put("a", (np.zeros(50, np.uint8),))  # replacing an entry updates the byte count
    assert cache.nbytes == 250


def test_cache_hands_out_and_keeps_copies():
    cache = DecodeCache(max_bytes=1000)
    arr = np.arange(10)
    cache.put("k", (arr, None))
    arr[:] = -1  # the caller's array changes after put
    got, none = cache.get("k")
    assert none is None and got.tolist() == list(range(10))
    got[:] = 7  # and what get returned is the caller's to modify
    assert cache.get("k")[0].tolist() == list(range(10))


def test_negative_budget_is_an_error():
    with pytest.raises(ValueError, match=">= 0"):
        DecodeCache(-1)
    with pytest.raises(ValueError, match="DECODE_CACHE_MB"):
        NucleiDatasetMapper(True, augmentations=[], decode_cache_mb=-1)


class _ZeroInPlace(T.Transform):
    """Writes into the array it is given (as some user augmentations do) and returns it."""

    def apply_image(self, img):
        img[...] = 0
        return img

    def apply_segmentation(self, seg):
        seg[...] = 0
        return seg

    def apply_coords(self, coords):
        return coords


@pytest.fixture
def tile(tmp_path):
    rng = np.random.default_rng(0)
    label = np.zeros((64, 64), np.int32)
    for k, (y, x) in enumerate([(5, 5), (30, 8), (10, 40), (45, 45)], start=1):
        label[y:y + 12, x:x + 10] = k
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / "tile.png"
    Image.fromarray(image).save(path)
    d = {"file_name": str(path), "height": 64, "width": 64, "image_id": 3,
         "annotations": label_map_to_annotations(label)}
    return d, image, label


def test_cached_mapper_gives_the_same_samples_and_skips_the_decode(tile):
    d, image, label = tile
    augs = [T.RandomCrop("absolute", (32, 32)), T.RandomFlip(0.5, horizontal=True, vertical=False)]
    plain = NucleiDatasetMapper(True, augmentations=augs, filter_empty=False)
    cached = NucleiDatasetMapper(True, augmentations=augs, filter_empty=False, decode_cache_mb=1)
    for seed in range(5):
        np.random.seed(seed)  # noqa: NPY002  (Detectron2 augmentations draw from the global RNG)
        a = plain(d)
        np.random.seed(seed)  # noqa: NPY002  (Detectron2 augmentations draw from the global RNG)
        b = cached(d)
        np.testing.assert_array_equal(a["image"].numpy(), b["image"].numpy())
        np.testing.assert_array_equal(a["label_map"].numpy(), b["label_map"].numpy())
        assert len(a["instances"]) == len(b["instances"])
    assert (cached.cache.hits, cached.cache.misses) == (4, 1)
    assert len(d["annotations"]) == 4  # the caller's dict keeps its annotations (shallow copy in training)
    # With the file gone, the cached mapper still serves the tile; the uncached one cannot.
    os.remove(d["file_name"])
    assert cached(d)["image"].shape == (3, 32, 32)
    with pytest.raises(Exception, match="tile.png"):
        plain(d)


def test_augmentations_writing_in_place_do_not_corrupt_the_cache(tile):
    d, image, label = tile
    mapper = NucleiDatasetMapper(True, augmentations=[_ZeroInPlace()], filter_empty=False, decode_cache_mb=1)
    assert mapper(d)["image"].abs().sum() == 0  # the transform zeroed its (copied) input
    mapper.augmentations = T.AugmentationList([])
    out = mapper(d)  # served from the cache: the original pixels and labels
    assert mapper.cache.hits == 1
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), image)
    np.testing.assert_array_equal(out["label_map"].numpy(), label)


def test_cache_is_on_in_training_and_off_at_inference():
    cfg = get_cfg()
    add_nuclei_config(cfg)
    cfg.INPUT.NUCLEI.DECODE_CACHE_MB = 64.0
    assert NucleiDatasetMapper(cfg, is_train=True).cache.max_bytes == 64 * 2**20
    assert NucleiDatasetMapper(cfg, is_train=False).cache is None
    cfg.INPUT.NUCLEI.DECODE_CACHE_MB = 0.0
    assert NucleiDatasetMapper(cfg, is_train=True).cache is None
