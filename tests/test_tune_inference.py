"""tools/tune_inference.py: grid search of a model's inference settings on a training split."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIGS, load_tool

from nuclei_d2.engine import NucleiTrainer, setup_cfg
from nuclei_d2.engine.tune_inference import parse_grid, tune_inference, tuned_opts, write_tuned_config

main = load_tool("tune_inference").main

CLASSICAL = str(CONFIGS / "classical_watershed.yaml")  # no weights needed, and its threshold matters


def test_parse_grid_and_its_errors():
    assert parse_grid(["MODEL.NB.THRESHOLD=0.5, 0.7", "MODEL.NB.MIN_SIZE=0"]) == {
        "MODEL.NB.THRESHOLD": ["0.5", "0.7"], "MODEL.NB.MIN_SIZE": ["0"]}
    for bad in (["MODEL.NB.THRESHOLD"], ["MODEL.NB.THRESHOLD="], ["=0.5"], []):
        with pytest.raises(ValueError, match="--grid"):
            parse_grid(bad)
    with pytest.raises(ValueError, match="twice"):
        parse_grid(["A.B=1", "A.B=2"])
    # list values keep their commas (test-time copies to compare), quoted commas too
    assert parse_grid(["TEST.AUG.TRANSFORMS=['identity'], ['identity','hflip']", "X.Y='a,b',c"]) == {
        "TEST.AUG.TRANSFORMS": ["['identity']", "['identity','hflip']"], "X.Y": ["'a,b'", "c"]}


def test_best_row_is_what_the_written_config_evaluates_to(tmp_path):
    grid = {"MODEL.CLASSICAL.THRESHOLD_SCALE": ["0.6", "1.0", "1.6"]}
    seen = []
    rows = tune_inference(CLASSICAL, "nuclei_synth_test", grid, opts=["MODEL.DEVICE", "cpu"], max_images=1,
                          output_dir=str(tmp_path / "grid"), on_row=seen.append)
    assert len(rows) == len(seen) == 3
    assert [r["AJI"] for r in rows] == sorted((r["AJI"] for r in rows), reverse=True)
    assert len({round(r["AJI"], 6) for r in rows}) > 1  # the threshold changes the result
    assert all(r["n_images"] == 1 for r in rows)
    assert sorted((tmp_path / "grid").iterdir())[0].joinpath("metrics_final.json").is_file()

    path = write_tuned_config(tmp_path / "tuned.yaml", CLASSICAL, rows[0]["opts"], comment="test\nsecond line")
    cfg = setup_cfg(str(path), ["MODEL.DEVICE", "cpu", "DATASETS.TEST", "('nuclei_synth_test__first1',)",
                                "TEST.EVALUATORS", '["nuclei"]', "OUTPUT_DIR", str(tmp_path / "again")],
                    eval_only=True)
    assert cfg.MODEL.CLASSICAL.THRESHOLD_SCALE == float(rows[0]["MODEL.CLASSICAL.THRESHOLD_SCALE"])
    assert cfg.MODEL.CLASSICAL.MIN_SIZE == setup_cfg(CLASSICAL, eval_only=True).MODEL.CLASSICAL.MIN_SIZE  # inherited
    again = NucleiTrainer.test(cfg, NucleiTrainer.build_model(cfg))["nuclei"]
    assert again["AJI"] == pytest.approx(rows[0]["AJI"])


def test_checkpoint_is_loaded_for_every_grid_point(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer

    config = str(CONFIGS / "two_stage_unet_stage2-tiny.yaml")
    no_stage1 = ["MODEL.TWO_STAGE.STAGE1.WEIGHTS", ""]  # the whole model comes from the checkpoint
    cfg = setup_cfg(config, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *no_stage1], eval_only=True)
    DetectionCheckpointer(NucleiTrainer.build_model(cfg), save_dir=str(tmp_path)).save("random")
    rows = tune_inference(config, "nuclei_synth_test", {"MODEL.TWO_STAGE.DILATE": ["0", "1"]},
                          weights=str(tmp_path / "random.pth"), opts=["MODEL.DEVICE", "cpu", *no_stage1],
                          max_images=1, output_dir=str(tmp_path / "grid"))
    assert len(rows) == 2 and all("MODEL.WEIGHTS" not in r["opts"] for r in rows)
    with pytest.raises(Exception, match="missing.pth"):
        tune_inference(config, "nuclei_synth_test", {"MODEL.TWO_STAGE.DILATE": ["0"]},
                       weights=str(tmp_path / "missing.pth"), opts=["MODEL.DEVICE", "cpu", *no_stage1], max_images=1,
                       output_dir=str(tmp_path / "grid2"))


def test_tool_prints_the_table_writes_the_config_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "tuned.yaml"
    rc = main(["--config-file", CLASSICAL, "--dataset", "nuclei_synth_test", "--max-images", "1", "--grid",
               "MODEL.CLASSICAL.THRESHOLD_SCALE=0.8,1.2", "--output", str(out), "MODEL.DEVICE", "cpu",
               "MODEL.CLASSICAL.MIN_SIZE", "7",
               "OUTPUT_DIR", str(tmp_path / "runs")])  # the grid's metrics: not into the clone's output/
    assert rc == 0
    printed = capsys.readouterr().out
    assert "2 settings on 1 image of nuclei_synth_test" in printed and str(out) in printed
    assert "THRESHOLD_SCALE" in out.read_text() and "_BASE_" in out.read_text()
    # the user's overrides are part of what was tuned (a tuned TTA set needs TEST.AUG.ENABLED), where it ran is not
    tuned = setup_cfg(str(out), [], eval_only=True)
    assert tuned.MODEL.CLASSICAL.MIN_SIZE == 7 and "runs" not in tuned.OUTPUT_DIR
    assert tuned.MODEL.CLASSICAL.THRESHOLD_SCALE in (0.8, 1.2)
    assert tuned_opts(["TEST.AUG.ENABLED", "True", "OUTPUT_DIR", "x", "TEST.MERGE.MIN_VOTES", "2"], "w.pth",
                      ["TEST.MERGE.MIN_VOTES", "3"]) == ["TEST.AUG.ENABLED", "True", "TEST.MERGE.MIN_VOTES", "2",
                                                         "MODEL.WEIGHTS", "w.pth", "TEST.MERGE.MIN_VOTES", "3"]

    assert main(["--config-file", CLASSICAL, "--dataset", "nuclei_synth_test", "--grid", "MODEL.NO_SUCH=1"]) == 2
    assert "NO_SUCH" in capsys.readouterr().err
    assert main(["--config-file", CLASSICAL, "--dataset", "no_such_dataset", "--grid", "MODEL.CLASSICAL.MIN_SIZE=5"]
                ) == 2
    assert "no_such_dataset" in capsys.readouterr().err
    assert main(["--config-file", CLASSICAL, "--grid", "MODEL.CLASSICAL.MIN_SIZE"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["--config-file", CLASSICAL, "--dataset", "nuclei_synth_test", "--max-images", "1", "--grid",
                 "MODEL.CLASSICAL.MIN_SIZE=5", "--metric", "NOPE", "OUTPUT_DIR", str(tmp_path / "runs")]) == 2
    assert "NOPE" in capsys.readouterr().err
    assert not (tmp_path / "other.yaml").exists()


def test_tool_takes_weights_for_a_config_whose_own_weights_do_not_exist(tmp_path, capsys):
    from detectron2.checkpoint import DetectionCheckpointer

    config = str(CONFIGS / "two_stage_unet_stage2-cpu.yaml")  # STAGE1.WEIGHTS: ./output/... (not there)
    no_stage1 = ["MODEL.TWO_STAGE.STAGE1.WEIGHTS", ""]  # the whole model comes from the checkpoint
    cfg = setup_cfg(config, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *no_stage1], eval_only=True)
    DetectionCheckpointer(NucleiTrainer.build_model(cfg), save_dir=str(tmp_path)).save("random")
    assert main(["--config-file", config, "--dataset", "nuclei_synth_test", "--max-images", "1", "--grid",
                 "MODEL.TWO_STAGE.DILATE=1", "--output", str(tmp_path / "t.yaml"), "MODEL.DEVICE", "cpu"]) == 2
    assert "STAGE1.WEIGHTS: weights file not found" in capsys.readouterr().err
    assert main(["--config-file", config, "--weights", str(tmp_path / "random.pth"), "--dataset",
                 "nuclei_synth_test", "--max-images", "1", "--grid", "MODEL.TWO_STAGE.DILATE=1", "--output",
                 str(tmp_path / "t.yaml"), "MODEL.DEVICE", "cpu", *no_stage1, "MODEL.TILING.PATCH_SIZE", "128",
                 "MODEL.TILING.STRIDE", "96", "OUTPUT_DIR", str(tmp_path / "runs")]) == 0
    assert "DILATE: 1.0" in (tmp_path / "t.yaml").read_text()



def _random_checkpoint(config: str, path) -> str:
    from detectron2.checkpoint import DetectionCheckpointer

    cfg = setup_cfg(config, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""], eval_only=True)
    torch.manual_seed(0)
    DetectionCheckpointer(NucleiTrainer.build_model(cfg), save_dir=str(path)).save("random")
    return str(path / "random.pth")


def _count_dense_passes(monkeypatch) -> list[int]:
    """Counts the dense models' forward passes over a whole image (predict_probs calls)."""
    from nuclei_d2.modeling.dense_base import DenseSegmentor

    calls, original = [0], DenseSegmentor.predict_probs

    def counting(self, image):
        calls[0] += 1
        return original(self, image)

    monkeypatch.setattr(DenseSegmentor, "predict_probs", counting)
    return calls


