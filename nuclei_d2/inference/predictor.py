"""Predictors: a trained model from a config + weights, applied to RGB arrays, large images and whole slides.

* :class:`NucleiPredictor` — the minimal API: ``NucleiPredictor(cfg)(rgb) -> Instances`` for one image that fits the
  model in one piece.
* :class:`Predictor` — the full product (``tools/predict.py`` uses it): any image size, tile by tile with overlap,
  tiles batched through the model, instances stitched across tiles (:mod:`nuclei_d2.inference.stitching`), test-time
  augmentation and ensembles from the config (``TEST.AUG`` / ``TEST.ENSEMBLE``, :mod:`nuclei_d2.inference.test_time`),
  memory bounded by the tile batch. Dense models (U-Net family) assemble their probability maps *within* each tile by
  the weighted vote of :mod:`nuclei_d2.layers.tiling` (their own ``MODEL.TILING``) before post-processing; their
  instances are then stitched across tiles like any instance model's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from detectron2.structures import Instances

from ..checkpoint import NucleiCheckpointer
from ..data.mapper import NucleiDatasetMapper
from ..export.runtime import install_runtime
from ..structures import CropMasks, nuclei_of
from ..utils.io import to_rgb_uint8
from .slide import ArraySource, ImageSource
from .stitching import PixelClaims, Tile, TileGrid, owned_selection, remove_duplicates

__all__ = ["NucleiPredictor", "Predictor", "TileResult", "TileFn", "disjoint_tiles"]

logger = logging.getLogger(__name__)

#: Maps a batch of RGB tiles (``H x W x 3`` uint8) to their nuclei, each :class:`CropMasks` in its tile's frame.
TileFn = Callable[[Sequence[np.ndarray]], list[CropMasks]]


class NucleiPredictor:
    """Run any nuclei-d2 model on one RGB image and return its ``Instances`` at the image's size.

    The image goes through the same :class:`NucleiDatasetMapper` (inference mode) as evaluation does, so extra input
    channels and test-time resizing match what the model was trained and evaluated with.
    """

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        from ..modeling.build import build_nuclei_model  # here: the models import this package

        self.model = build_nuclei_model(self.cfg)
        self.model.eval()
        if cfg.MODEL.WEIGHTS:
            NucleiCheckpointer.from_config(self.model, cfg).load(cfg.MODEL.WEIGHTS)
        # INFERENCE.RUNTIME "onnxruntime" / "torchscript": the export folder's networks run inside the same model
        install_runtime(self.model, self.cfg)
        self.mapper = NucleiDatasetMapper(self.cfg, is_train=False)

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> Instances:
        """Args: image: H x W x 3 RGB (uint8, or anything :func:`to_rgb_uint8` accepts). Returns CPU Instances."""
        image = to_rgb_uint8(image)
        h, w = image.shape[:2]
        inputs = self.mapper({"image": image, "height": h, "width": w})
        return self.model([inputs])[0]["instances"].to("cpu")


@dataclass
class TileResult:
    """The nuclei one tile contributes (final: the ownership rule needs no other tile) and the tile's pixels.

    Attributes:
        tile: the window and its owned region, in the analysed level's frame.
        crops: kept nuclei as bool crops in the analysed level's frame (after :func:`disjoint_tiles`: sharing no
            pixel with each other or with an earlier tile's nuclei).
        image: the tile's RGB pixels (for measurements such as the mean haematoxylin intensity).
    """

    tile: Tile
    crops: CropMasks
    image: np.ndarray


def _crops_from_output(out: dict[str, Any], score_threshold: float) -> CropMasks:
    """A model output (``{"instances", ...}``) as :class:`CropMasks` in the output's frame (a nuclei-d2 model's own
    crops; an R-CNN's ``pred_masks`` cropped)."""
    crops = nuclei_of(out["instances"].to("cpu"))
    if score_threshold > 0 and len(crops):
        crops = crops.select(np.flatnonzero(crops.scores >= score_threshold))
    return crops


def disjoint_tiles(results: Iterator[TileResult], grid: TileGrid) -> Iterator[TileResult]:
    """``results`` (tiles of ``grid`` in grid order) with overlapping nuclei resolved once, for every output
    (:class:`~nuclei_d2.inference.stitching.PixelClaims`): what the writers receive."""
    claims = PixelClaims(grid)
    for r in results:
        yield TileResult(r.tile, claims.resolve(r.crops, r.tile), r.image)


