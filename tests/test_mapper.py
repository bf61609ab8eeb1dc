"""NucleiDatasetMapper: image and label map augmented together; Instances derived from the label map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from PIL import Image

from nuclei_d2.data.mapper import NucleiDatasetMapper, label_map_to_gt_instances
from nuclei_d2.structures import label_map_to_annotations


@pytest.fixture
def sample(tmp_path):
    """An image whose red channel encodes the label (label * 40), so we can check alignment after augmentation."""
    label = np.zeros((40, 60), np.int32)
    label[5:15, 5:20] = 1
    label[20:35, 30:37] = 2
    label[2:6, 50:58] = 3
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :, 0] = label * 40
    image[:, :, 1] = np.arange(60)[None, :]  # asymmetric, so flips are visible
    Image.fromarray(image).save(tmp_path / "img.png")
    annos = label_map_to_annotations(label)
    annos[2]["category_id"] = 0
    return {"file_name": str(tmp_path / "img.png"), "height": 40, "width": 60, "image_id": 0,
            "annotations": annos}, image, label


def test_identity_mapping(sample):
    d, image, label = sample
    out = NucleiDatasetMapper(True, augmentations=[])(d)
    assert out["image"].shape == (3, 40, 60) and out["image"].dtype == torch.float32
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), image)
    np.testing.assert_array_equal(out["label_map"].numpy(), label)
    inst = out["instances"]
    assert len(inst) == 3 and inst.gt_masks.tensor.shape == (3, 40, 60)
    assert inst.gt_boxes.tensor[0].tolist() == [5, 5, 20, 15]
    assert "annotations" not in out


@pytest.mark.parametrize("augs", [
    [T.RandomFlip(1.0, horizontal=True, vertical=False)],
    [T.RandomFlip(1.0, horizontal=False, vertical=True)],
    [T.RandomCrop("absolute", (30, 30))],
], ids=["hflip", "vflip", "crop"])
def test_augmentations_keep_image_and_masks_aligned(sample, augs):
    d, _, _ = sample
    out = NucleiDatasetMapper(True, augmentations=augs, filter_empty=False)(d)
    red = out["image"][0].numpy()
    np.testing.assert_array_equal(red, out["label_map"].numpy() * 40)
    for k, m in enumerate(out["instances"].gt_masks.tensor):
        values = np.unique(red[m.numpy()])
        assert len(values) == 1 and values[0] > 0, k


def test_bgr_and_inference_keeps_annotations(sample):
    d, image, _ = sample
    out = NucleiDatasetMapper(False, augmentations=[], image_format="BGR")(d)
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), image[:, :, ::-1])
    assert "instances" not in out and len(out["annotations"]) == 3  # evaluators read the ground truth


def test_empty_crop_is_filtered_in_training(tmp_path):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "empty.png")
    d = {"file_name": str(tmp_path / "empty.png"), "height": 16, "width": 16, "image_id": 1, "annotations": []}
    assert NucleiDatasetMapper(True, augmentations=[])(d) is None
    out = NucleiDatasetMapper(True, augmentations=[], filter_empty=False)(d)
    assert len(out["instances"]) == 0


def test_wrong_size_in_dataset_dict_is_reported(sample):
    d, _, _ = sample
    d["height"] = 41
    with pytest.raises(ValueError, match="img.png: image is 40x60 but the dataset says 41x60"):
        NucleiDatasetMapper(True, augmentations=[])(d)


def test_gt_instances_classes():
    label = np.array([[1, 0, 3]], np.int32)  # label 2 absent (e.g. cropped away)
    inst = label_map_to_gt_instances(label, classes=np.array([0, 1, 2]))
    assert inst.gt_classes.tolist() == [0, 2]