def _grid_both_ways(config, grid, opts, tmp_path, calls, max_images, weights=""):
    """``tune_inference`` with and without reuse: ``{reuse: (passes counted in calls[0], {opts: row})}``, after
    checking that both score every point the same."""
    runs = {}
    for reuse in (True, False):
        calls[0] = 0
        rows = tune_inference(config, "nuclei_synth_test", grid, weights=weights, opts=opts, max_images=max_images,
                              output_dir=str(tmp_path / f"grid{reuse}"), reuse_maps=reuse)
        runs[reuse] = (calls[0], {tuple(r["opts"]): r for r in rows})
    reused, full = runs[True][1], runs[False][1]
    assert reused.keys() == full.keys()
    for point, row in full.items():
        for k in ("AJI", "PQ", "Dice1", "F1", "n_images"):
            assert reused[point][k] == pytest.approx(row[k], abs=1e-9), (point, k)
    return runs


@pytest.mark.parametrize("tta", [False, True], ids=["bare", "tta-probs"])
def test_post_processing_grid_computes_the_maps_once_with_the_same_numbers(tmp_path, monkeypatch, tta):
    config = str(CONFIGS / "nb_unet-tiny.yaml")
    weights = _random_checkpoint(config, tmp_path)
    opts = ["MODEL.DEVICE", "cpu"]
    copies = 1
    if tta:  # two copies whose maps are averaged: the cache holds the averaged maps
        opts += ["TEST.AUG.ENABLED", "True", "TEST.AUG.TRANSFORMS", "['identity','hflip']", "TEST.MERGE.MODE", "probs"]
        copies = 2
    grid = {"MODEL.NB.THRESHOLD": ["0.3", "0.34", "0.36"], "MODEL.NB.MIN_SIZE": ["0", "30"]}
    calls = _count_dense_passes(monkeypatch)
    runs = _grid_both_ways(config, grid, opts, tmp_path, calls, 2, weights)
    assert runs[True][0] == 2 * copies and runs[False][0] == 6 * 2 * copies
    full = runs[False][1]
    assert len(full) == 6
    assert len({round(r["AJI"], 6) for r in full.values()}) > 1  # the settings do change the result