class Predictor(NucleiPredictor):
    """Tiled, stitched, batched inference of any nuclei-d2 model on images of any size (see the module docstring).

    Example::

        from nuclei_d2.engine import setup_cfg
        from nuclei_d2.inference import Predictor
        cfg = setup_cfg("configs/maskrcnn_baseline.yaml", ["MODEL.WEIGHTS", "model_final.pth", "MODEL.DEVICE", "cpu"])
        pred = Predictor(cfg)
        nuclei = pred.predict(rgb)                  # CropMasks in the image frame
        instances = nuclei.to_instances()           # the Detectron2 contract (full-size masks: small images only)

    Args:
        cfg: config (``INFERENCE.*`` for tiling; ``TEST.AUG`` / ``TEST.ENSEMBLE`` / ``TEST.MERGE`` for test-time
            augmentation and ensembles). Ignored when ``tile_fn`` is given.
        tile_fn: replaces the model (tests, foreign models): a batch of RGB tiles -> nuclei per tile.
        tile_size, overlap, batch_size, score_threshold, dedupe_iou, progress: override ``INFERENCE.*``.
    """

    def __init__(self, cfg: Any = None, *, tile_fn: TileFn | None = None, tile_size: int | None = None,
                 overlap: int | None = None, batch_size: int | None = None, score_threshold: float | None = None,
                 dedupe_iou: float | None = None, progress: bool | None = None):
        inf = cfg.INFERENCE if cfg is not None and "INFERENCE" in cfg else None

        def pick(value: Any, key: str, default: Any) -> Any:
            return value if value is not None else (inf[key] if inf is not None else default)

        self.tile_size = int(pick(tile_size, "TILE_SIZE", 1024))
        self.overlap = int(pick(overlap, "OVERLAP", 64))
        self.batch_size = int(pick(batch_size, "BATCH_SIZE", 2))
        self.score_threshold = float(pick(score_threshold, "SCORE_THRESHOLD", 0.0))
        self.dedupe_iou = float(pick(dedupe_iou, "DEDUPE_IOU", 0.0))
        self.progress = bool(pick(progress, "PROGRESS", True))
        if self.tile_size < 16 or not 0 <= self.overlap < self.tile_size or self.batch_size < 1:
            raise ValueError(f"INFERENCE: need TILE_SIZE >= 16, 0 <= OVERLAP < TILE_SIZE and BATCH_SIZE >= 1; got "
                             f"{self.tile_size}, {self.overlap}, {self.batch_size}")
        if tile_fn is not None:
            self.cfg, self.model, self.mapper = cfg, None, None
            self._tile_fn = tile_fn
            return
        if cfg is None:
            raise ValueError("Predictor needs a config (or a tile_fn)")
        super().__init__(cfg)
        from .test_time import build_test_time_wrapper

        self.model = build_test_time_wrapper(self.cfg, self.model).eval()
        self._tile_fn = self._model_tile_fn

    def __call__(self, image: np.ndarray) -> Instances:
        """Whole-image ``Instances`` as :class:`NucleiPredictor` gives them (tiled when built with a ``tile_fn``)."""
        if self.model is None:
            return self.predict_instances(to_rgb_uint8(image))
        return super().__call__(image)

    # ---- the model on a batch of tiles -----------------------------------------------------------------------------
    @torch.no_grad()
    def _model_tile_fn(self, tiles: Sequence[np.ndarray]) -> list[CropMasks]:
        from ..layers.wrappers import unwrap_model
        from .test_time import _supports_soft_masks, rcnn_soft_crops

        inputs = []
        for t in tiles:
            h, w = t.shape[:2]
            inputs.append(self.mapper({"image": t, "height": h, "width": w}))
        model = unwrap_model(self.model)
        if _supports_soft_masks(model):
            # R-CNN: paste the mask probabilities into their boxes only (no N x H x W full-size masks).
            raws = model.inference(inputs, do_postprocess=False)
            out = []
            for raw, inp in zip(raws, inputs):
                c = rcnn_soft_crops(raw, int(inp["height"]), int(inp["width"]))
                if self.score_threshold > 0 and len(c):
                    c = c.select(np.flatnonzero(c.scores >= self.score_threshold))
                out.append(c)
            return out
        return [_crops_from_output(o, self.score_threshold) for o in self.model(inputs)]

    # ---- tiles -----------------------------------------------------------------------------------------------------
    def grid(self, height: int, width: int) -> TileGrid:
        return TileGrid(height, width, self.tile_size, self.overlap)

    def iter_tiles(self, source: ImageSource | np.ndarray, level: int = 0, tissue: np.ndarray | None = None,
                   tissue_downsample: float = 1.0, desc: str = "tiles") -> Iterator[TileResult]:
        """Predict ``source`` tile by tile and yield each tile's final nuclei (image frame of ``level``).

        Memory: ``batch_size`` tiles and their predictions at a time. Tiles whose window holds no tissue (``tissue``:
        a boolean mask of the level-0 image at ``tissue_downsample``) are skipped. Nuclei share no pixel
        (:func:`disjoint_tiles`).
        """
        if isinstance(source, np.ndarray):
            source = ArraySource(source)
        level = source.check_level(level)
        height, width = source.level_dims[level]
        yield from disjoint_tiles(self._owned_tiles(source, level, tissue, tissue_downsample, desc),
                                  self.grid(height, width))

    def _owned_tiles(self, source: ImageSource, level: int, tissue: np.ndarray | None, tissue_downsample: float,
                     desc: str) -> Iterator[TileResult]:
        """The tiles' nuclei kept by the ownership rule, before overlaps are resolved."""
        height, width = source.level_dims[level]
        grid = self.grid(height, width)
        tiles = list(grid)
        if tissue is not None:
            scale = source.downsample(level) / tissue_downsample
            tiles = [t for t in tiles if _has_tissue(tissue, t, scale)]
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(tiles), desc=desc, unit="tile", dynamic_ncols=True, leave=False)
        try:
            for i in range(0, len(tiles), self.batch_size):
                batch = tiles[i:i + self.batch_size]
                images = [source.read_region(level, t.top, t.left, t.height, t.width) for t in batch]
                preds = self._tile_fn(images)
                if len(preds) != len(batch):
                    raise RuntimeError(f"the tile function returned {len(preds)} results for {len(batch)} tiles")
                for t, img, c in zip(batch, images, preds):
                    yield TileResult(t, owned_selection(c, t, (height, width)), img)
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()

    def predict(self, image: np.ndarray | ImageSource, level: int = 0) -> CropMasks:
        """All nuclei of an image (or one level of a slide) as crops in its frame, stitched across tiles, by
        decreasing score. Holds every nucleus in memory (crops only); stream :meth:`iter_tiles` for whole slides."""
        source = ArraySource(image) if isinstance(image, np.ndarray) else image
        level = source.check_level(level)
        size = source.level_dims[level]
        if self.dedupe_iou > 0:
            # Near-duplicates from neighbouring tiles are removed by IoU first, while both are whole; resolving the
            # overlaps first would leave the lower-scoring copy as a sliver instead. All nuclei are in memory here, so
            # the overlaps are then resolved by score alone (the streaming path also favours the earlier tile).
            owned = self._owned_tiles(source, level, None, 1.0, "tiles")
            out = remove_duplicates(CropMasks.cat([r.crops for r in owned], size), self.dedupe_iou).disjoint()
        else:
            out = CropMasks.cat([r.crops for r in self.iter_tiles(source, level)], size)
        return out.select(np.argsort(-out.scores, kind="stable"))

    def predict_instances(self, image: np.ndarray) -> Instances:
        """:meth:`predict` as Detectron2 ``Instances`` (full-size ``pred_masks``: for images that fit in memory)."""
        return self.predict(image).to_instances()

    def benchmark(self, source: ImageSource | np.ndarray, level: int = 0) -> dict[str, float]:
        """Run :meth:`iter_tiles` and return ``{"tiles", "nuclei", "seconds", "tiles_per_s"}``."""
        t0 = time.perf_counter()
        n_tiles = n_nuclei = 0
        for r in self.iter_tiles(source, level):
            n_tiles += 1
            n_nuclei += len(r.crops)
        dt = time.perf_counter() - t0
        return {"tiles": n_tiles, "nuclei": n_nuclei, "seconds": dt, "tiles_per_s": n_tiles / max(dt, 1e-9)}


def _has_tissue(mask: np.ndarray, tile: Tile, scale: float) -> bool:
    """Does the tile's window (level frame; ``scale`` = mask pixels per level pixel, inverted) hit the mask?"""
    mh, mw = mask.shape
    y0, x0 = int(tile.top * scale), int(tile.left * scale)
    y1 = min(mh, max(y0 + 1, int(np.ceil((tile.top + tile.height) * scale))))
    x1 = min(mw, max(x0 + 1, int(np.ceil((tile.left + tile.width) * scale))))
    return bool(mask[y0:y1, x0:x1].any())
