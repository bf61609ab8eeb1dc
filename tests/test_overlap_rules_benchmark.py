"""benchmarks/overlap_rules.py: other ways to paint an R-CNN's overlapping masks, against the library's score rule."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from conftest import load_script, tiny_cfg

from nuclei_d2.structures import CropMasks

SYNTH = ("DATASETS.SYNTHETIC.IMAGE_SIZE", "128", "DATASETS.SYNTHETIC.NUM_TEST", "2")


def load_bench():
    return load_script("benchmarks/overlap_rules.py")


def two_touching() -> CropMasks:
    """Nucleus 0 (score 0.9) covers columns 0-5 weakly on its right; nucleus 1 (score 0.6) covers 4-9 and is sure of
    columns 4-5, which both claim."""
    m0 = np.tile(np.array([0.9, 0.9, 0.9, 0.9, 0.55, 0.55], np.float32), (4, 1))
    m1 = np.tile(np.array([0.95, 0.95, 0.9, 0.9, 0.9, 0.9], np.float32), (4, 1))
    return CropMasks((4, 10), [[0, 0, 6, 4], [4, 0, 10, 4]], [m0, m1], [0.9, 0.6], [0, 0])


def test_probability_rule_gives_contested_pixels_to_the_surer_mask_and_the_score_rule_to_the_better_score():
    bench = load_bench()
    nuclei = two_touching()
    by_score = nuclei.to_label_map(0.5)
    assert (by_score[:, 4:6] == 1).all()  # the library's rule: the better-scored nucleus takes the contact
    by_prob = bench.paint_by_probability(nuclei, 0.5)
    assert (by_prob[:, :4] == 1).all() and (by_prob[:, 4:] == 2).all()
    # weighted by score: 0.55 * 0.9 = 0.495 < 0.95 * 0.6 = 0.57, so nucleus 1 keeps the contact too
    assert (bench.paint_by_probability(nuclei, 0.5, weighted=True) == by_prob).all()
    # below the threshold a mask claims nothing, however it compares
    assert (bench.paint_by_probability(nuclei, 0.96) == 0).all()


def test_drop_small_and_holes_filled():
    bench = load_bench()
    label = np.zeros((6, 6), np.int32)
    label[0:3, 0:3], label[5, 5] = 4, 7
    assert (bench.drop_small(label, 2) == np.where(label == 7, 0, label)).all()
    ring = np.ones((5, 5), np.float32)
    ring[2, 2] = 0.0
    filled = bench.paint_holes_filled(CropMasks((5, 5), [[0, 0, 5, 5]], [ring], [0.9], [0]), 0.5)
    assert (filled == 1).all()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny random R-CNN run folder (config.yaml, model_final.pth) that keeps its hidden-nucleus filter on."""
    from nuclei_d2.modeling import build_nuclei_model

    cfg = tiny_cfg("maskrcnn_baseline-tiny.yaml", *SYNTH, "TEST.DETECTIONS_PER_IMAGE", "40",
                   "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.MIN_VISIBLE_FRACTION", "0.5")
    torch.manual_seed(4)
    root = tmp_path_factory.mktemp("run")
    torch.save({"model": build_nuclei_model(cfg).state_dict(), "iteration": 1}, root / "model_final.pth")
    (root / "config.yaml").write_text(cfg.dump())
    return root


def test_score_row_is_the_evaluators_numbers(run, tmp_path, capsys):
    """The benchmark's baseline row must be what tools/train_net.py --eval-only reports for the same model."""
    from nuclei_d2.checkpoint import NucleiCheckpointer
    from nuclei_d2.engine import NucleiTrainer
    from nuclei_d2.engine.defaults import setup_cfg
    from nuclei_d2.modeling import build_nuclei_model

    out_csv = tmp_path / "bench" / "rules.csv"
    assert load_bench().main(["--run", str(run), "--dataset", "nuclei_synth_test", "--min-areas", "5", "50",
                              "--output-csv", str(out_csv)]) == 0
    printed = capsys.readouterr().out
    with open(out_csv, newline="") as f:
        rows = {r["row"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["score", "probability", "probability x score", "holes filled", "min area 5", "min area 50"]
    assert "| probability x score" in printed

    cfg = setup_cfg(str(run / "config.yaml"), ["MODEL.WEIGHTS", str(run / "model_final.pth"), "OUTPUT_DIR",
                                               str(tmp_path / "eval"), "TEST.NUCLEI_EVAL.HAUSDORFF", "False",
                                               # no COCO AP: its evaluator would cache the dataset's COCO JSON in
                                               # this test's folder for the rest of the session
                                               "TEST.EVALUATORS", "('nuclei',)"],
                    eval_only=True)
    model = build_nuclei_model(cfg)
    NucleiCheckpointer.from_config(model, cfg).load(cfg.MODEL.WEIGHTS)
    NucleiTrainer.test(cfg, model.eval())
    with open(tmp_path / "eval" / "inference" / "nuclei_synth_test" / "nuclei_per_image.csv", newline="") as f:
        per_image = list(csv.DictReader(f))
    assert len(per_image) == 2
    for k in ("AJI", "PQ", "Dice1", "F1"):
        want = np.mean([float(r[k]) for r in per_image])
        assert float(rows["score"][k]) == pytest.approx(want, abs=1e-12), k
    assert float(rows["score"]["AJI_diff"]) == 0.0 and rows["score"]["images_better"] == "0/2"
    # a random model's nuclei are tiny: removing those under 50 pixels changes what is scored
    assert float(rows["min area 50"]["Dice1"]) != float(rows["score"]["Dice1"])


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--dataset", "x"])
    assert "give --run RUN_DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--run", str(tmp_path)])
    assert "not found" in capsys.readouterr().err
