"""Export of the R-CNN methods (issue 27): the "rcnn" network (nuclei_d2/modeling/rcnn_network.py) of the baseline,
Mask R-CNN+ and the panoptic-fusion R-CNN traced to TorchScript and exported to ONNX, run through the unchanged
inference code on a crop of a real kumar_test tile: outputs equal eager PyTorch (TorchScript within 1e-5, ONNX
Runtime within 1e-2), the final label maps' AJI within 0.001; zero detections; the variants that cannot be exported
say why."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CONFIGS, tiny_cfg
from detectron2.modeling import GeneralizedRCNN, build_model
from test_export import _eager, _exported, _weights

from nuclei_d2.data.mapper import NucleiDatasetMapper
from nuclei_d2.engine.export import export_from_config
from nuclei_d2.evaluation.metrics import compute_metrics
from nuclei_d2.export import ExportError, read_sidecar
from nuclei_d2.modeling.rcnn_network import OUTPUT_NAMES, RCNNNetwork
from nuclei_d2.structures import instances_to_label_map

RCNN_CONFIGS = ["maskrcnn_baseline-tiny.yaml", "maskrcnn_plus-tiny.yaml", "panoptic_fusion-tiny.yaml"]
FORMATS = [("onnx", "onnxruntime"), ("torchscript", "torchscript")]
# Untrained tiny models score everything near 0.5: this threshold keeps a few to a few dozen detections per crop.
UNTRAINED_SCORE = "0.55"
TOL = {"torchscript": 1e-5, "onnxruntime": 1e-2}
AJI_TOL = 1e-3


@pytest.fixture(scope="module")
def kumar_tile(shared_data) -> tuple[dict, np.ndarray]:
    """The first kumar_test tile (Kumar et al. 2017 test split, from the raw MoNuSeg files): its dataset dict (for
    the mapper, which computes the extra channels) and its ground-truth label map."""
    from nuclei_d2.utils.io import read_label_map

    root = shared_data / "monuseg2018"
    name = json.loads((root / "splits.json").read_text())["kumar2017"]["test_same_organ"][0]
    image = next((root / "train" / "images").glob(f"{name}.*"))
    gt = read_label_map(root / "train" / "labels" / f"{name}.png")
    return {"file_name": str(image), "height": gt.shape[0], "width": gt.shape[1], "image_id": name}, gt


def crop_input(cfg, tile: tuple[dict, np.ndarray], y0: int, x0: int, h: int, w: int) -> tuple[dict, np.ndarray]:
    """The mapped input of a crop of the tile and the crop's ground-truth label map. The crop is given in the tile's
    pixels; a config that rescales at inference (``INPUT.NUCLEI.SCALE``) gets the same region of its larger input,
    and its predictions come back at the crop's size (``height`` / ``width``), as on a whole tile."""
    d, gt = tile
    inp = NucleiDatasetMapper(cfg, is_train=False)(dict(d))
    f = inp["image"].shape[-1] / gt.shape[1]
    image = inp["image"][:, round(y0 * f):round((y0 + h) * f), round(x0 * f):round((x0 + w) * f)].contiguous()
    return {"image": image, "height": h, "width": w, "file_name": d["file_name"]}, gt[y0:y0 + h, x0:x0 + w]


def assert_outputs_close(ref, got, tol: float, what: str) -> None:
    assert len(got) == len(OUTPUT_NAMES)
    for name, a, b in zip(OUTPUT_NAMES, ref, got):
        assert tuple(a.shape) == tuple(b.shape), f"{what}: {name} shape {tuple(b.shape)} != eager {tuple(a.shape)}"
        assert a.dtype == b.dtype, f"{what}: {name} dtype {b.dtype} != eager {a.dtype}"
        if a.numel():
            err = float((a.double() - b.double()).abs().max())
            assert err <= tol, f"{what}: {name} differs from eager by {err} (tolerance {tol})"


def label_aji(model, inp: dict, gt: np.ndarray) -> tuple[float, int]:
    with torch.no_grad():
        label = instances_to_label_map(model([inp])[0]["instances"])
    return compute_metrics(gt, label, hausdorff=False)["AJI"], int(label.max())


