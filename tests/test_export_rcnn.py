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
from conftest import tiny_cfg
from detectron2.modeling import GeneralizedRCNN, build_model

from nuclei_d2.data.mapper import NucleiDatasetMapper
from nuclei_d2.evaluation.metrics import compute_metrics
from nuclei_d2.modeling.rcnn_network import OUTPUT_NAMES, RCNNNetwork
from nuclei_d2.structures import instances_to_label_map

CONFIGS = ["maskrcnn_baseline-tiny.yaml", "maskrcnn_plus-tiny.yaml", "panoptic_fusion-tiny.yaml"]
# Untrained tiny models score everything near 0.5: this threshold keeps a few to a few dozen detections per crop.
UNTRAINED_SCORE = "0.55"
TS_TOL, ORT_TOL, AJI_TOL = 1e-5, 1e-2, 1e-3


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
    """The mapped input of a crop of the tile and the crop's ground-truth label map."""
    d, gt = tile
    inp = NucleiDatasetMapper(cfg, is_train=False)(dict(d))
    image = inp["image"][:, y0:y0 + h, x0:x0 + w].contiguous()
    return {"image": image, "height": h, "width": w, "file_name": d["file_name"]}, gt[y0:y0 + h, x0:x0 + w]


# ---- interim export helpers (the framework's exporter and runtimes replace them) -----------------------------------
def trace(net: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with torch.no_grad():
        return torch.jit.trace(net, (example,), check_trace=False)


def onnx_runtime(net: torch.nn.Module, example: torch.Tensor, path: str):
    import onnxruntime as ort

    dyn = {n: {0: "detections"} for n in OUTPUT_NAMES}
    torch.onnx.export(trace(net, example), (example,), path, dynamo=False, opset_version=17, input_names=["image"],
                      output_names=list(OUTPUT_NAMES), dynamic_axes={"image": {1: "height", 2: "width"}, **dyn})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    def run(image: torch.Tensor):
        return tuple(torch.from_numpy(o) for o in sess.run(None, {"image": image.detach().cpu().numpy()}))

    return run


def assert_outputs_close(ref, got, tol: float, what: str) -> None:
    assert len(got) == len(OUTPUT_NAMES)
    for name, a, b in zip(OUTPUT_NAMES, ref, got):
        assert tuple(a.shape) == tuple(b.shape), f"{what}: {name} shape {tuple(b.shape)} != eager {tuple(a.shape)}"
        if a.numel():
            err = float((a.double() - b.double()).abs().max())
            assert err <= tol, f"{what}: {name} differs from eager by {err} (tolerance {tol})"


def label_aji(model, inp: dict, gt: np.ndarray) -> tuple[float, int]:
    with torch.no_grad():
        label = instances_to_label_map(model([inp])[0]["instances"])
    return compute_metrics(gt, label, hausdorff=False)["AJI"], int(label.max())


# ---- tests ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS)
def test_exported_rcnn_matches_eager_on_a_real_crop(config, kumar_tile, tmp_path):
    """Traced on one crop, run on another of a different size: the count of detections and the sizes follow the
    input (nothing baked in by the trace); eager network == Detectron2's own inference; AJI within 0.001."""
    cfg = tiny_cfg(config, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", UNTRAINED_SCORE)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    example, _ = crop_input(cfg, kumar_tile, 0, 0, 96, 128)
    inp, gt = crop_input(cfg, kumar_tile, 300, 420, 256, 192)
    with torch.no_grad():
        # the eager network is Detectron2's GeneralizedRCNN inference
        ours = model.inference([inp], do_postprocess=False)[0]
        theirs = GeneralizedRCNN.inference(model, [inp], do_postprocess=False)[0]
        assert len(ours) == len(theirs) > 0
        assert torch.allclose(ours.pred_boxes.tensor, theirs.pred_boxes.tensor, atol=1e-3)
        assert torch.allclose(ours.scores, theirs.scores, atol=1e-5)
        assert torch.equal(ours.pred_classes, theirs.pred_classes)
        assert torch.allclose(ours.pred_masks, theirs.pred_masks, atol=1e-5)

    net = model.networks()["rcnn"]
    assert isinstance(net, RCNNNetwork)
    image = model.network_input(inp)
    ex_image = model.network_input(example)
    with torch.no_grad():
        ref = net(image)
        n_example = len(net(ex_image)[0])
    assert len(ref[0]) > 0 and len(ref[0]) != n_example  # the trace's detection count is not the run's
    runtimes = {"torchscript": (trace(net, ex_image), TS_TOL),
                "onnxruntime": (onnx_runtime(net, ex_image, str(tmp_path / "rcnn.onnx")), ORT_TOL)}
    aji_eager, n_eager = label_aji(model, inp, gt)
    assert n_eager > 0
    for kind, (fn, tol) in runtimes.items():
        with torch.no_grad():
            assert_outputs_close(ref, fn(image), tol, f"{config} {kind}")
        model.set_runtime({"rcnn": fn})
        try:
            aji, n = label_aji(model, inp, gt)
        finally:
            model.set_runtime(None)
        assert abs(aji - aji_eager) <= AJI_TOL, f"{config} {kind}: AJI {aji} vs eager {aji_eager}"
        assert abs(n - n_eager) <= max(1, n_eager // 50), f"{config} {kind}: {n} nuclei vs eager {n_eager}"


def test_zero_detections(kumar_tile, tmp_path):
    """No score passes the threshold: both exported forms return empty (0, ...) outputs of the right shapes (the
    dummy RoI keeps the mask head fed) and the model empty Instances."""
    cfg = tiny_cfg(CONFIGS[0], "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.0")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    inp, _ = crop_input(cfg, kumar_tile, 0, 0, 128, 160)
    net = model.networks()["rcnn"]
    image = model.network_input(inp)
    m = cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION * 2
    for fn in (net, trace(net, image), onnx_runtime(net, image, str(tmp_path / "rcnn.onnx"))):
        with torch.no_grad():
            boxes, scores, classes, masks = fn(image)
        assert tuple(boxes.shape) == (0, 4) and tuple(scores.shape) == (0,) and tuple(classes.shape) == (0,)
        assert tuple(masks.shape) == (0, 1, m, m)
        model.set_runtime({"rcnn": fn})
        try:
            with torch.no_grad():
                out = model([inp])[0]["instances"]
        finally:
            model.set_runtime(None)
        assert len(out) == 0 and out.image_size == (128, 160)


def test_variant_without_masks_is_a_clear_error():
    """An R-CNN the network does not cover (here: no mask head) cannot be exported: the error names the
    meta-architecture and why; its eager inference still runs Detectron2's own path."""
    cfg = tiny_cfg(CONFIGS[0], "MODEL.MASK_ON", "False")
    model = build_model(cfg).eval()
    with pytest.raises(ValueError, match=r"NucleiRCNN cannot run as one exported network: .*mask head"):
        model.networks()
    with torch.no_grad():
        out = model([{"image": torch.full((3, 64, 64), 128.0)}])[0]["instances"]
    assert out.image_size == (64, 64)


def test_zoo_model_exports_with_real_detections(kumar_tile, tmp_path):
    """The shipped trained Mask R-CNN+ (maskrcnn_plus-monuseg) on a 256 x 256 kumar_test crop: dozens of real
    nuclei; TorchScript and ONNX Runtime give eager's outputs and its AJI within 0.001."""
    from nuclei_d2 import model_zoo

    model = model_zoo.get("maskrcnn_plus-monuseg", device="cpu").eval()
    cfg = model_zoo.get_config("maskrcnn_plus-monuseg")
    inp, gt = crop_input(cfg, kumar_tile, 500, 400, 256, 256)
    example, _ = crop_input(cfg, kumar_tile, 0, 0, 192, 224)
    net = model.networks()["rcnn"]
    image, ex_image = model.network_input(inp), model.network_input(example)
    with torch.no_grad():
        ref = net(image)
    aji_eager, n_eager = label_aji(model, inp, gt)
    assert n_eager >= 20 and aji_eager > 0.4, (n_eager, aji_eager)  # a trained model: real nuclei
    for kind, fn, tol in (("torchscript", trace(net, ex_image), TS_TOL),
                          ("onnxruntime", onnx_runtime(net, ex_image, str(tmp_path / "rcnn.onnx")), ORT_TOL)):
        with torch.no_grad():
            assert_outputs_close(ref, fn(image), tol, f"zoo {kind}")
        model.set_runtime({"rcnn": fn})
        try:
            aji, _ = label_aji(model, inp, gt)
        finally:
            model.set_runtime(None)
        assert abs(aji - aji_eager) <= AJI_TOL, f"zoo {kind}: AJI {aji} vs eager {aji_eager}"
