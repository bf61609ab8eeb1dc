"""``NucleiDatasetMapper``: dataset dict -> model input, for every method of the project.

Nuclei are many and small (a 1000x1000 MoNuSeg tile holds up to ~1,000), so the mapper works on ONE instance label
map instead of one mask per nucleus: the annotations are painted into a label map once, geometric augmentations
move the image and the label map together (nearest-neighbour for labels), and ``Instances`` as well as dense targets
are derived from the transformed label map. Label ``i`` is annotation ``i - 1`` throughout, so classes survive.
In training, decoded tiles and their label maps are kept in a per-process cache (``INPUT.NUCLEI.DECODE_CACHE_MB``),
since every iteration crops a small window out of a tile that costs ~0.1 s to decode and paint.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, Instances
from scipy import ndimage

from ..structures import annotations_to_label_map
from ..utils.io import read_image_rgb, read_label_map
from .augment import build_nuclei_augmentation
from .decode_cache import DecodeCache

__all__ = ["EXTRA_CHANNELS", "NucleiDatasetMapper", "label_map_to_gt_instances"]

#: Extra input channels the mapper can stack after RGB (INPUT.EXTRA_CHANNELS).
EXTRA_CHANNELS = ("hematoxylin", "distance")

logger = logging.getLogger(__name__)


def label_map_to_gt_instances(label: np.ndarray, classes: np.ndarray | None = None) -> Instances:
    """Ground-truth ``Instances`` (gt_boxes XYXY, gt_masks, gt_classes) of every label present in ``label``.

    Args:
        label: H x W int label map where label ``i`` is annotation ``i - 1``.
        classes: class of annotation ``i - 1`` at index ``i - 1``; all zeros when None.
    """
    h, w = label.shape
    slices = ndimage.find_objects(label)
    present = [i for i, sl in enumerate(slices) if sl is not None]
    n = len(present)
    masks = torch.zeros((n, h, w), dtype=torch.bool)
    boxes = torch.zeros((n, 4), dtype=torch.float32)
    for k, i in enumerate(present):
        sl = slices[i]
        masks[k, sl[0], sl[1]] = torch.from_numpy(label[sl] == i + 1)
        boxes[k] = torch.tensor([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop], dtype=torch.float32)
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(boxes)
    inst.gt_masks = BitMasks(masks)
    cls = np.zeros(n, dtype=np.int64) if classes is None else np.asarray(classes, dtype=np.int64)[present]
    inst.gt_classes = torch.as_tensor(cls, dtype=torch.int64)
    return inst


class NucleiDatasetMapper:
    """Read an image and its nuclei, augment them together, and build the model's input dict.

    Output keys: ``image`` (C x H x W float tensor, RGB order, 0-255, C = 3 + extra channels), ``height``, ``width``,
    ``file_name``, ``image_id``, ``instances`` (training, or whenever annotations exist and ``keep_gt`` is set),
    ``label_map`` (int32 tensor; kept for evaluators and dense targets).
    """

    @configurable
    def __init__(self, is_train: bool, *, augmentations: list[T.Augmentation | T.Transform],
                 image_format: str = "RGB", filter_empty: bool = True, keep_gt: bool = False,
                 extra_channels: list[str] | tuple[str, ...] = (), targets: list[str] | tuple[str, ...] = (),
                 target_params: dict[str, Any] | None = None, distance_from_gt_at_test: bool = False,
                 decode_cache_mb: float = 0.0):
        """
        Args:
            is_train: training mode: annotations become ``instances``; images without nuclei are skipped when
                ``filter_empty`` (the dataloader then draws another image).
            augmentations: Detectron2 augmentations applied to image and label map together.
            image_format: "RGB" or "BGR": channel order of the image tensor (match the model's PIXEL_MEAN).
            keep_gt: at inference, also return ``instances``/``label_map`` of the ground truth when present.
            extra_channels: channels stacked after RGB, computed after augmentation and scaled to 0-255 (see
                :data:`EXTRA_CHANNELS`): ``"hematoxylin"`` (colour deconvolution of the augmented RGB),
                ``"distance"`` (normalised per-nucleus distance map of the ground truth in training; zeros at
                inference, where the model must predict it).
            targets: dense targets (:data:`nuclei_d2.data.targets.TARGET_NAMES`) put under ``"targets"`` (name ->
                tensor: uint8 class maps, float32 distances/weights) whenever a label map is available.
            target_params: keyword parameters of :func:`nuclei_d2.data.targets.build_targets` (boundary_width, ...).
            distance_from_gt_at_test: at inference too, fill the ``"distance"`` channel from the ground truth when
                there is one (an oracle, to measure what a perfect distance U-Net would give; never for real use).
            decode_cache_mb: keep up to this many MB of decoded images and painted label maps in memory (per
                process: each data-loader worker has its own), so the next crop of a tile skips the TIFF decode and
                the painting of its annotations (:mod:`nuclei_d2.data.decode_cache`); 0 disables it.
        """
        from .targets import TARGET_NAMES

        bad = [c for c in extra_channels if c not in EXTRA_CHANNELS]
        if bad:
            raise ValueError(f"INPUT.EXTRA_CHANNELS: unknown channel(s) {bad}; valid: {list(EXTRA_CHANNELS)}")
        bad = [t for t in targets if t not in TARGET_NAMES]
        if bad:
            raise ValueError(f"INPUT.TARGETS: unknown dense target(s) {bad}; valid: {list(TARGET_NAMES)}")
        self.extra_channels = tuple(extra_channels)
        self.targets = tuple(targets)
        self.target_params = dict(target_params or {})
        self._warned_distance = False
        self.distance_from_gt_at_test = bool(distance_from_gt_at_test)
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR for nuclei images, got {image_format!r}")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.filter_empty = filter_empty
        self.keep_gt = keep_gt
        if decode_cache_mb < 0:
            raise ValueError(f"INPUT.NUCLEI.DECODE_CACHE_MB must be >= 0, got {decode_cache_mb}")
        self.cache = DecodeCache(int(decode_cache_mb * 2**20)) if decode_cache_mb > 0 else None
        mode = "training" if is_train else "inference"
        logger.info(f"[NucleiDatasetMapper] augmentations used in {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict[str, Any]:
        return {
            "is_train": is_train,
            "augmentations": build_nuclei_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "filter_empty": cfg.INPUT.NUCLEI.FILTER_EMPTY,
            "extra_channels": list(cfg.INPUT.EXTRA_CHANNELS),
            "targets": list(cfg.INPUT.TARGETS),
            "target_params": {"boundary_width": cfg.INPUT.BOUNDARY_WIDTH, "erode_radius": cfg.INPUT.ERODE_RADIUS,
                              "border_is_contour": cfg.INPUT.BORDER_IS_CONTOUR},
            "distance_from_gt_at_test": cfg.INPUT.DISTANCE_FROM_GT_AT_TEST,
            # Inference reads each image once: a cache would only hold memory.
            "decode_cache_mb": cfg.INPUT.NUCLEI.DECODE_CACHE_MB if is_train else 0.0,
        }

    def _load_label_map(self, dataset_dict: dict[str, Any], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        annos = [a for a in dataset_dict.get("annotations", []) if not a.get("iscrowd", 0)]
        if "label_file" in dataset_dict and not annos:
            label = read_label_map(dataset_dict["label_file"], shape=shape)
            # Relabel to 1..N so label i is "instance i-1"; every nucleus is class 0.
            from ..structures import relabel_sequential

            label = relabel_sequential(label)
            return label, np.zeros(int(label.max()), dtype=np.int64)
        label = annotations_to_label_map(annos, *shape)
        classes = np.array([a.get("category_id", 0) for a in annos], dtype=np.int64)
        return label, classes

    def _decode(self, dataset_dict: dict[str, Any], preloaded: Any, want_gt: bool
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The RGB image and (when ``want_gt``) label map + classes of ``dataset_dict``, from the cache if there."""
        key = None
        if self.cache is not None and not isinstance(preloaded, np.ndarray) and "file_name" in dataset_dict:
            key = (dataset_dict["file_name"], dataset_dict.get("label_file"), dataset_dict.get("image_id"),
                   len(dataset_dict.get("annotations", ())), want_gt)
            hit = self.cache.get(key)
            if hit is not None:
                return hit  # type: ignore[return-value]
        image = preloaded if isinstance(preloaded, np.ndarray) else read_image_rgb(dataset_dict["file_name"])
        h, w = image.shape[:2]
        if dataset_dict.get("height", h) != h or dataset_dict.get("width", w) != w:
            raise ValueError(f"{dataset_dict.get('file_name', '<image>')}: image is {h}x{w} but the dataset says "
                             f"{dataset_dict.get('height')}x{dataset_dict.get('width')}")
        label, classes = self._load_label_map(dataset_dict, (h, w)) if want_gt else (None, None)
        if key is not None:
            self.cache.put(key, (image, label, classes))
        return image, label, classes

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any] | None:
        preloaded = dataset_dict.get("image")
        if isinstance(preloaded, np.ndarray):  # an in-memory RGB image (the predictor's path): don't re-read it
            dataset_dict = {k: v for k, v in dataset_dict.items() if k != "image"}
        # Training only reads the annotations (they are replaced by "instances"), so a shallow copy will do; at
        # inference they go on to the evaluators.
        dataset_dict = dict(dataset_dict) if self.is_train else copy.deepcopy(dataset_dict)
        has_gt = "annotations" in dataset_dict or "label_file" in dataset_dict
        oracle = self.distance_from_gt_at_test and "distance" in self.extra_channels
        want_gt = has_gt and (self.is_train or self.keep_gt or oracle)
        image, label, classes = self._decode(dataset_dict, preloaded, want_gt)

        aug_input = T.AugInput(image, sem_seg=label)
        self.augmentations(aug_input)
        image, label = aug_input.image, aug_input.sem_seg

        if self.image_format == "BGR":
            image = image[:, :, ::-1]
        if self.extra_channels:
            extra = self._extra_channels(image if self.image_format == "RGB" else image[:, :, ::-1], label)
            image = np.concatenate([image.astype(np.float32, copy=False), extra], axis=2)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)), dtype=torch.float32)
        if self.is_train:
            dataset_dict.pop("annotations", None)  # replaced by "instances"; evaluators read them at test time
        if label is not None:
            label = np.ascontiguousarray(label, dtype=np.int32)
            instances = label_map_to_gt_instances(label, classes)
            if self.is_train and self.filter_empty and len(instances) == 0:
                return None
            dataset_dict["instances"] = instances
            dataset_dict["label_map"] = torch.from_numpy(label)
            if self.targets:
                from .targets import build_targets

                dense = build_targets(label, self.targets, **self.target_params)
                dataset_dict["targets"] = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in dense.items()}
        return dataset_dict

    def _extra_channels(self, rgb: np.ndarray, label: np.ndarray | None) -> np.ndarray:
        """H x W x len(extra_channels) float32 in 0-255, from the augmented RGB image and label map."""
        h, w = rgb.shape[:2]
        out = np.zeros((h, w, len(self.extra_channels)), dtype=np.float32)
        for i, name in enumerate(self.extra_channels):
            if name == "hematoxylin":
                from ..stain import hematoxylin_channel

                u8 = rgb if rgb.dtype == np.uint8 else np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
                out[:, :, i] = hematoxylin_channel(np.ascontiguousarray(u8[:, :, :3])) * 255.0
            elif name == "distance":
                if label is not None and (self.is_train or self.distance_from_gt_at_test):
                    from .targets import distance_map

                    out[:, :, i] = distance_map(
                        label, border_is_contour=self.target_params.get("border_is_contour", False)) * 255.0
                elif not self._warned_distance:  # zeros: the model has to predict it (Mask R-CNN+)
                    logger.warning("[NucleiDatasetMapper] the 'distance' input channel comes from the ground truth "
                                   "only in training; at inference it is zeros, for the model's distance network to "
                                   "fill (Mask R-CNN+, DISTANCE_SOURCE 'unet'); a model without one sees zeros")
                    self._warned_distance = True
        return out