def test_maps_are_recomputed_when_the_grid_changes_more_than_post_processing(tmp_path, monkeypatch):
    from nuclei_d2.engine.tune_inference import maps_reusable
    from nuclei_d2.inference.test_time import build_test_time_wrapper

    config = str(CONFIGS / "nb_unet-tiny.yaml")
    weights = _random_checkpoint(config, tmp_path)
    calls = _count_dense_passes(monkeypatch)
    tune_inference(config, "nuclei_synth_test", {"MODEL.NB.THRESHOLD": ["0.3", "0.4"], "MODEL.TILING.STRIDE": ["48"]},
                   weights=weights, opts=["MODEL.DEVICE", "cpu"], max_images=2, output_dir=str(tmp_path / "g"))
    assert calls[0] == 2 * 2  # the tiling key changes the maps: every point runs the network

    cfg = setup_cfg(config, ["MODEL.DEVICE", "cpu"], eval_only=True)
    model = NucleiTrainer.build_model(cfg)
    assert maps_reusable(model, ["MODEL.NB.THRESHOLD", "TEST.NUCLEI_EVAL.IOU_THRESHOLD"])
    assert not maps_reusable(model, ["MODEL.NB.THRESHOLD", "MODEL.UNET.DROPOUT"])
    voted = setup_cfg(config, ["MODEL.DEVICE", "cpu", "TEST.AUG.ENABLED", "True", "TEST.MERGE.MODE", "instances"],
                      eval_only=True)
    assert not maps_reusable(build_test_time_wrapper(voted, model), ["MODEL.NB.THRESHOLD"])  # votes on nuclei
    classical = NucleiTrainer.build_model(setup_cfg(CLASSICAL, ["MODEL.DEVICE", "cpu"], eval_only=True))
    assert maps_reusable(classical, ["MODEL.CLASSICAL.THRESHOLD_SCALE", "MODEL.CLASSICAL.MIN_SIZE"])
    assert not maps_reusable(classical, ["MODEL.CLASSICAL.THRESHOLD_SCALE", "MODEL.CLASSICAL.SMOOTHING"])  # the maps