def check_exported(model, model_x, inp: dict, gt: np.ndarray, runtime: str, what: str) -> int:
    """The exported networks' outputs equal eager's on the crop, and the final label maps' AJI; returns the count."""
    image = model.network_input(inp)
    with torch.no_grad():
        ref = model.run_network("rcnn", image)
        got = model_x.run_network("rcnn", image)
    assert_outputs_close(ref, got, TOL[runtime], what)
    aji_e, n_e = label_aji(model, inp, gt)
    aji_x, n_x = label_aji(model_x, inp, gt)
    assert n_e > 0, f"{what}: no nucleus in the eager label map: the comparison would mean little"
    assert abs(aji_x - aji_e) <= AJI_TOL, f"{what}: AJI {aji_x} vs eager {aji_e}"
    return len(ref[0])


# ---- tests ---------------------------------------------------------------------------------------------------------
def test_eager_network_is_detectron2s_inference(kumar_tile):
    """The "rcnn" network run eagerly gives Detectron2's own GeneralizedRCNN inference (what the models gave before
    issue 27), for the three R-CNN meta-architectures."""
    for config in RCNN_CONFIGS:
        cfg = tiny_cfg(config, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", UNTRAINED_SCORE)
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        inp, _ = crop_input(cfg, kumar_tile, 300, 420, 256, 192)
        assert isinstance(model.networks()["rcnn"], RCNNNetwork)
        with torch.no_grad():
            ours = model.inference([inp], do_postprocess=False)[0]
            theirs = GeneralizedRCNN.inference(model, [inp], do_postprocess=False)[0]
        assert len(ours) == len(theirs) > 0, config
        assert torch.allclose(ours.pred_boxes.tensor, theirs.pred_boxes.tensor, atol=1e-3), config
        assert torch.allclose(ours.scores, theirs.scores, atol=1e-5), config
        assert torch.equal(ours.pred_classes, theirs.pred_classes), config
        assert torch.allclose(ours.pred_masks, theirs.pred_masks, atol=1e-5), config


@pytest.mark.real_data
@pytest.mark.parametrize("fmt,runtime", FORMATS)
@pytest.mark.parametrize("config", RCNN_CONFIGS)
def test_exported_rcnn_equals_eager_on_a_real_crop(config, fmt, runtime, kumar_tile, tmp_path):
    """tools/export_model.py's code exports the tiny R-CNN (traced on noise of another size), the export folder's
    config runs it: same detections on a kumar_test crop, same AJI (0.001); Mask R-CNN+ exports its distance U-Net
    too, which fills the distance channel alike."""
    opts = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", UNTRAINED_SCORE]
    weights = _weights(config, opts, tmp_path)
    cfg, model = _eager(config, opts, weights)
    folder = export_from_config(str(CONFIGS / config), fmt, tmp_path / "export", weights=str(weights),
                                opts=["MODEL.DEVICE", "cpu", *opts])
    sidecar = read_sidecar(folder)
    assert set(sidecar["networks"]) == set(model.networks()) == ({"rcnn", "distance"} if "plus" in config
                                                                 else {"rcnn"})
    rcnn = sidecar["networks"]["rcnn"]
    assert rcnn["inputs"][0]["shape"] == [model.pixel_mean.numel(), "height", "width"]
    assert [o["name"] for o in rcnn["outputs"]] == list(OUTPUT_NAMES)
    assert sidecar["postprocess"]["MODEL.ROI_HEADS.SCORE_THRESH_TEST"] == float(UNTRAINED_SCORE)
    cfg_x, model_x = _exported(folder, runtime, ["MODEL.DEVICE", "cpu"])
    inp, gt = crop_input(cfg, kumar_tile, 300, 420, 256, 192)
    n = check_exported(model, model_x, inp, gt, runtime, f"{config} {runtime}")
    assert n > 0
    if "plus" in config:
        with torch.no_grad():
            d_e = model.distance_unet.predict_distance(inp["image"][:3])
            d_x = model_x.distance_unet.predict_distance(inp["image"][:3])
        assert float((d_e - d_x).abs().max()) <= 1e-4


@pytest.mark.real_data
def test_zero_detections(kumar_tile, tmp_path):
    """No score passes the threshold: both exported forms return empty (0, ...) outputs of the right shapes (the
    dummy RoI keeps the mask head fed) and the model empty Instances."""
    config, opts = RCNN_CONFIGS[0], ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.0"]
    weights = _weights(config, opts, tmp_path)
    cfg, model = _eager(config, opts, weights)
    inp, _ = crop_input(cfg, kumar_tile, 0, 0, 128, 160)
    m = model.networks()["rcnn"].io.output_shapes[3][-1]
    for fmt, runtime in FORMATS:
        folder = export_from_config(str(CONFIGS / config), fmt, tmp_path / fmt, weights=str(weights),
                                    opts=["MODEL.DEVICE", "cpu", *opts])
        _, model_x = _exported(folder, runtime, ["MODEL.DEVICE", "cpu"])
        with torch.no_grad():
            boxes, scores, classes, masks = model_x.run_network("rcnn", model.network_input(inp))
            out = model_x([inp])[0]["instances"]
        assert tuple(boxes.shape) == (0, 4) and tuple(scores.shape) == (0,) and tuple(classes.shape) == (0,)
        assert tuple(masks.shape) == (0, 1, m, m)
        assert len(out) == 0 and out.image_size == (128, 160)


def test_variant_without_masks_is_a_clear_error(tmp_path):
    """An R-CNN the network does not cover (here: no mask head) cannot be exported: one error naming the
    meta-architecture and why, nothing written; its eager inference still runs Detectron2's own path."""
    out = tmp_path / "export"
    with pytest.raises(ExportError, match=r"^NucleiRCNN cannot be exported: .*mask head"):
        export_from_config(str(CONFIGS / RCNN_CONFIGS[0]), "onnx", out, allow_untrained=True,
                           opts=["MODEL.DEVICE", "cpu", "MODEL.MASK_ON", "False"])
    assert not out.exists() and not list(tmp_path.iterdir())
    model = build_model(tiny_cfg(RCNN_CONFIGS[0], "MODEL.MASK_ON", "False")).eval()
    with torch.no_grad():
        inst = model([{"image": torch.full((3, 64, 64), 128.0)}])[0]["instances"]
    assert inst.image_size == (64, 64)


@pytest.mark.real_data
def test_shipped_maskrcnn_plus_exports_with_real_detections(kumar_tile, tmp_path, monkeypatch):
    """The shipped, trained Mask R-CNN+ (maskrcnn_plus-monuseg) on a kumar_test crop: dozens of real nuclei;
    ONNX Runtime and TorchScript give eager's outputs and its AJI within 0.001."""
    from nuclei_d2 import model_zoo

    monkeypatch.delenv(model_zoo.ZOO_ENV, raising=False)
    name = "maskrcnn_plus-monuseg"
    model = model_zoo.get(name, device="cpu").eval()
    cfg = model_zoo.get_config(name)
    inp, gt = crop_input(cfg, kumar_tile, 500, 400, 320, 288)
    for fmt, runtime in FORMATS:
        folder = export_from_config(None, fmt, tmp_path / fmt, model_name=name, opts=["MODEL.DEVICE", "cpu"])
        _, model_x = _exported(folder, runtime, ["MODEL.DEVICE", "cpu"])
        n = check_exported(model, model_x, inp, gt, runtime, f"{name} {runtime}")
        assert n >= 30, n  # a trained model: real nuclei
    aji, _ = label_aji(model, inp, gt)
    assert aji > 0.4, aji


def test_maskrcnn_plus_routes_the_distance_runtime_to_its_distance_unet():
    """Mask R-CNN+'s "distance" runtime is what its distance U-Net's tiled inference calls (so the exported distance
    network fills the channel); a runtime with a name the model does not have is refused and installs nothing."""
    cfg = tiny_cfg(RCNN_CONFIGS[1])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    calls = []

    def distance(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return torch.full((x.shape[0], 1, *x.shape[-2:]), 0.25)

    with pytest.raises(ValueError, match="bogus"):
        model.set_runtime({"distance": distance, "bogus": distance})
    assert model.runtime is None and model.distance_unet.runtime is None
    model.set_runtime({"distance": distance})
    filled = model.network_input({"image": torch.full((5, 64, 96), 100.0)})
    assert calls and calls[0][1] == 3  # the U-Net's normalised RGB
    assert torch.allclose(filled[model.distance_index], torch.full((64, 96), 0.25 * 255.0))
    model.set_runtime(None)
    assert model.distance_unet.runtime is None
