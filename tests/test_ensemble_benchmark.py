"""benchmarks/ensemble.py: checkpoints alone and as ensembles in one table, member predictions computed once; the
cross-method map averaging of TEST.MERGE.MODE "shared" (nuclei_d2/inference/test_time.py)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, load_script, tiny_cfg
from torch import nn

from nuclei_d2.inference.test_time import TestTimeWrapper
from nuclei_d2.inference.tta import parse_tta_transforms
from nuclei_d2.modeling.dense_base import DenseSegmentor

BENCH = REPO / "benchmarks" / "ensemble.py"
#: Every member sees the same two 128 px synthetic test images.
SYNTH = ("DATASETS.SYNTHETIC.IMAGE_SIZE", "128", "DATASETS.SYNTHETIC.NUM_TEST", "2")
METRICS = ("AJI", "PQ", "Dice1", "F1")


def load_bench():
    return load_script("benchmarks/ensemble.py")


def make_run(root: Path, name: str, config: str, *opts: str, seed: int = 0) -> Path:
    """A run folder as tools/train_net.py leaves it (config.yaml, model_final.pth), with random weights."""
    from nuclei_d2.modeling import build_nuclei_model

    cfg = tiny_cfg(config, *SYNTH, *opts)
    torch.manual_seed(seed)
    model = build_nuclei_model(cfg)
    run = root / name
    run.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "iteration": 1}, run / "model_final.pth")
    (run / "config.yaml").write_text(cfg.dump())
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        # at most 20 detections of a random R-CNN: a fast vote
        "rcnn": make_run(root, "rcnn", "maskrcnn_baseline-tiny.yaml", "TEST.DETECTIONS_PER_IMAGE", "20", seed=1),
        # a random NB U-Net's "inside" hovers around 1/3
        "nb": make_run(root, "nb", "nb_unet-tiny.yaml", "MODEL.NB.THRESHOLD", "0.3", seed=2),
        # two test-time copies, maps averaged
        "ts": make_run(root, "ts", "two_stage_unet-tiny.yaml", "TEST.AUG.ENABLED", "True", "TEST.AUG.TRANSFORMS",
                       "['identity', 'hflip']", "TEST.MERGE.MODE", "probs", seed=3),
    }


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def reference_per_image(tmp: Path, runs: dict[str, Path], members: list[str], merge: str, min_votes: int) -> list:
    """Per-image metrics of the ensemble through tools/train_net.py --eval-only's path: the first member's config
    with the others in TEST.ENSEMBLE (build_test_time_wrapper inside NucleiTrainer.test)."""
    from nuclei_d2.checkpoint import NucleiCheckpointer
    from nuclei_d2.engine import NucleiTrainer
    from nuclei_d2.engine.defaults import setup_cfg
    from nuclei_d2.modeling import build_nuclei_model

    first, others = runs[members[0]], [runs[m] for m in members[1:]]
    out = tmp / ("ref_" + "+".join(members))
    cfg = setup_cfg(str(first / "config.yaml"), [
        "MODEL.WEIGHTS", str(first / "model_final.pth"), "OUTPUT_DIR", str(out), "TEST.NUCLEI_EVAL.HAUSDORFF", "False",
        "TEST.ENSEMBLE.WEIGHTS", str([str(o / "model_final.pth") for o in others]),
        "TEST.ENSEMBLE.CONFIGS", str([str(o / "config.yaml") for o in others]),
        "TEST.MERGE.MODE", merge, "TEST.MERGE.MIN_VOTES", str(min_votes)], eval_only=True)
    model = build_nuclei_model(cfg)
    NucleiCheckpointer.from_config(model, cfg).load(cfg.MODEL.WEIGHTS)
    NucleiTrainer.test(cfg, model.eval())
    return read_csv(out / "inference" / "nuclei_synth_test" / "nuclei_per_image.csv")


def assert_same_metrics(got: list[dict[str, str]], want: list[dict[str, str]]) -> None:
    assert [r["image"] for r in got] == [r["image"] for r in want]
    for g, w in zip(got, want):
        assert {k: g[k] for k in METRICS} == {k: w[k] for k in METRICS}, g["image"]


def test_alone_and_ensemble_rows_and_the_cache_match_train_nets_ensemble(runs, tmp_path, capsys):
    out = tmp_path / "bench"
    rc = load_bench().main([
        "--member", f"rcnn={runs['rcnn']}",
        "--member", f"nb={runs['nb'] / 'config.yaml'}:{runs['nb'] / 'model_final.pth'}",
        "--member", f"ts={runs['ts']}",
        "--dataset", "nuclei_synth_test", "--ensembles", "rcnn+nb", "nb+ts", "--min-votes", "1", "2",
        "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    table = read_csv(out / "table.csv")
    ens = ["rcnn+nb@votes1", "rcnn+nb@votes2", "nb+ts@votes1", "nb+ts@votes2"]  # one row per --min-votes value
    assert [r["row"] for r in table] == ["rcnn", "nb", "ts", *ens]
    assert [r["kind"] for r in table] == ["member"] * 3 + ["ensemble"] * 4
    assert [r["predictions_per_image"] for r in table] == ["1", "1", "2", "2", "2", "2", "2"]
    assert [r["merge"] for r in table[3:]] == ["instances"] * 4  # auto: an R-CNN / different dense maps
    for r in table:
        assert r["n_images"] == "2" and 0.0 <= float(r["AJI"]) <= 1.0 and float(r["s_per_tile"]) > 0
        assert (r["p_vs_best_member"] != "") == (r["kind"] == "ensemble")
    for name in ("rcnn", "nb", "ts", *ens):
        assert f"| {name} " in printed
    summary = json.loads((out / "summary.json").read_text())
    assert [r["row"] for r in summary["rows"]] == [r["row"] for r in table]
    # rcnn's raw outputs served its row and the ensemble's soft masks; nb's identity copy served both ensembles
    assert summary["member_predictions"]["reused"] >= 2
    assert "TEST.ENSEMBLE.WEIGHTS" in summary["rows"][3]["command"]
    # Alone rows are what tools/train_net.py --eval-only gives for the member's own config (a test-time wrapper, a
    # dense model without one, an R-CNN whose raw outputs also gave the ensembles' soft masks) ...
    for name, merge in (("ts", "probs"), ("nb", "auto"), ("rcnn", "auto")):
        assert_same_metrics(read_csv(out / "per_image" / f"{name}.csv"),
                            reference_per_image(tmp_path, runs, [name], merge, 2))
    # ... and ensemble rows, built from the cached member predictions, what it gives with TEST.ENSEMBLE
    for members, votes in ((["rcnn", "nb"], 1), (["nb", "ts"], 1), (["rcnn", "nb"], 2)):
        want = reference_per_image(tmp_path, runs, members, "auto", votes)
        assert_same_metrics(read_csv(out / "per_image" / f"{'+'.join(members)}@votes{votes}.csv"), want)


def test_shared_maps_ensembles_of_two_methods_match_train_nets_ensemble(runs, tmp_path):
    out = tmp_path / "bench"
    rc = load_bench().main([
        "--member", f"ts={runs['ts']}", "--member", f"nb={runs['nb']}", "--dataset", "nuclei_synth_test",
        "--ensembles", "ts+nb", "nb+ts", "--merge", "shared", "--output-dir", str(out)])
    assert rc == 0
    table = read_csv(out / "table.csv")
    assert [(r["row"], r["merge"], r["predictions_per_image"]) for r in table] == [
        ("ts", "probs", "2"), ("nb", "-", "1"), ("ts+nb", "shared", "4"), ("nb+ts", "shared", "2")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["member_predictions"]["reused"] == 4  # ts's 2-copy sums and nb's 1-copy maps, per image
    for members in (["ts", "nb"], ["nb", "ts"]):
        want = reference_per_image(tmp_path, runs, members, "shared", 2)
        assert_same_metrics(read_csv(out / "per_image" / f"{'+'.join(members)}.csv"), want)
    # the NB U-Net's interior moved the two-stage U-Net's: the ensemble is not the member alone
    assert read_csv(out / "per_image" / "ts+nb.csv") != read_csv(out / "per_image" / "ts.csv")


def test_training_minutes_from_the_checkpoint_clock_or_the_command_line_add_up(runs, tmp_path, capsys):
    clocked = tmp_path / "nb_clocked"
    clocked.mkdir()
    state = torch.load(runs["nb"] / "model_final.pth", weights_only=True)
    state["trainer"] = {"iteration": 1, "hooks": {"TimeBudgetHook": {"seconds": 90.0}}}  # as SOLVER.TIME_BUDGET saves
    torch.save(state, clocked / "model_final.pth")
    (clocked / "config.yaml").write_text((runs["nb"] / "config.yaml").read_text())
    out = tmp_path / "bench"
    rc = load_bench().main([
        "--member", f"nb={clocked}", "--member", f"ts={runs['ts']}", "--member", f"rcnn={runs['rcnn']}",
        "--dataset", "nuclei_synth_test", "--ensembles", "nb+ts", "nb+rcnn", "--max-images", "1", "--tta-off",
        "--train-minutes", "ts=120", "--output-dir", str(out)])
    assert rc == 0
    minutes = {r["row"]: r["train_minutes"] for r in read_csv(out / "table.csv")}
    assert minutes == {"nb": "1.5", "ts": "120.0", "rcnn": "", "nb+ts": "121.5", "nb+rcnn": ""}  # rcnn: unknown
    assert "training min" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["members"]["nb"]["train_minutes"] == 1.5 and summary["members"]["rcnn"]["train_minutes"] is None
    assert load_bench().main(["--member", f"nb={clocked}", "--train-minutes", "xx=3", "--output-dir",
                              str(tmp_path / "x")]) == 2
    assert "--train-minutes 'xx=3': expected NAME=MINUTES" in capsys.readouterr().err


def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "never"
    for argv, message in [
        (["--member", "nb"], "--member 'nb': expected NAME=CONFIG.yaml:WEIGHTS or NAME=RUN_DIR"),
        (["--member", f"nb={runs['nb']}", "--ensembles", "nb+xx"], "unknown member(s) ['xx']"),
        # a config that does not fit the weights: the checkpoint loader's message, naming the member
        (["--member", f"nb={runs['ts'] / 'config.yaml'}:{runs['nb'] / 'model_final.pth'}"], "--member nb: "),
        (["--member", f"a={runs['rcnn']}", "--member", f"b={runs['nb']}", "--merge", "probs"],
         "ensemble a+b: TEST.MERGE.MODE 'probs'"),
    ]:
        assert bench.main([*argv, "--dataset", "nuclei_synth_test", "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert not out.exists()
    missing = tmp_path / "gone" / "model_final.pth"
    res = subprocess.run([sys.executable, str(BENCH), "--member", f"nb={runs['nb']}", "--member",
                          f"ts={runs['ts'] / 'config.yaml'}:{missing}", "--dataset", "nuclei_synth_test",
                          "--output-dir", str(out)], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == f"error: --member ts: weights file not found: {missing}"
    assert "Traceback" not in res.stderr and not out.exists()


class ConstantMaps(DenseSegmentor):
    """A dense 'model' predicting constant maps; post-processing: components of its first map > 0.5."""

    def __init__(self, names: tuple[str, ...], values: tuple[float, ...], meanings: dict[str, str]):
        super().__init__(pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3)
        self.prob_names, self.map_meanings, self.values = names, meanings, values
        self.dummy = nn.Parameter(torch.zeros(1))

    def dense_probs(self, x):
        return torch.tensor(self.values, dtype=torch.float32).view(1, -1, 1, 1).expand(x.shape[0], -1, *x.shape[-2:])

    def postprocess(self, probs):
        label = (probs[0] > 0.5).astype(np.int32)
        return label, np.ones(int(label.max()), np.float32)


def test_shared_mode_averages_maps_of_one_meaning_and_keeps_the_first_members_others():
    a = ConstantMaps(("foreground", "distance"), (0.8, 0.3), {"foreground": "interior"})
    b = ConstantMaps(("background", "boundary", "inside"), (0.5, 0.2, 0.1), {"inside": "interior"})
    c = ConstantMaps(("semantic", "boundary"), (0.9, 0.6), {})
    inp = {"image": torch.zeros(3, 8, 10), "height": 8, "width": 10}
    two = parse_tta_transforms(["identity", "hflip"])
    w = TestTimeWrapper([a, b], two, merge="shared").eval()
    assert w.merge_mode == "shared"
    probs = w.mean_probs(inp)
    torch.testing.assert_close(probs[:, 0, 0], torch.tensor([(0.8 + 0.1) / 2, 0.3]))
    assert w([inp])[0]["label_map"].max() == 0  # the first member's post-processing of the average (0.45)
    # b first: its boundary averaged with c's, its other maps its own
    torch.testing.assert_close(TestTimeWrapper([b, c], two, merge="shared").mean_probs(inp)[:, 0, 0],
                               torch.tensor([0.5, 0.4, 0.1]))
    with pytest.raises(ValueError, match="predicts no map the first member"):
        TestTimeWrapper([a, c], two, merge="shared")
    with pytest.raises(ValueError, match="same maps"):
        TestTimeWrapper([a, b], two, merge="probs")
    assert TestTimeWrapper([a, b], two).merge_mode == "instances"  # auto never averages different methods' maps
    # identical members: "shared" is "probs"
    same = [ConstantMaps(("foreground",), (v,), {}) for v in (0.2, 0.7)]
    torch.testing.assert_close(TestTimeWrapper(same, two, merge="shared").mean_probs(inp),
                               TestTimeWrapper(same, two, merge="probs").mean_probs(inp))


def test_the_methods_declare_their_common_maps():
    from nuclei_d2.modeling import build_nuclei_model

    nb = build_nuclei_model(tiny_cfg("nb_unet-tiny.yaml"))
    ts = build_nuclei_model(tiny_cfg("two_stage_unet-tiny.yaml", "MODEL.TWO_STAGE.INFERENCE", "watershed"))
    assert nb.map_meaning_names == ("background", "boundary", "interior")
    assert ts.map_meaning_names == ("interior", "distance")
    from nuclei_d2.modeling.brpnet import BRPNet

    assert set(BRPNet.prob_names) & set(nb.map_meaning_names) == {"boundary"}  # the same target, INPUT.BOUNDARY_WIDTH
