"""Export (issue 27): the dense methods' networks to ONNX and TorchScript run through the same tiling and
post-processing as eager PyTorch and give the same maps (within EXPORT_ATOL) and the same AJI (within 0.001) on a
crop of a real Kumar test tile; tampered folders and unexportable methods are one-line errors; train_net --eval-only
and tools/predict.py run an export folder; the shipped two-stage zoo model scores the same exported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, load_tool

from nuclei_d2.engine import setup_cfg
from nuclei_d2.engine.export import export_from_config, export_model, install_runtime
from nuclei_d2.errors import ConfigError
from nuclei_d2.evaluation.metrics import compute_metrics
from nuclei_d2.export import SIDECAR, ExportError, load_runtime, read_sidecar
from nuclei_d2.modeling.build import build_nuclei_model

#: Probability maps of an exported model equal eager PyTorch's within this (absolute; float32 kernels differ).
EXPORT_ATOL = 1e-4
#: AJI of the final label maps, exported vs eager.
AJI_TOL = 1e-3
#: The same for an int8 export of a trained model, on one tile (its mean over 14 tiles moved by 1e-4).
INT8_AJI_TOL = 5e-3
#: A Kumar test tile (held out from kumar_train), read from the raw MoNuSeg 2018 files.
KUMAR_TEST_TILE = "TCGA-21-5784-01Z-00-DX1"
#: Odd sides, so padding to the networks' multiples (and BRP-Net's TAFE pooling) is exercised.
CROP = (slice(300, 503), slice(400, 587))

# Untrained tiny models: post-processing thresholds set where their maps have content (checked: the label maps are
# not empty), weights from a fixed seed.
DENSE = {
    "nb_unet": ("nb_unet-tiny.yaml", []),
    "two_stage_unet": ("two_stage_unet_stage2-tiny.yaml", ["MODEL.TWO_STAGE.STAGE1.WEIGHTS", ""]),
    "brpnet": ("brpnet_stage2-tiny.yaml", ["MODEL.BRPNET.STAGE1.WEIGHTS", ""]),
}


@pytest.fixture(scope="module")
def kumar_crop(shared_data) -> tuple[np.ndarray, np.ndarray]:
    """(RGB crop, its ground-truth label map) of a real Kumar test tile."""
    from nuclei_d2.utils.io import read_image_rgb, read_label_map

    root = shared_data / "monuseg2018" / "train"
    image = read_image_rgb(next((root / "images").glob(f"{KUMAR_TEST_TILE}.*")))
    label = read_label_map(root / "labels" / f"{KUMAR_TEST_TILE}.png")
    return np.ascontiguousarray(image[CROP]), np.ascontiguousarray(label[CROP])


def _weights(config: str, opts: list[str], folder: Path) -> Path:
    """A seeded random-init checkpoint of ``config`` (what an export reads like any trained one)."""
    cfg = setup_cfg(str(CONFIGS / config), ["MODEL.DEVICE", "cpu", *opts], eval_only=True)
    torch.manual_seed(0)
    model = build_nuclei_model(cfg)
    path = folder / "model.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def _predict(cfg, model, rgb: np.ndarray) -> dict:
    from nuclei_d2.data.mapper import NucleiDatasetMapper

    h, w = rgb.shape[:2]
    inp = NucleiDatasetMapper(cfg, is_train=False)({"image": rgb, "height": h, "width": w})
    with torch.no_grad():
        return model.eval()([inp])[0]


def _eager(config: str, opts: list[str], weights: Path):
    from nuclei_d2.checkpoint import NucleiCheckpointer

    cfg = setup_cfg(str(CONFIGS / config), ["MODEL.DEVICE", "cpu", *opts, "MODEL.WEIGHTS", str(weights)],
                    eval_only=True)
    model = build_nuclei_model(cfg)
    NucleiCheckpointer.from_config(model, cfg).load(cfg.MODEL.WEIGHTS)
    return cfg, model.eval()


def _exported(folder: Path, runtime: str, opts: list[str] = ()):
    """The model an export folder describes (its config.yaml), running the folder's networks."""
    cfg = setup_cfg(str(folder / "config.yaml"), ["INFERENCE.RUNTIME", runtime, "INFERENCE.EXPORTED", str(folder),
                                                  *opts], eval_only=True)
    model = build_nuclei_model(cfg)
    assert install_runtime(model, cfg) is not None
    return cfg, model.eval()


