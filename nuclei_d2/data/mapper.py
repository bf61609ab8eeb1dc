"""``NucleiDatasetMapper``: dataset dict -> model input, for every method of the project.

Nuclei are many and small (a 1000x1000 MoNuSeg tile holds up to ~1,000), so the mapper works on ONE instance label
map instead of one mask per nucleus: the annotations are painted into a label map once, geometric augmentations
move the image and the label map together (nearest-neighbour for labels), and ``Instances`` as well as dense targets
are derived from the transformed label map. Label ``i`` is annotation ``i - 1`` throughout, so classes survive.
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
from .io import read_image_rgb, read_label_map

__all__ = ["NucleiDatasetMapper", "label_map_to_gt_instances"]

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
                 image_format: str = "RGB", filter_empty: bool = True, keep_gt: bool = False):
        """
        Args:
            is_train: training mode: annotations become ``instances``; images without nuclei are skipped when
                ``filter_empty`` (the dataloader then draws another image).
            augmentations: Detectron2 augmentations applied to image and label map together.
            image_format: "RGB" or "BGR": channel order of the image tensor (match the model's PIXEL_MEAN).
            keep_gt: at inference, also return ``instances``/``label_map`` of the ground truth when present.
        """
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR for nuclei images, got {image_format!r}")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.filter_empty = filter_empty
        self.keep_gt = keep_gt
        mode = "training" if is_train else "inference"
        logger.info(f"[NucleiDatasetMapper] augmentations used in {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict[str, Any]:
        return {
            "is_train": is_train,
            "augmentations": build_default_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "filter_empty": cfg.INPUT.NUCLEI.FILTER_EMPTY,
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

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any] | None:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_rgb(dataset_dict["file_name"])
        h, w = image.shape[:2]
        if dataset_dict.get("height", h) != h or dataset_dict.get("width", w) != w:
            raise ValueError(f"{dataset_dict['file_name']}: image is {h}x{w} but the dataset says "
                             f"{dataset_dict.get('height')}x{dataset_dict.get('width')}")
        has_gt = "annotations" in dataset_dict or "label_file" in dataset_dict
        want_gt = has_gt and (self.is_train or self.keep_gt)
        label, classes = self._load_label_map(dataset_dict, (h, w)) if want_gt else (None, None)

        aug_input = T.AugInput(image, sem_seg=label)
        self.augmentations(aug_input)
        image, label = aug_input.image, aug_input.sem_seg

        if self.image_format == "BGR":
            image = image[:, :, ::-1]
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
        return dataset_dict


def build_default_augmentation(cfg, is_train: bool) -> list[T.Augmentation]:
    """Crop (INPUT.CROP), resize (INPUT.MIN_SIZE_*; 0 = keep the scanner's resolution), flips and 90-degree turns.

    Replaced by ``nuclei_d2.data.augment.build_nuclei_augmentation`` when that module is present.
    """
    try:
        from .augment import build_nuclei_augmentation
    except ImportError:
        build_nuclei_augmentation = None
    if build_nuclei_augmentation is not None:
        return build_nuclei_augmentation(cfg, is_train)
    augs: list[T.Augmentation] = []
    if is_train:
        if cfg.INPUT.CROP.ENABLED:
            augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
        min_size = cfg.INPUT.MIN_SIZE_TRAIN
        if tuple(min_size) != (0,):
            augs.append(T.ResizeShortestEdge(min_size, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING))
        if cfg.INPUT.NUCLEI.FLIP:
            augs.append(T.RandomFlip(horizontal=True, vertical=False))
            augs.append(T.RandomFlip(horizontal=False, vertical=True))
        if cfg.INPUT.NUCLEI.ROT90:
            augs.append(T.RandomRotation([0, 90, 180, 270], expand=True, sample_style="choice",
                                         interp=None))
    elif cfg.INPUT.MIN_SIZE_TEST:
        augs.append(T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST))
    return augs
