"""One prediction type (nuclei_d2/structures.py, issue 23): crops between models, evaluator and writers, full-size
masks only when Detectron2 code reads them, and one overlap rule so every output of a prediction agrees."""

from __future__ import annotations

import csv
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from conftest import tiny_cfg
from detectron2.structures import Instances

from nuclei_d2.inference import Predictor, RunOptions, load_geojson, predict_file
from nuclei_d2.structures import CropMasks, NucleiInstances, label_map_to_instances, nuclei_of
from nuclei_d2.utils.io import read_image_rgb, read_label_map


def _square_nuclei(h: int, w: int, step: int) -> np.ndarray:
    label = np.zeros((h, w), np.int32)
    k = 0
    for y in range(0, h - 4, step):
        for x in range(0, w - 4, step):
            k += 1
            label[y + 1:y + step - 1, x + 1:x + step - 1] = k
    return label


def test_dense_instances_hold_crops_and_build_masks_only_when_read():
    label = _square_nuclei(1000, 1000, 31)  # ~1,000 nuclei: 1 GB as an N x H x W mask stack
    inst = label_map_to_instances(label, np.linspace(1, 0.5, label.max()))
    assert isinstance(inst, NucleiInstances) and len(inst) == label.max()
    assert "pred_masks" not in inst._fields  # nothing full-size yet
    assert sum(m.nbytes for m in nuclei_of(inst).masks) < 8 * 2**20
    np.testing.assert_array_equal(nuclei_of(inst.to("cpu")[inst.scores >= 0]).to_label_map(), label)
    sub = inst[2:5]  # indexing keeps the crops (and the laziness)
    assert isinstance(sub, NucleiInstances) and "pred_masks" not in sub._fields and sub.has("pred_masks")
    masks = sub.pred_masks  # Detectron2 code reading pred_masks gets them, built from the crops
    assert masks.dtype == torch.bool and masks.shape == (3, 1000, 1000)
    assert all(torch.equal(masks[i], torch.from_numpy(label == i + 3)) for i in range(3))


def test_disjoint_and_label_map_apply_the_same_rule():
    rng = np.random.default_rng(0)
    masks = np.zeros((40, 60, 60), bool)
    for i in range(40):
        y, x, r = rng.integers(5, 55), rng.integers(5, 55), rng.integers(3, 9)
        yy, xx = np.ogrid[:60, :60]
        masks[i] = (yy - y) ** 2 + (xx - x) ** 2 <= r * r
    scores = rng.choice([0.3, 0.5, 0.9], size=40)  # ties too
    crops = CropMasks.from_masks(masks, scores)
    label = crops.to_label_map()
    flat = crops.disjoint()
    assert len(flat) < len(crops)  # some nuclei were wholly covered by higher-scoring ones
    np.testing.assert_array_equal(flat.to_label_map() > 0, label > 0)
    assert (flat.to_label_map() != 0).sum() == flat.areas().sum()  # no pixel shared any more
    kept = [i for i in range(len(crops)) if (label == i + 1).any()]
    np.testing.assert_array_equal(flat.areas(), [(label == i + 1).sum() for i in kept])


