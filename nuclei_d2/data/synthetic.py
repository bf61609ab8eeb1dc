"""Synthetic H&E-like tiles with instance labels: the embedded default dataset for the demo and the tests.

**These images are synthetic.** They imitate what matters to a nuclei segmenter (stain colours, touching and
overlapping nuclei, varied sizes and shapes, chromatin texture, a textured eosin background) so that every model can
be trained, evaluated and demonstrated with no download. Numbers measured on them say nothing about real tissue;
use the real datasets (``datasets/README.md``) for that.

How a tile is made: nuclei are random ellipses (some in touching clusters, some overlapping: the later one occludes
the earlier, so labels never overlap), painted as haematoxylin and eosin *concentration* maps that are turned into RGB
by Beer-Lambert absorption with Ruifrok & Johnston's stain vectors. Colour deconvolution therefore recovers the
haematoxylin channel as it would on a real slide.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ..layers.morphology import keep_largest_pieces
from ..structures import label_map_to_annotations
from ..utils.io import write_label_map

__all__ = ["SyntheticSpec", "make_synthetic_tile", "register_synthetic_datasets", "synthetic_root"]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
# Optical densities per unit concentration (Ruifrok & Johnston 2001, H&E), rows: haematoxylin, eosin.
_STAIN_OD = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]], dtype=np.float32)
SPLITS = {"train": 0, "test": 1}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return n / (n.std() + 1e-6)


def make_synthetic_tile(size: int | tuple[int, int], rng: np.random.Generator | int,
                        density: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic H&E-like tile and its instance label map.

    Args:
        size: tile side (or (height, width)) in pixels.
        rng: numpy Generator or seed.
        density: scales the number of nuclei (1.0 ~ one nucleus per 1,300 px^2, like MoNuSeg's crowded tiles).

    Returns:
        (image H x W x 3 uint8 RGB, label H x W int32 with nuclei 1..N, no overlaps, 0 = background).
    """
    rng = np.random.default_rng(rng)
    h, w = (size, size) if isinstance(size, int) else size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    label = np.zeros((h, w), dtype=np.int32)
    hema = np.zeros((h, w), dtype=np.float32)

    n_target = max(1, int(density * h * w / 1300))
    centres: list[tuple[float, float, float]] = []
    while len(centres) < n_target:
        if centres and rng.random() < 0.35:  # grow a cluster: a neighbour touching an existing nucleus
            cy, cx, r = centres[rng.integers(len(centres))]
            ang = rng.uniform(0, 2 * np.pi)
            r2 = rng.uniform(4, 11)
            d = (r + r2) * rng.uniform(0.75, 1.0)  # < r + r2: touching or slightly overlapping
            centres.append((cy + d * np.sin(ang), cx + d * np.cos(ang), r2))
        else:
            centres.append((rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, 13)))

    next_id = 1
    for cy, cx, r in centres:
        a = r * rng.uniform(1.0, 1.6)  # semi-axes: elongated nuclei
        b = r * rng.uniform(0.7, 1.0)
        theta = rng.uniform(0, np.pi)
        y0, y1 = int(max(0, cy - a - 2)), int(min(h, cy + a + 3))
        x0, x1 = int(max(0, cx - a - 2)), int(min(w, cx + a + 3))
        if y1 <= y0 or x1 <= x0:
            continue
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        # Wobbly boundary: radius modulated by a low-order angular term.
        phi = np.arctan2(v, u)
        wobble = 1 + 0.08 * np.sin(3 * phi + rng.uniform(0, 6.3)) + 0.05 * np.sin(5 * phi + rng.uniform(0, 6.3))
        inside = (u / a) ** 2 + (v / b) ** 2 <= wobble**2
        if inside.sum() < 12:
            continue
        label[y0:y1, x0:x1][inside] = next_id  # later nuclei occlude earlier ones
        darkness = rng.uniform(0.8, 1.6)
        hema[y0:y1, x0:x1][inside] = darkness
        next_id += 1

    # Drop nuclei that occlusion left tiny or split in pieces (keep the largest piece), then number 1..N.
    label = keep_largest_pieces(label, min_size=12)

    # Chromatin texture, darker rims, a faint halo; eosin stroma with fibres; everything blurred like optics do.
    texture = 1 + 0.25 * _smooth_noise(rng, (h, w), 1.0)
    edge = (ndimage.grey_erosion(label, size=3) != label) & (label > 0)
    hema = hema * texture + 0.25 * edge
    hema = np.where(label > 0, hema, 0.0) + 0.08 * np.clip(_smooth_noise(rng, (h, w), 6.0), 0, None)
    fibres = np.abs(np.sin(xx * 0.08 + 3 * _smooth_noise(rng, (h, w), 12.0)))
    eosin = 0.45 + 0.30 * fibres + 0.12 * _smooth_noise(rng, (h, w), 4.0)
    empty = _smooth_noise(rng, (h, w), 25.0) > 1.5  # lumen / white space
    eosin = np.where(empty & (label == 0), 0.03, eosin)
    eosin = np.where(label > 0, 0.6 * eosin, eosin)
    conc = np.stack([np.clip(hema, 0, None), np.clip(eosin, 0, None)], axis=-1)
    od = conc @ _STAIN_OD
    od = ndimage.gaussian_filter(od, sigma=(0.8, 0.8, 0))
    rgb = 255.0 * np.exp(-od * rng.uniform(0.9, 1.1))
    rgb += rng.normal(0, 3.0, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8), label


