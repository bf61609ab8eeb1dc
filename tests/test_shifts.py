"""Test-time appearance shifts (nuclei_d2/data/shifts.py), INPUT.TEST_SHIFT in the mapper, benchmarks/robustness.py."""

from __future__ import annotations

import csv
import json
import pickle

import cv2
import numpy as np
import pytest
from conftest import REPO, load_script
from detectron2.config import get_cfg

from nuclei_d2.config import add_nuclei_config
from nuclei_d2.data.mapper import NucleiDatasetMapper
from nuclei_d2.data.shifts import (
    SCANNER_PROFILES,
    SHIFT_KINDS,
    STRONG_SHIFTS,
    ShiftTransform,
    apply_shift,
    parse_shift,
)
from nuclei_d2.data.synthetic import make_synthetic_tile
from nuclei_d2.stain import StainNormalizer, color_deconvolution
from nuclei_d2.utils.io import read_image_rgb


@pytest.fixture(scope="module")
def tile() -> tuple[np.ndarray, np.ndarray]:
    return make_synthetic_tile(128, 3)


def _high_freq(image: np.ndarray) -> float:
    """Mean absolute Laplacian of the grey image: the fine detail a blur removes."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return float(np.abs(cv2.Laplacian(grey, cv2.CV_32F)).mean())


@pytest.mark.parametrize("name", [*STRONG_SHIFTS, "noise:8", "none"])
def test_every_shift_keeps_shape_dtype_input_and_is_deterministic(tile, name):
    image = tile[0]
    before = image.copy()
    a, b = apply_shift(image, name), apply_shift(image, name)
    assert a.shape == image.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)  # deterministic
    np.testing.assert_array_equal(image, before)  # the input is not modified
    assert a is not image
    if name != "none":
        assert np.abs(a.astype(int) - image).mean() > 0.5, f"{name} barely changes the image"


@pytest.mark.parametrize("name", ["hematoxylin:1", "eosin:1", "blur:0", "lowmag:1", "noise:0", "none", ""])
def test_identity_strengths_give_the_same_image(tile, name):
    np.testing.assert_array_equal(apply_shift(tile[0], name), tile[0])


def test_stain_shifts_move_their_own_stain(tile):
    image, label = tile
    c0 = color_deconvolution(image)
    nuclei = label > 0
    for shift, stain, up in (("hematoxylin:1.5", 0, True), ("hematoxylin:0.6", 0, False),
                             ("eosin:1.5", 1, True), ("eosin:0.6", 1, False)):
        c = color_deconvolution(apply_shift(image, shift))
        region = nuclei if stain == 0 else ~nuclei
        ratio = c[..., stain][region].mean() / c0[..., stain][region].mean()
        assert (ratio > 1.3) if up else (ratio < 0.75), (shift, ratio)
        other = 1 - stain  # the other stain stays (rounding to uint8 moves it a little)
        assert abs(c[..., other].mean() - c0[..., other].mean()) < 0.02, shift


def test_hematoxylin_shift_on_a_real_monuseg_crop(shared_data):
    image = read_image_rgb(next(iter(sorted((shared_data / "monuseg2018" / "train" / "images").glob("*.tif")))))
    crop = np.ascontiguousarray(image[:256, :256])
    h0 = color_deconvolution(crop)[..., 0].mean()
    assert color_deconvolution(apply_shift(crop, "hematoxylin:1.5"))[..., 0].mean() > 1.3 * h0
    assert color_deconvolution(apply_shift(crop, "hematoxylin:0.6"))[..., 0].mean() < 0.75 * h0


def test_blur_and_lowmag_remove_detail_jpeg_and_noise_add_error(tile):
    image = tile[0]
    hf = _high_freq(image)
    assert _high_freq(apply_shift(image, "blur:2")) < _high_freq(apply_shift(image, "blur:1")) < 0.8 * hf
    low = apply_shift(image, "lowmag:2")
    assert _high_freq(low) < 0.8 * hf
    assert abs(low.astype(float).mean() - image.mean()) < 1.0  # brightness kept: only detail goes
    err = {q: np.abs(apply_shift(image, f"jpeg:{q}").astype(int) - image).mean() for q in (30, 90)}
    assert err[30] > err[90] > 0
    noisy = apply_shift(image, "noise:8").astype(float) - image
    assert 6.0 < noisy.std() < 8.5  # clipping at 0/255 trims it a little


def test_scanner_profiles_differ_from_the_image_and_each_other(tile):
    image = tile[0]
    out = {p: apply_shift(image, f"scanner:{p}") for p in SCANNER_PROFILES}
    for p, o in out.items():
        assert np.abs(o.astype(int) - image).mean() > 4, p
    names = list(out)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert np.abs(out[names[i]].astype(int) - out[names[j]]).mean() > 4, (names[i], names[j])
    white = np.full((4, 4, 3), 255, np.uint8)  # the background takes the profile's white point
    for p, prof in SCANNER_PROFILES.items():
        np.testing.assert_allclose(apply_shift(white, f"scanner:{p}")[0, 0], np.array(prof.white) * 255, atol=1)


@pytest.mark.parametrize("text, message", [
    ("sharpen:2", "unknown shift 'sharpen:2'; known: hematoxylin, eosin, scanner, blur, jpeg, lowmag, noise"),
    ("blur", "shift 'blur' needs a strength, as blur:<strength>"),
    ("blur:x", "shift 'blur:x': strength must be a number >= 0, got 'x'"),
    ("blur:-1", "strength must be a number >= 0"),
    ("jpeg:0", "strength must be an integer in [1, 100]"),
    ("jpeg:30.5", "strength must be an integer in [1, 100]"),
    ("lowmag:0.5", "strength must be a number >= 1"),
    ("hematoxylin:nan", "strength must be a number >= 0"),
    ("scanner:leica", "unknown scanner profile 'leica'; known: hamamatsu-like, aperio-like, 3dhistech-like"),
])
def test_parser_errors_are_one_line_and_list_what_is_known(text, message):
    with pytest.raises(ValueError) as e:
        parse_shift(text)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_parser_reads_names_and_every_kind_is_documented():
    s = parse_shift(" Blur:2 ")
    assert (s.kind, s.strength, s.name) == ("blur", 2.0, "blur:2")
    assert parse_shift("jpeg:30").strength == 30 and parse_shift("scanner:aperio-like").strength == "aperio-like"
    doc = (REPO / "docs" / "robustness.md").read_text()
    for kind in SHIFT_KINDS:
        assert f"`{kind}" in doc, f"docs/robustness.md does not describe the shift {kind!r}"
    for name in STRONG_SHIFTS:
        assert f"`{name}`" in doc, f"docs/robustness.md does not list the default shift {name!r}"


def _cfg(**input_nuclei):
    cfg = get_cfg()
    add_nuclei_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN = (0,)
    cfg.INPUT.MIN_SIZE_TEST = 0
    cfg.INPUT.EXTRA_CHANNELS = ["hematoxylin"]
    cfg.INPUT.FORMAT = "RGB"
    for k, v in input_nuclei.items():
        cfg.INPUT.NUCLEI[k] = v
    return cfg


def _mapped(cfg, image, is_train=False) -> np.ndarray:
    out = NucleiDatasetMapper(cfg, is_train=is_train)({"image": image, "height": image.shape[0],
                                                       "width": image.shape[1], "image_id": 0})
    return out["image"].numpy()


def test_test_shift_is_applied_by_the_inference_mapper_before_extra_channels_and_normalisation(tile, tmp_path):
    image = tile[0]
    cfg = _cfg()
    plain = _mapped(cfg, image)
    cfg.INPUT.TEST_SHIFT = "hematoxylin:0.5"
    shifted = _mapped(cfg, image)
    np.testing.assert_array_equal(shifted[:3].transpose(1, 2, 0), apply_shift(image, "hematoxylin:0.5"))
    assert shifted[3].mean() < 0.7 * plain[3].mean()  # the haematoxylin channel is computed from the shifted image
    # Training never sees the shift (INPUT.TEST_SHIFT is a test-time measurement).
    cfg.INPUT.NUCLEI.FLIP = cfg.INPUT.NUCLEI.ROT90 = False
    np.testing.assert_array_equal(_mapped(cfg, image, is_train=True), plain)

    # With stain normalisation at inference, the shift comes first, so the normaliser undoes most of it.
    ref = tmp_path / "ref.json"
    StainNormalizer("macenko").fit(image).save(ref)
    norm = _cfg(STAIN_NORM="macenko", STAIN_REFERENCE=str(ref))
    base = _mapped(norm, image)[:3]
    norm.INPUT.TEST_SHIFT = "hematoxylin:0.5"
    undone = _mapped(norm, image)[:3]
    assert np.abs(undone - base).mean() < 0.5 * np.abs(shifted[:3] - plain[:3]).mean()


def test_shift_transform_pickles_and_leaves_labels(tile):
    t = pickle.loads(pickle.dumps(ShiftTransform("jpeg:30")))
    np.testing.assert_array_equal(t.apply_image(tile[0]), apply_shift(tile[0], "jpeg:30"))
    np.testing.assert_array_equal(t.apply_segmentation(tile[1]), tile[1])


# ---- benchmarks/robustness.py ---------------------------------------------------------------------------------


def _benchmark():
    return load_script("benchmarks/robustness.py")


CLASSICAL = str(REPO / "configs" / "classical_watershed.yaml")


def test_robustness_benchmark_end_to_end_on_the_classical_floor(tmp_path, capsys):
    out = tmp_path / "robust"
    rc = _benchmark().main(["--config-file", CLASSICAL, "--dataset", "nuclei_synth_test", "--shifts", "none",
                            "hematoxylin:1", "blur:3", "--output-dir", str(out), "--save-examples",
                            "DATASETS.SYNTHETIC.IMAGE_SIZE", "128", "TEST.NUCLEI_EVAL.HAUSDORFF", "False"])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "robustness.csv")))
    assert [r["shift"] for r in rows] == ["none", "hematoxylin:1", "blur:3"]  # "none" once, first
    result = json.loads((out / "robustness.json").read_text())
    assert result["complete"] and result["tiles"] == 2 and [r["shift"] for r in result["rows"]] == ["none",
                                                                                                       "hematoxylin:1",
                                                                                                       "blur:3"]
    aji = {r["shift"]: float(r["AJI"]) for r in rows}
    assert aji["hematoxylin:1"] == aji["none"]  # the identity strength changes nothing
    assert aji["blur:3"] < aji["none"] - 0.03 and rows[2]["loses_more_than_0.03"] == "True"
    assert float(rows[2]["dAJI"]) == pytest.approx(aji["blur:3"] - aji["none"])
    table = capsys.readouterr().out
    lines = [ln for ln in table.splitlines() if ln.split() and ln.split()[0] in aji]
    assert len(lines) == 3 and "LOSES > 0.03" in lines[2] and "LOSES" not in lines[0]
    assert "AJI new organ" in table and "s/tile" in table
    strip = cv2.imread(str(out / "robustness_examples.png"))
    assert strip is not None and strip.shape[1] >= 3 * 128


@pytest.mark.parametrize("args, message", [
    (["--shifts", "blur:x"], "error: shift 'blur:x': strength must be a number >= 0, got 'x'"),
    (["--dataset", "kumar_tset"], "error: DATASETS.TEST: dataset 'kumar_tset' is not registered."),
])
def test_robustness_benchmark_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "robust"
    rc = _benchmark().main(["--config-file", CLASSICAL, "--dataset", "nuclei_synth_test", "--output-dir", str(out),
                            *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(message) and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_robustness_benchmark_an_option_after_the_overrides_is_named(tmp_path, capsys):
    # argparse hands everything after the first KEY to the overrides: an option there is a misplaced option,
    # said so, not "unknown config key '--shifts'" after the model was built
    with pytest.raises(SystemExit) as exc:
        _benchmark().main(["--config-file", CLASSICAL, "--output-dir", str(tmp_path / "robust"), "TEST.AUG.ENABLED",
                           "False", "--shifts", "blur:2"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and err.endswith("option --shifts after the config overrides: give the KEY VALUE "
                                                "overrides last")
    assert not (tmp_path / "robust").exists()