def _post_opts(method: str, probs: torch.Tensor) -> list[str]:
    """Thresholds where the untrained maps have content: the median of the map post-processing thresholds (BRP-Net:
    semantic - boundary)."""
    thresholded = probs[2] if method == "nb_unet" else probs[0] - probs[1] if method == "brpnet" else probs[0]
    med = float(thresholded.median())
    key = {"nb_unet": "MODEL.NB.THRESHOLD", "two_stage_unet": "MODEL.TWO_STAGE.THRESHOLD",
           "brpnet": "MODEL.BRPNET.PROPOSAL_THRESHOLD"}[method]
    return [key, f"{med:.6f}"]


@pytest.mark.real_data
@pytest.mark.parametrize("fmt,runtime", [("onnx", "onnxruntime"), ("torchscript", "torchscript")])
@pytest.mark.parametrize("method", sorted(DENSE))
def test_exported_dense_model_equals_eager_on_a_real_crop(method, fmt, runtime, kumar_crop, tmp_path):
    config, opts = DENSE[method]
    rgb, gt = kumar_crop
    weights = _weights(config, opts, tmp_path)
    cfg, model = _eager(config, opts, weights)
    opts = [*opts, *_post_opts(method, _predict(cfg, model, rgb)["probs"])]
    cfg, model = _eager(config, opts, weights)
    eager = _predict(cfg, model, rgb)

    folder = export_from_config(str(CONFIGS / config), fmt, tmp_path / "export", weights=str(weights),
                                opts=["MODEL.DEVICE", "cpu", *opts])
    sidecar = read_sidecar(folder)
    assert sidecar["format"] == fmt and sidecar["meta_architecture"] == cfg.MODEL.META_ARCHITECTURE
    assert set(sidecar["networks"]) == set(model.networks())
    cfg_x, model_x = _exported(folder, runtime)
    got = _predict(cfg_x, model_x, rgb)

    assert got["probs"].shape == eager["probs"].shape == (len(model.prob_names), *rgb.shape[:2])
    assert float((got["probs"] - eager["probs"]).abs().max()) <= EXPORT_ATOL
    label_e, label_x = eager["label_map"].numpy(), got["label_map"].numpy()
    assert label_e.max() >= 5, "the untrained model's label map should hold nuclei for the comparison to mean much"
    aji_e = compute_metrics(gt, label_e, hausdorff=False)["AJI"]
    aji_x = compute_metrics(gt, label_x, hausdorff=False)["AJI"]
    assert abs(aji_x - aji_e) <= AJI_TOL, (aji_e, aji_x)


