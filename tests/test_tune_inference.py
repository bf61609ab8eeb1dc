"""tools/tune_inference.py: grid search of a model's inference settings on a training split."""

from __future__ import annotations

import pytest
from conftest import CONFIGS

from nuclei_d2.engine import NucleiTrainer, setup_cfg
from nuclei_d2.engine.tune_inference import main, parse_grid, tune_inference, write_tuned_config

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
    cfg = setup_cfg(config, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""], eval_only=True)
    DetectionCheckpointer(NucleiTrainer.build_model(cfg), save_dir=str(tmp_path)).save("random")
    rows = tune_inference(config, "nuclei_synth_test", {"MODEL.TWO_STAGE.DILATE": ["0", "1"]},
                          weights=str(tmp_path / "random.pth"), opts=["MODEL.DEVICE", "cpu"], max_images=1,
                          output_dir=str(tmp_path / "grid"))
    assert len(rows) == 2 and all("MODEL.WEIGHTS" not in r["opts"] for r in rows)
    with pytest.raises(Exception, match="missing.pth"):
        tune_inference(config, "nuclei_synth_test", {"MODEL.TWO_STAGE.DILATE": ["0"]},
                       weights=str(tmp_path / "missing.pth"), opts=["MODEL.DEVICE", "cpu"], max_images=1,
                       output_dir=str(tmp_path / "grid2"))


def test_tool_prints_the_table_writes_the_config_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "tuned.yaml"
    rc = main(["--config-file", CLASSICAL, "--dataset", "nuclei_synth_test", "--max-images", "1", "--grid",
               "MODEL.CLASSICAL.THRESHOLD_SCALE=0.8,1.2", "--output", str(out), "MODEL.DEVICE", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "2 settings on 1 image of nuclei_synth_test" in printed and str(out) in printed
    assert "THRESHOLD_SCALE" in out.read_text() and "_BASE_" in out.read_text()

    assert main(["--config-file", CLASSICAL, "--dataset", "nuclei_synth_test", "--grid", "MODEL.NO_SUCH=1"]) == 2
    assert "NO_SUCH" in capsys.readouterr().err
    assert main(["--config-file", CLASSICAL, "--dataset", "no_such_dataset", "--grid", "MODEL.CLASSICAL.MIN_SIZE=5"]
                ) == 2
    assert "no_such_dataset" in capsys.readouterr().err
    assert main(["--config-file", CLASSICAL, "--grid", "MODEL.CLASSICAL.MIN_SIZE"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["--config-file", CLASSICAL, "--dataset", "nuclei_synth_test", "--max-images", "1", "--metric",
                 "NOPE", "--grid", "MODEL.CLASSICAL.MIN_SIZE=5"]) == 2
    assert "NOPE" in capsys.readouterr().err
    assert not (tmp_path / "other.yaml").exists()


def test_tool_takes_weights_for_a_config_whose_own_weights_do_not_exist(tmp_path, capsys):
    from detectron2.checkpoint import DetectionCheckpointer

    config = str(CONFIGS / "two_stage_unet_stage2-cpu.yaml")  # MODEL.WEIGHTS: ./output/... (not there)
    cfg = setup_cfg(config, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""], eval_only=True)
    DetectionCheckpointer(NucleiTrainer.build_model(cfg), save_dir=str(tmp_path)).save("random")
    assert main(["--config-file", config, "--dataset", "nuclei_synth_test", "--max-images", "1", "--grid",
                 "MODEL.TWO_STAGE.DILATE=1", "--output", str(tmp_path / "t.yaml"), "MODEL.DEVICE", "cpu"]) == 2
    assert "MODEL.WEIGHTS" in capsys.readouterr().err
    assert main(["--config-file", config, "--weights", str(tmp_path / "random.pth"), "--dataset",
                 "nuclei_synth_test", "--max-images", "1", "--grid", "MODEL.TWO_STAGE.DILATE=1", "--output",
                 str(tmp_path / "t.yaml"), "MODEL.DEVICE", "cpu", "MODEL.TILING.PATCH_SIZE", "128",
                 "MODEL.TILING.STRIDE", "96"]) == 0
    assert "DILATE: 1.0" in (tmp_path / "t.yaml").read_text()