def test_outputs_of_a_real_overlapping_prediction_agree_nucleus_by_nucleus(tmp_path, shared_data):
    """A random-init Mask R-CNN on a real MoNuSeg crop (tiled, so nuclei meet across tiles too): its masks overlap,
    yet the label map, the CSV, the GeoJSON and the COCO results give every nucleus the same pixels."""
    src = sorted((shared_data / "monuseg2018" / "train" / "images").glob("*.tif"))[0]
    rgb = np.ascontiguousarray(read_image_rgb(src)[:160, :200])
    img = tmp_path / "crop.png"
    from PIL import Image

    Image.fromarray(rgb).save(img)
    cfg = tiny_cfg("maskrcnn_baseline-tiny.yaml", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.3", "SEED", "3")
    torch.manual_seed(3)
    pred = Predictor(cfg, tile_size=128, overlap=48, batch_size=2, progress=False)
    raw = CropMasks.cat([r.crops for r in pred._owned_tiles(pred_source(rgb), 0, None, 1.0, "t")], (160, 200))
    assert len(raw) > 5 and raw.areas().sum() > (raw.to_label_map() > 0).sum()  # the raw masks do overlap
    out = tmp_path / "out"
    predict_file(pred, img, out, RunOptions(outputs=("labels", "csv", "geojson", "coco"), label_suffix=".png"))
    label = read_label_map(out / "crop_labels.png")
    ids, counts = np.unique(label[label > 0], return_counts=True)
    label_area = dict(zip(ids.tolist(), counts.tolist()))
    with open(out / "crop_nuclei.csv") as f:
        csv_area = {int(r["id"]): float(r["area"]) for r in csv.DictReader(f)}
    geo_area = {int(p["nucleus_id"]): float(p["measurements"]["area"]) for _, p in load_geojson(out / "crop.geojson")}
    coco = json.loads((out / "crop.coco.json").read_text())
    coco_area = {i + 1: float(mask_util.area(c["segmentation"])) for i, c in enumerate(coco)}
    assert len(csv_area) > 5
    assert label_area == csv_area == geo_area == coco_area


def pred_source(rgb: np.ndarray):
    from nuclei_d2.inference.slide import ArraySource

    return ArraySource(rgb)


def test_rcnn_outputs_hold_crops_equal_to_detectron2s_full_paste(monkeypatch, shared_data):
    """A random-init tiny Mask R-CNN (NucleiRCNN) on a real MoNuSeg crop hands over crops: no N x H x W paste runs
    during inference, and the pred_masks built from the crops equal Detectron2's own full paste bit for bit, at the
    input's size and at a larger requested output size (boxes rescaled), boxes at the image border included."""
    import detectron2.layers.mask_ops as mask_ops
    import detectron2.modeling.meta_arch.rcnn as d2_rcnn
    from detectron2.modeling import GeneralizedRCNN, build_model

    src = sorted((shared_data / "monuseg2018" / "train" / "images").glob("*.tif"))[0]
    rgb = np.ascontiguousarray(read_image_rgb(src)[:160, :200])
    cfg = tiny_cfg("maskrcnn_baseline-tiny.yaml", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "SEED", "3")
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    assert type(model).__name__ == "NucleiRCNN"
    image = torch.as_tensor(rgb.transpose(2, 0, 1).copy())
    inputs = [{"image": image}, {"image": image, "height": 240, "width": 300}]

    def no_full_size(*args, **kwargs):
        raise AssertionError("an N x H x W mask stack was built during inference")

    with monkeypatch.context() as m:
        m.setattr(mask_ops, "paste_masks_in_image", no_full_size)
        m.setattr(d2_rcnn, "detector_postprocess", no_full_size)
        m.setattr(CropMasks, "full_masks", no_full_size)
        with torch.no_grad():
            outs = [o["instances"] for o in model(inputs)]
    with torch.no_grad():
        raw = model.inference(inputs, do_postprocess=False)
    refs = [o["instances"] for o in GeneralizedRCNN._postprocess(raw, inputs, [r.image_size for r in raw])]
    for inst, ref, (h, w) in zip(outs, refs, [(160, 200), (240, 300)]):
        assert isinstance(inst, NucleiInstances) and "pred_masks" not in inst._fields
        assert len(inst) == len(ref) > 100 and inst.image_size == ref.image_size == (h, w)
        crops = inst.pred_nuclei
        assert sum(c.nbytes for c in crops.masks) < len(inst) * h * w / 20  # crops, not image-sized masks
        torch.testing.assert_close(inst.pred_boxes.tensor, ref.pred_boxes.tensor, rtol=0, atol=0)
        b = ref.pred_boxes.tensor
        assert ((b[:, 0] == 0) | (b[:, 1] == 0) | (b[:, 2] == w) | (b[:, 3] == h)).sum() > 5  # at the border
        assert torch.equal(inst.scores, ref.scores) and torch.equal(inst.pred_classes, ref.pred_classes)
        full = inst.pred_masks  # built lazily, as COCOEvaluator reads it
        assert full.dtype == ref.pred_masks.dtype == torch.bool and torch.equal(full, ref.pred_masks)
        ours, theirs = nuclei_of(inst), CropMasks.from_instances(ref)  # the nuclei, empty masks left out, as before
        np.testing.assert_array_equal(ours.boxes, theirs.boxes)
        assert all(np.array_equal(a, c) for a, c in zip(ours.masks, theirs.masks)) and len(ours) == len(theirs)
        np.testing.assert_array_equal(ours.to_label_map(), theirs.to_label_map())
    # masks empty at 0.5 stay detections (box AP) with an all-zero crop, and pred_masks keep their zero rows
    from detectron2.modeling.postprocessing import detector_postprocess

    from nuclei_d2.modeling.rcnn import crop_postprocess

    with torch.no_grad():
        r = model.inference(inputs[1:], do_postprocess=False)[0]  # raw again: detector_postprocess scaled the boxes
    r.pred_masks[:7] = 0.2
    inst = crop_postprocess(r, 240, 300)
    ref = detector_postprocess(r, 240, 300)
    assert (~ref.pred_masks.flatten(1).any(1)).sum() >= 7 and torch.equal(inst.pred_masks, ref.pred_masks)
    assert len(nuclei_of(inst)) == len(CropMasks.from_instances(ref)) == len(ref) - 7


def test_visible_fractions_follow_the_overlap_rule():
    masks = np.zeros((4, 30, 30), bool)
    masks[0, 2:12, 2:12] = True  # 100 px, the best score
    masks[1, 4:14, 2:12] = True  # 100 px, 80 of them under nucleus 0
    masks[2, 20:25, 20:25] = True  # alone
    masks[3, 2:12, 2:12] = True  # nucleus 0 again, scored lower: wholly covered
    crops = CropMasks.from_masks(masks, [0.9, 0.8, 0.3, 0.5])
    np.testing.assert_allclose(crops.visible_fractions(), [1.0, 0.2, 1.0, 0.0])
    # the fractions are what the label map shows of each nucleus, ties and all
    rng = np.random.default_rng(1)
    many = np.zeros((30, 50, 50), bool)
    yy, xx = np.ogrid[:50, :50]
    for i in range(30):
        y, x, r = rng.integers(5, 45), rng.integers(5, 45), rng.integers(3, 8)
        many[i] = (yy - y) ** 2 + (xx - x) ** 2 <= r * r
    crops = CropMasks.from_masks(many, rng.choice([0.4, 0.6, 0.8], size=30))
    label = crops.to_label_map()
    shown = np.array([(label == i + 1).sum() / many[i].sum() for i in range(30)])
    np.testing.assert_allclose(crops.visible_fractions(), shown)
    assert ((shown > 0) & (shown < 0.5)).any() and (shown == 0).any() and (shown == 1).any()  # not trivial


def _overlapping_raw_detections() -> Instances:
    """Raw R-CNN outputs on a 60 x 60 input: a nucleus, a second detection of it shifted by 2 px (90% hidden), one
    alone, and one whose mask is empty at 0.5."""
    from detectron2.structures import Boxes

    r = Instances((60, 60))
    boxes = [[0, 0, 20, 20], [2, 0, 22, 20], [40, 40, 55, 55], [25, 0, 35, 10]]
    r.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    r.scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    r.pred_classes = torch.zeros(4, dtype=torch.int64)
    r.pred_masks = torch.ones(4, 1, 28, 28)
    r.pred_masks[3] = 0.2
    return r


def test_crop_postprocess_drops_nuclei_hidden_under_better_ones():
    from nuclei_d2.modeling.rcnn import crop_postprocess

    r = _overlapping_raw_detections()
    assert len(crop_postprocess(r, 60, 60)) == 4  # default: Detectron2's instances, every one
    out = crop_postprocess(r, 60, 60, min_visible=0.5)
    assert out.scores.tolist() == pytest.approx([0.9, 0.7, 0.6])  # twin gone, empty mask kept (box AP)
    assert len(out.pred_nuclei) == 3 and len(out.pred_boxes) == 3
    assert len(crop_postprocess(r, 60, 60, min_visible=0.05)) == 4  # it shows 10% of itself


def test_rcnn_models_read_min_visible_fraction_from_the_config():
    from nuclei_d2.modeling import build_nuclei_model

    model = build_nuclei_model(tiny_cfg("maskrcnn_baseline-tiny.yaml", "TEST.MIN_VISIBLE_FRACTION", "0.5"))
    assert model.min_visible_fraction == 0.5
    plus = build_nuclei_model(tiny_cfg("maskrcnn_plus-tiny.yaml", "TEST.MIN_VISIBLE_FRACTION", "0.25"))
    assert plus.min_visible_fraction == 0.25
    with pytest.raises(ValueError, match="TEST.MIN_VISIBLE_FRACTION must be in"):
        build_nuclei_model(tiny_cfg("maskrcnn_baseline-tiny.yaml", "TEST.MIN_VISIBLE_FRACTION", "1.5"))


def test_rcnn_models_binarise_masks_at_the_configured_threshold():
    # A ramp mask (probability rising left to right): the nucleus is the pixels at or above TEST.MASK_THRESHOLD, so
    # a lower threshold gives a larger nucleus -- through the model's own post-processing, for both R-CNN classes.
    from nuclei_d2.modeling import build_nuclei_model

    r = _overlapping_raw_detections()[2:3]
    r.pred_masks = torch.linspace(0, 1, 28).expand(1, 1, 28, 28).clone()
    areas = {}
    for cfg_name, t in (("maskrcnn_baseline-tiny.yaml", "0.3"), ("maskrcnn_baseline-tiny.yaml", "0.7"),
                        ("maskrcnn_plus-tiny.yaml", "0.3")):
        model = build_nuclei_model(tiny_cfg(cfg_name, "TEST.MASK_THRESHOLD", t))
        assert model.mask_threshold == float(t)
        (mask,) = model.postprocess_raw(r, {"height": 60, "width": 60}).pred_nuclei.masks
        areas[cfg_name, t] = int(mask.sum())
    assert areas["maskrcnn_baseline-tiny.yaml", "0.3"] == areas["maskrcnn_plus-tiny.yaml", "0.3"]
    assert areas["maskrcnn_baseline-tiny.yaml", "0.7"] < 0.5 * 15 * 15 < areas["maskrcnn_baseline-tiny.yaml", "0.3"]
    default = build_nuclei_model(tiny_cfg("maskrcnn_baseline-tiny.yaml"))
    assert default.mask_threshold == 0.5  # Detectron2's
    with pytest.raises(ValueError, match="TEST.MASK_THRESHOLD must be in"):
        build_nuclei_model(tiny_cfg("maskrcnn_baseline-tiny.yaml", "TEST.MASK_THRESHOLD", "0"))