class SyntheticSpec(dict):
    """Parameters of the synthetic dataset (what decides its files): image size, counts, seed."""

    def __init__(self, image_size: int = 256, num_train: int = 8, num_test: int = 2, seed: int = 0,
                 root: str | os.PathLike | None = None):
        super().__init__(image_size=int(image_size), num_train=int(num_train), num_test=int(num_test),
                         seed=int(seed), version=GENERATOR_VERSION)
        self._root = Path(root) if root else None

    @property
    def root(self) -> Path:
        return self._root or synthetic_root()

    @classmethod
    def from_config(cls, cfg) -> SyntheticSpec:
        s = cfg.DATASETS.SYNTHETIC
        return cls(s.IMAGE_SIZE, s.NUM_TRAIN, s.NUM_TEST, s.SEED, s.ROOT or None)

    @property
    def folder(self) -> Path:
        key = hashlib.sha256(json.dumps(dict(self), sort_keys=True).encode()).hexdigest()[:10]
        return self.root / f"v{GENERATOR_VERSION}-{self['image_size']}px-seed{self['seed']}-{key}"


def synthetic_root() -> Path:
    """``synthetic`` under the datasets root (:func:`~nuclei_d2.data.datasets.builtin.datasets_root`:
    ``$NUCLEI_D2_DATASETS``, default ``./datasets``)."""
    from .datasets.builtin import datasets_root

    return datasets_root() / "synthetic"


def _generate(spec: SyntheticSpec) -> Path:
    """Write the tiles of ``spec`` once (atomically, as a whole folder) and return the folder."""
    final = spec.folder
    if (final / "done.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        from PIL import Image

        for split, split_seed in SPLITS.items():
            n = spec[f"num_{split}"]
            (tmp / split / "images").mkdir(parents=True)
            (tmp / split / "labels").mkdir(parents=True)
            for i in range(n):
                rng = np.random.default_rng([spec["seed"], split_seed, i])
                image, label = make_synthetic_tile(spec["image_size"], rng)
                Image.fromarray(image).save(tmp / split / "images" / f"synth_{split}_{i:03d}.png")
                write_label_map(tmp / split / "labels" / f"synth_{split}_{i:03d}.png", label)
        (tmp / "done.json").write_text(json.dumps(dict(spec), indent=1))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: use its copy
            if not (final / "done.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"Synthetic nuclei tiles written to {final}")
    return final


def load_synthetic(spec: SyntheticSpec, split: str) -> list[dict[str, Any]]:
    """Detectron2 dataset dicts of a synthetic split (generating the files on first use)."""
    from ..utils.io import read_label_map

    folder = _generate(spec) / split
    dicts = []
    for i, img in enumerate(sorted((folder / "images").glob("*.png"))):
        lbl_path = folder / "labels" / img.name
        label = read_label_map(lbl_path)
        h, w = label.shape
        dicts.append({
            "file_name": str(img.resolve()),
            "label_file": str(lbl_path.resolve()),
            "image_id": f"{split}_{i}",
            "height": h,
            "width": w,
            "organ": "synthetic",
            "annotations": label_map_to_annotations(label),
        })
    return dicts


_SPEC: SyntheticSpec | None = None


def register_synthetic_datasets(spec: SyntheticSpec | None = None) -> None:
    """Register ``nuclei_synth_train`` and ``nuclei_synth_test``; call again with another spec to change them."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    global _SPEC
    _SPEC = spec or SyntheticSpec()
    for split in SPLITS:
        name = f"nuclei_synth_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        DatasetCatalog.register(name, lambda split=split: load_synthetic(_SPEC, split))
        meta = MetadataCatalog.get(name)
        meta.set(thing_classes=["nucleus"], evaluator_type="nuclei", synthetic=True)
        if "train_organs" not in meta.as_dict():
            meta.set(train_organs=["synthetic"])