def test_copy_grid_of_an_rcnn_predicts_each_copy_once_with_the_same_numbers(tmp_path, monkeypatch):
    # Mask R-CNN+ (random weights, every detection kept) with its test-time copies merged as nuclei: a grid over the
    # copy sets and the vote predicts the union of the copies once per image, and scores every point as full
    # inference does.
    import nuclei_d2.inference.test_time as test_time
    from nuclei_d2.engine.tune_inference import copies_reusable
    from nuclei_d2.inference.test_time import build_test_time_wrapper

    config = str(CONFIGS / "maskrcnn_plus-tiny.yaml")
    weights = _random_checkpoint(config, tmp_path)
    opts = ["MODEL.DEVICE", "cpu", "TEST.AUG.ENABLED", "True", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    grid = {"TEST.AUG.TRANSFORMS": ["['identity','hflip']", "['identity','hflip','scale:1.5']"],
            "TEST.MERGE.MIN_VOTES": ["1", "2"]}
    calls, original = [0], test_time.predict_crops

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(test_time, "predict_crops", counting)
    runs = _grid_both_ways(config, grid, opts, tmp_path, calls, 1, weights)
    assert runs[True][0] == 3 and runs[False][0] == 2 + 2 + 3 + 3
    full = runs[False][1]
    assert len(full) == 4
    assert len({round(r["F1"], 6) for r in full.values()}) > 1  # the settings do change the result

    cfg = setup_cfg(config, [*opts], eval_only=True)
    wrapper = build_test_time_wrapper(cfg, NucleiTrainer.build_model(cfg))
    assert copies_reusable(wrapper, ["TEST.AUG.TRANSFORMS", "TEST.MERGE.MIN_VOTES", "TEST.NUCLEI_EVAL.IOU_THRESHOLD"])
    assert not copies_reusable(wrapper, ["TEST.AUG.TRANSFORMS", "MODEL.ROI_HEADS.SCORE_THRESH_TEST"])  # the copies
    assert not copies_reusable(NucleiTrainer.build_model(cfg), ["TEST.MERGE.MIN_VOTES"])  # no wrapper


def test_classical_grid_computes_the_haematoxylin_once_with_the_same_numbers(tmp_path, monkeypatch):
    """The classical floor's maps (its colour deconvolution) are made once per image for a grid over its
    post-processing keys, and every row is the same as with full inference at every point."""
    from nuclei_d2.modeling.classical_watershed import ClassicalWatershed

    calls, original = [0], ClassicalWatershed.hematoxylin_maps

    def counting(self, image):
        calls[0] += 1
        return original(self, image)

    monkeypatch.setattr(ClassicalWatershed, "hematoxylin_maps", counting)
    grid = {"MODEL.CLASSICAL.THRESHOLD_SCALE": ["0.8", "1.2"], "MODEL.CLASSICAL.SIGMA_FACTOR": ["0.25", "0.75"],
            "MODEL.CLASSICAL.MIN_SIZE": ["10", "60"]}
    runs = {}
    for reuse in (True, False):
        calls[0] = 0
        rows = tune_inference(CLASSICAL, "nuclei_synth_test", grid, opts=["MODEL.DEVICE", "cpu"], max_images=2,
                              output_dir=str(tmp_path / f"grid{reuse}"), reuse_maps=reuse)
        runs[reuse] = (calls[0], rows)
    assert runs[True][0] == 2 and runs[False][0] == 8 * 2
    reused, full = runs[True][1], runs[False][1]
    assert [r["opts"] for r in reused] == [r["opts"] for r in full]  # the same order, so the same best point
    for a, b in zip(reused, full, strict=True):
        assert a.keys() == b.keys()
        numbers = [k for k, v in b.items() if isinstance(v, (int, float))]  # exactly equal (NaN: both NaN)
        assert {k: a[k] for k in numbers} == pytest.approx({k: b[k] for k in numbers}, rel=0, abs=0, nan_ok=True)
    assert len({round(r["AJI"], 6) for r in full}) > 1  # the settings do change the result