@pytest.mark.real_data
def test_brpnet_tafe_exports_faithfully_on_odd_sizes(kumar_crop, tmp_path):
    """TAFE's pooling: ONNX of the network equals eager on inputs whose sides halve to odd sizes (the earlier
    adaptive pooling exported with the example's window baked in)."""
    config, opts = DENSE["brpnet"]
    cfg, model = _eager(config, opts, _weights(config, opts, tmp_path))
    folder = export_model(model, cfg, tmp_path / "export", "onnx")
    _, fns = load_runtime(folder, "onnxruntime")
    net = model.networks()["tafe"]
    for h, w in ((72, 56), (8 * 13, 8 * 7), (24, 40)):  # 72 -> 36 -> 18 -> 9; 104 -> ... -> 13
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h))
        with torch.no_grad():
            assert float((fns["tafe"](x) - net(x)).abs().max()) <= EXPORT_ATOL, (h, w)
    for name in ("refine_small", "refine_large"):  # fixed patch size, any batch
        net = model.networks()[name]
        x = torch.randn(5, *net.io.example_inputs()[0].shape[1:], generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            assert float((fns[name](x) - net(x)).abs().max()) <= EXPORT_ATOL, name


def test_tampered_or_incomplete_export_folder_is_a_clear_error(tmp_path):
    config, opts = DENSE["nb_unet"]
    folder = export_from_config(str(CONFIGS / config), "onnx", tmp_path / "export",
                                weights=str(_weights(config, opts, tmp_path)), opts=["MODEL.DEVICE", "cpu"])
    read_sidecar(folder)
    net = folder / "main.onnx"
    data = bytearray(net.read_bytes())
    data[len(data) // 2] ^= 0xFF
    net.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"main\.onnx: sha256 .* does not match .*export\.json"):
        load_runtime(folder, "onnxruntime")
    net.unlink()
    with pytest.raises(ExportError, match=r"main\.onnx: network 'main' file missing"):
        read_sidecar(folder)
    (folder / SIDECAR).write_text("{not json")
    with pytest.raises(ExportError, match=r"export\.json: not valid JSON"):
        read_sidecar(folder)
    with pytest.raises(ExportError, match="export folder not found"):
        read_sidecar(tmp_path / "nowhere")


def test_wrong_runtime_or_model_for_an_export_is_a_clear_error(tmp_path):
    config, opts = DENSE["nb_unet"]
    folder = export_from_config(str(CONFIGS / config), "torchscript", tmp_path / "export",
                                weights=str(_weights(config, opts, tmp_path)), opts=["MODEL.DEVICE", "cpu"])
    with pytest.raises(ExportError, match="holds torchscript files.*INFERENCE.RUNTIME torchscript"):
        load_runtime(folder, "onnxruntime")
    cfg = setup_cfg(str(CONFIGS / "two_stage_unet-tiny.yaml"), ["MODEL.DEVICE", "cpu", "INFERENCE.RUNTIME",
                                                                "torchscript", "INFERENCE.EXPORTED", str(folder)],
                    eval_only=True)
    with pytest.raises(ConfigError, match="exported from a NucleusBoundaryUNet.*TwoStageUNet"):
        install_runtime(build_nuclei_model(cfg), cfg)
    with pytest.raises(ConfigError, match="INFERENCE.EXPORTED is empty"):
        setup_cfg(str(CONFIGS / config), ["INFERENCE.RUNTIME", "onnxruntime"], eval_only=True)
    with pytest.raises(ConfigError, match="INFERENCE.RUNTIME must be one of"):
        setup_cfg(str(CONFIGS / config), ["INFERENCE.RUNTIME", "tensorrt"], eval_only=True)


def test_unexportable_method_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "export"
    with pytest.raises(ExportError, match="ClassicalWatershed cannot be exported: it has no network"):
        export_from_config(str(CONFIGS / "classical_watershed.yaml"), "onnx", out, opts=["MODEL.DEVICE", "cpu"])
    code = load_tool("export_model").main(["--config-file", str(CONFIGS / "classical_watershed.yaml"), "--format",
                                           "torchscript", "--output", str(out), "MODEL.DEVICE", "cpu"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ClassicalWatershed cannot be exported") and "\n" not in err
    assert not out.exists() and not list(tmp_path.glob(".export*"))


def test_failed_export_leaves_nothing_and_keeps_an_existing_export(tmp_path, monkeypatch):
    config, opts = DENSE["nb_unet"]
    weights = str(_weights(config, opts, tmp_path))
    out = export_from_config(str(CONFIGS / config), "onnx", tmp_path / "export", weights=weights,
                             opts=["MODEL.DEVICE", "cpu"])
    before = json.loads((out / SIDECAR).read_text())
    with pytest.raises(ExportError, match="folder exists and is not empty"):
        export_from_config(str(CONFIGS / config), "onnx", out, weights=weights, opts=["MODEL.DEVICE", "cpu"])
    import nuclei_d2.engine.export as engine_export

    def broken(*args, **kwargs):
        raise ExportError("main: onnx export failed (simulated)")

    monkeypatch.setattr(engine_export, "export_networks", broken)
    with pytest.raises(ExportError, match="simulated"):
        export_from_config(str(CONFIGS / config), "onnx", out, weights=weights, opts=["MODEL.DEVICE", "cpu"],
                           overwrite=True)
    assert json.loads((out / SIDECAR).read_text()) == before  # the old export is whole
    read_sidecar(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "model.pth"]  # no temporary folder left
    with pytest.raises(ConfigError, match="no weights to export"):
        export_from_config(str(CONFIGS / config), "onnx", tmp_path / "x", opts=["MODEL.DEVICE", "cpu"])


@pytest.mark.slow
def test_train_net_eval_only_with_an_exported_model_gives_the_eager_aji(tmp_path):
    config, opts = DENSE["nb_unet"]
    weights = _weights(config, opts, tmp_path)
    folder = export_from_config(str(CONFIGS / config), "onnx", tmp_path / "export", weights=str(weights),
                                opts=["MODEL.DEVICE", "cpu"])
    train_net = load_tool("train_net")
    common = ["--eval-only", "MODEL.DEVICE", "cpu", "TEST.NUCLEI_EVAL.HAUSDORFF", "False"]
    assert train_net.main(["--config-file", str(CONFIGS / config), *common, "MODEL.WEIGHTS", str(weights),
                           "OUTPUT_DIR", str(tmp_path / "eager")]) == 0
    assert train_net.main(["--config-file", str(folder / "config.yaml"), *common, "INFERENCE.RUNTIME", "onnxruntime",
                           "INFERENCE.EXPORTED", str(folder), "MODEL.WEIGHTS", "",
                           "OUTPUT_DIR", str(tmp_path / "onnx")]) == 0
    eager = json.loads((tmp_path / "eager" / "metrics_final.json").read_text())["nuclei"]
    onnx = json.loads((tmp_path / "onnx" / "metrics_final.json").read_text())["nuclei"]
    assert eager["AJI"] > 0.0
    assert onnx["AJI"] == pytest.approx(eager["AJI"], abs=AJI_TOL)


@pytest.mark.slow
@pytest.mark.real_data
def test_predict_tool_runs_an_export_folder_like_the_eager_model(kumar_crop, tmp_path):
    from nuclei_d2.utils.io import read_label_map

    config, opts = DENSE["two_stage_unet"]
    rgb, _ = kumar_crop
    weights = _weights(config, opts, tmp_path)
    cfg, model = _eager(config, opts, weights)
    post = _post_opts("two_stage_unet", _predict(cfg, model, rgb)["probs"])
    folder = export_from_config(str(CONFIGS / config), "torchscript", tmp_path / "export", weights=str(weights),
                                opts=["MODEL.DEVICE", "cpu", *opts, *post])
    from PIL import Image

    Image.fromarray(rgb).save(tmp_path / "crop.png")
    predict = load_tool("predict")
    io = ["--input", str(tmp_path / "crop.png"), "--outputs", "labels", "--no-progress"]
    assert predict.main(["--config-file", str(CONFIGS / config), "--weights", str(weights), *io,
                         "--output", str(tmp_path / "eager"), "MODEL.DEVICE", "cpu", *opts, *post]) == 0
    assert predict.main(["--exported", str(folder), *io, "--output", str(tmp_path / "exported")]) == 0
    eager = read_label_map(next((tmp_path / "eager").glob("crop*.tif")))
    exported = read_label_map(next((tmp_path / "exported").glob("crop*.tif")))
    assert eager.max() >= 5
    assert compute_metrics(eager, exported, hausdorff=False)["AJI"] >= 1.0 - AJI_TOL


@pytest.mark.slow
@pytest.mark.real_data
def test_shipped_two_stage_zoo_model_scores_the_same_through_onnx(shared_data, tmp_path, monkeypatch):
    """The shipped, trained two_stage_unet-monuseg exported to ONNX: the same AJI as eager on a real Kumar tile."""
    from nuclei_d2 import model_zoo
    from nuclei_d2.engine.zoo_entry import score_records
    from nuclei_d2.utils.io import read_image_size

    monkeypatch.delenv(model_zoo.ZOO_ENV, raising=False)
    name = "two_stage_unet-monuseg"
    folder = export_from_config(None, "onnx", tmp_path / "export", model_name=name, opts=["MODEL.DEVICE", "cpu"])
    root = shared_data / "monuseg2018" / "train"
    path = next((root / "images").glob(f"{KUMAR_TEST_TILE}.*"))
    h, w = read_image_size(path)
    records = [{"file_name": str(path), "label_file": str(root / "labels" / f"{KUMAR_TEST_TILE}.png"),
                "image_id": KUMAR_TEST_TILE, "height": h, "width": w}]
    eager = score_records(model_zoo.get_config(name), model_zoo.get(name, device="cpu"), records)[0]
    cfg_x, model_x = _exported(folder, "onnxruntime", ["MODEL.DEVICE", "cpu"])
    onnx = score_records(cfg_x, model_x, records)[0]
    assert eager["AJI"] > 0.5  # a trained model (its card: 0.554 on this tile)
    assert onnx["AJI"] == pytest.approx(eager["AJI"], abs=AJI_TOL)
    # int8, calibrated on four kumar_train tiles (the tool's default count; never the scored tile): one tile's AJI
    # moves by a few thousandths either way (the mean over the 14 kumar_test tiles by -0.0001: docs/export.md, "int8")
    from nuclei_d2.data.datasets import KUMAR_SPLITS

    train = [next((root / "images").glob(f"{t}.*")) for t in KUMAR_SPLITS["kumar_train"][:4]]
    calib = tmp_path / "calib"
    calib.mkdir()
    for p in train:
        (calib / p.name).symlink_to(p)
    folder8 = export_from_config(None, "onnx", tmp_path / "int8", model_name=name, opts=["MODEL.DEVICE", "cpu"],
                                 quantize="int8", calibration=str(calib), calibration_count=4)
    cfg_8, model_8 = _exported(folder8, "onnxruntime", ["MODEL.DEVICE", "cpu"])
    assert score_records(cfg_8, model_8, records)[0]["AJI"] == pytest.approx(eager["AJI"], abs=INT8_AJI_TOL)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_networks_with_non_image_tensors_export_and_run(fmt, tmp_path):
    """The contract beyond dense maps (what detection heads need): shapes given in NetworkIO, any batch."""
    from nuclei_d2.export.exporter import export_network
    from nuclei_d2.export.runtime import ExportedNetwork, _onnx_runner, _torchscript_runner
    from nuclei_d2.modeling.networks import NetworkIO

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(6, 3)
            self.io = NetworkIO(inputs=("features",), outputs=("scores", "best"), channels=(6,), out_channels=(3, 1),
                                input_shapes=(("rois", 6),), output_shapes=(("rois", 3), ("rois",)))

        def export_examples(self):
            g = torch.Generator().manual_seed(0)
            return (torch.randn(4, 6, generator=g),), (torch.randn(9, 6, generator=g),)

        def forward(self, x):
            s = torch.softmax(self.fc(x), dim=1)
            return s, s.argmax(dim=1)

    head = Head().eval()
    spec = export_network(head, "head", tmp_path, fmt)
    assert spec["inputs"][0]["shape"] == ["rois", 6] and spec["outputs"][1]["shape"] == ["rois"]
    path = tmp_path / spec["file"]
    run = _onnx_runner(path, spec, 1) if fmt == "onnx" else _torchscript_runner(path)
    net = ExportedNetwork("head", spec, run, str(path))
    x = torch.randn(17, 6)
    scores, best = net(x)
    with torch.no_grad():
        want_scores, want_best = head(x)
    assert float((scores - want_scores).abs().max()) <= EXPORT_ATOL and torch.equal(best, want_best)
    with pytest.raises(ValueError, match="takes rois x 6, got"):
        net(torch.randn(2, 5))


# --- int8 quantisation (ONNX Runtime; nuclei_d2/export/quantize.py) ---


def _calibration_folder(folder: Path, rgb: np.ndarray, n: int = 2) -> Path:
    """A folder of ``n`` real image files (flipped copies of ``rgb``) to calibrate with."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.ascontiguousarray(rgb[:, ::-1] if i % 2 else rgb)).save(folder / f"calib{i}.png")
    return folder


@pytest.mark.real_data
def test_calibration_records_what_each_network_receives_and_restores_the_runtime(kumar_crop, tmp_path):
    """Calibration inputs are the real inputs of each network (after the mapper, tiling and padding), recorded
    through the runtime hook, which is uninstalled afterwards."""
    from nuclei_d2.engine.export import calibration_images, calibration_inputs

    config, opts = DENSE["two_stage_unet"]
    weights = _weights(config, opts, tmp_path)
    cfg, model = _eager(config, opts, weights)
    images = calibration_images(cfg, str(_calibration_folder(tmp_path / "calib", kumar_crop[0], n=3)), 2)
    assert [n for n, _ in images] == ["calib0.png", "calib1.png"]  # sorted, the first `count`
    seen: dict[str, list] = {}
    recorded = calibration_inputs(model, cfg, images)
    assert model.runtime is None  # eager again afterwards
    # the same images run eagerly with a spy: the recorded tensors are exactly the networks' inputs
    modules = model.network_modules()

    def spy(name: str):
        def run(*x):
            seen.setdefault(name, []).append(x)
            return modules[name](*x)
        return run

    model.set_runtime({n: spy(n) for n in modules})
    from nuclei_d2.data.mapper import NucleiDatasetMapper

    mapper = NucleiDatasetMapper(cfg, is_train=False)
    with torch.no_grad():
        for _, im in images:
            model([mapper({"image": im, "height": im.shape[0], "width": im.shape[1]})])
    assert set(recorded) == {"stage1", "stage2"}
    for name in recorded:
        assert len(recorded[name]) == len(seen[name]) > 0
        for a, b in zip(recorded[name], seen[name], strict=True):
            assert torch.equal(a[0], b[0])


def test_int8_requests_that_cannot_be_made_are_one_line_errors(tmp_path, capsys):
    from nuclei_d2.engine.export import calibration_images

    config, opts = DENSE["nb_unet"]
    weights = str(_weights(config, opts, tmp_path))
    with pytest.raises(ExportError, match="int8 quantisation is made for ONNX Runtime: use --format onnx"):
        export_from_config(str(CONFIGS / config), "torchscript", tmp_path / "x", weights=weights,
                           opts=["MODEL.DEVICE", "cpu"], quantize="int8", calibration=str(tmp_path))
    cfg = setup_cfg(str(CONFIGS / config), ["MODEL.DEVICE", "cpu"], eval_only=True)
    with pytest.raises(ConfigError, match="neither a folder of images nor a registered dataset"):
        calibration_images(cfg, str(tmp_path / "nowhere"), 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        calibration_images(cfg, str(tmp_path / "empty"), 2)
    rcnn = setup_cfg(str(CONFIGS / "maskrcnn_baseline-tiny.yaml"), ["MODEL.DEVICE", "cpu"], eval_only=True)
    with pytest.raises(ExportError, match="NucleiRCNN cannot be quantised to int8"):
        export_model(build_nuclei_model(rcnn), rcnn, tmp_path / "r", "onnx", quantize="int8",
                     calibration=[("a.png", np.zeros((64, 64, 3), np.uint8))])
    with pytest.raises(SystemExit):
        load_tool("export_model").main(["--config-file", str(CONFIGS / config), "--weights", weights, "--format",
                                        "torchscript", "--quantize", "int8", "--output", str(tmp_path / "t")])
    assert "--quantize int8 is for ONNX Runtime" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "model.pth"]  # nothing written


@pytest.mark.real_data
def test_int8_export_runs_like_eager_and_a_failed_check_writes_nothing(kumar_crop, tmp_path, monkeypatch):
    import onnx

    import nuclei_d2.export.quantize as quantize

    config, opts = DENSE["two_stage_unet"]
    rgb, _ = kumar_crop
    weights = _weights(config, opts, tmp_path)
    cfg, model = _eager(config, opts, weights)
    post = _post_opts("two_stage_unet", _predict(cfg, model, rgb)["probs"])
    cfg, model = _eager(config, [*opts, *post], weights)
    eager = _predict(cfg, model, rgb)
    calib = str(_calibration_folder(tmp_path / "calib", rgb))
    code = load_tool("export_model").main(["--config-file", str(CONFIGS / config), "--weights", str(weights),
                                           "--format", "onnx", "--quantize", "int8", "--calibration", calib,
                                           "--calibration-images", "2", "--output", str(tmp_path / "int8"),
                                           "MODEL.DEVICE", "cpu", *opts, *post])
    assert code == 0
    folder = tmp_path / "int8"
    sidecar = read_sidecar(folder)
    for name, spec in sidecar["networks"].items():
        q = spec["quantization"]
        assert q["type"] == "int8" and q["calibration_images"] == 2 and q["calibration_batches"] >= 1
        assert q["check"]["mean_abs_diff_of_range"] <= quantize.INT8_RELATIVE_TOLERANCE
        ops = {n.op_type for n in onnx.load(str(folder / spec["file"])).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, name  # really quantised
    cfg_x, model_x = _exported(folder, "onnxruntime")
    got = _predict(cfg_x, model_x, rgb)
    diff = (got["probs"] - eager["probs"]).abs()
    assert 0 < float(diff.max()) and float(diff.mean()) < 0.05  # int8: close, not equal
    label_e, label_x = eager["label_map"].numpy(), got["label_map"].numpy()
    assert label_e.max() >= 5
    # an untrained tiny model's maps hover around its threshold, so its label maps agree less than a trained one's
    # (the shipped model's AJI cost is measured in docs/export.md); still mostly the same nuclei
    assert compute_metrics(label_e, label_x, hausdorff=False)["AJI"] >= 0.5

    # the check after quantisation can fail: nothing is written, an existing export is kept whole
    before = (folder / SIDECAR).read_text()
    monkeypatch.setattr(quantize, "INT8_RELATIVE_TOLERANCE", 0.0)
    with pytest.raises(ExportError, match=r"int8 outputs differ from PyTorch's by .* of their range .*tolerance 0%"):
        export_from_config(str(CONFIGS / config), "onnx", folder, weights=str(weights), overwrite=True,
                           opts=["MODEL.DEVICE", "cpu", *opts, *post], quantize="int8", calibration=calib,
                           calibration_count=2)
    assert (folder / SIDECAR).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "int8", "model.pth"]


def test_int8_network_that_calibration_never_reached_stays_float32(tmp_path, monkeypatch):
    """A network the calibration images never fed (BRP-Net's refinement nets on images without proposals) is kept in
    float32, said in the sidecar and the log, instead of being quantised on nothing."""
    import onnx

    import nuclei_d2.engine.export as engine_export

    config, opts = DENSE["two_stage_unet"]
    cfg, model = _eager(config, opts, _weights(config, opts, tmp_path))
    record = engine_export.calibration_inputs

    def without_stage2(*args, **kwargs):
        out = record(*args, **kwargs)
        assert out["stage2"]  # it was reached; pretend it was not
        out["stage2"] = []
        return out

    monkeypatch.setattr(engine_export, "calibration_inputs", without_stage2)
    image = np.random.default_rng(0).integers(0, 256, (96, 112, 3), dtype=np.uint8)
    folder = export_model(model, cfg, tmp_path / "int8", "onnx", quantize="int8", calibration=[("noise", image)])
    nets = read_sidecar(folder)["networks"]
    assert nets["stage1"]["quantization"]["type"] == "int8"
    assert nets["stage2"]["quantization"] == {"type": "none", "reason": "no calibration inputs reached it"}
    ops = {n: {x.op_type for x in onnx.load(str(folder / s["file"])).graph.node} for n, s in nets.items()}
    assert "QuantizeLinear" in ops["stage1"] and "QuantizeLinear" not in ops["stage2"]
