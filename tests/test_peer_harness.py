"""benchmarks/peers: the helpers the peer scripts share (_common.py: run.json, --predict-from, label maps) and
speed.py (arguments, the table and its ratios, nuclei-d2 models timed through the Predictor). No peer package is
imported: the peers' own model loading runs only in their venvs."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, load_script, tiny_cfg
from PIL import Image

PEERS = REPO / "benchmarks" / "peers"


def _load(name: str):
    return load_script(f"benchmarks/peers/{name}.py")


common = _load("_common")
speed = _load("speed")


@pytest.fixture
def thread_env(monkeypatch):
    """parse_args sets the thread variables: restore them after the test."""
    for var in common.THREAD_VARS:
        monkeypatch.setenv(var, "1")


@pytest.fixture
def dataset(shared_data, tmp_path) -> Path:
    """A split of four 192 px crops of real Kumar tiles (two training, two test), laid out as the peers read it."""
    src = shared_data / "monuseg2018"
    split = json.loads((src / "splits.json").read_text())["kumar2017"]
    ids = split["train"][:2] + split["test_same_organ"][:1] + split["test_diff_organ"][:1]
    root = tmp_path / "data"
    for sub in ("images", "labels"):
        (root / "train" / sub).mkdir(parents=True)
    for i in ids:
        Image.open(src / "train" / "images" / f"{i}.tif").convert("RGB").crop((300, 300, 492, 492)).save(
            root / "train" / "images" / f"{i}.tif")
        Image.open(src / "train" / "labels" / f"{i}.png").crop((300, 300, 492, 492)).save(
            root / "train" / "labels" / f"{i}.png")
    (root / "splits.json").write_text(json.dumps({"kumar2017": {"train": ids[:2], "test_same_organ": ids[2:3],
                                                                "test_diff_organ": ids[3:]}}))
    return root


def make_run(root: Path, peer: str = "stardist", thresholds: dict | None = None, data: Path | None = None) -> Path:
    """A finished run folder of train_<peer>.py: run.json written by _common and the model files it names."""
    run = root / f"{peer}_run"
    args = argparse.Namespace(output=run, minutes=2.0, threads=1, seed=0, split="kumar2017", data=data or root)
    run.mkdir(parents=True, exist_ok=True)
    for rel in common.RUN_FILES[peer]:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(b"weights")
    if thresholds is None:
        thresholds = {k: 0.5 for k in common.THRESHOLD_KEYS[peer]}
    common.write_run_json(args, peer, {"thresholds": thresholds, "minutes_trained": 2.1})
    return run


# ---- _common: run.json and read_run ----------------------------------------------------------------------------------
def test_run_json_round_trip(tmp_path):
    run = make_run(tmp_path, "cellpose", {"flow_threshold": 0.4, "cellprob_threshold": -1.0})
    record = common.read_run(run, "cellpose")
    assert record["peer"] == "cellpose"
    assert record["thresholds"] == {"flow_threshold": 0.4, "cellprob_threshold": -1.0}
    assert record["minutes_trained"] == 2.1 and record["threads"] == 1 and record["split"] == "kumar2017"
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    assert (run / "run.json").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


@pytest.mark.parametrize("peer", ["stardist", "cellpose", "instanseg"])
def test_read_run_names_each_missing_model_file(tmp_path, peer):
    run = make_run(tmp_path, peer)
    assert common.read_run(run, peer)["peer"] == peer
    for rel in common.RUN_FILES[peer]:
        (run / rel).rename(run / (rel + ".away"))
        with pytest.raises(common.RunError, match=f"{run / rel}: missing"):
            common.read_run(run, peer)
        (run / (rel + ".away")).rename(run / rel)


def test_read_run_errors(tmp_path):
    with pytest.raises(common.RunError, match="no such run folder"):
        common.read_run(tmp_path / "nope", "stardist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.RunError, match=r"empty/run\.json: missing"):
        common.read_run(tmp_path / "empty", "stardist")
    run = make_run(tmp_path, "stardist")
    with pytest.raises(common.RunError, match="a run of 'stardist', not of 'cellpose'"):
        common.read_run(run, "cellpose")
    with pytest.raises(common.RunError, match="unknown peer"):
        common.read_run(run, "mesmer")
    (run / "run.json").write_text('{"peer": "stardist", ')
    with pytest.raises(common.RunError, match=r"run\.json: not valid JSON"):
        common.read_run(run, "stardist")
    (run / "run.json").write_text("[1, 2]")
    with pytest.raises(common.RunError, match="not a JSON object"):
        common.read_run(run, "stardist")
    (run / "run.json").write_text(json.dumps({"peer": "stardist", "thresholds": {"prob": 0.5, "nms": "high"}}))
    with pytest.raises(common.RunError, match=r"no numeric thresholds \['nms'\]"):
        common.read_run(run, "stardist")


# ---- _common: label maps ---------------------------------------------------------------------------------------------
def test_write_labels_renumbers_and_replaces_the_other_format(tmp_path):
    labels = np.zeros((40, 50), np.int64)
    labels[2:9, 3:8] = 70000  # ids beyond uint16: renumbered, not wrapped
    labels[20:30, 20:40] = 5
    labels[35:38, 1:4] = 123
    (tmp_path / "labels").mkdir()
    np.save(tmp_path / "labels" / "t.npy", np.ones((2, 2), np.int32))  # a stale map of the same tile
    path = common.write_labels(tmp_path, "t", labels)
    assert path == tmp_path / "labels" / "t.png"
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == ["t.png"]
    back = np.asarray(Image.open(path))
    assert back.dtype == np.uint16
    assert sorted(np.unique(back)) == [0, 1, 2, 3]
    for old in (70000, 5, 123):  # same pixels, one new id each
        assert len(np.unique(back[labels == old])) == 1 and back[labels == old][0] > 0
    assert ((back > 0) == (labels > 0)).all()


def test_write_labels_more_than_uint16_goes_to_npy(tmp_path):
    labels = np.arange(1, 300 * 300 + 1, dtype=np.int64).reshape(300, 300)  # 90000 one-pixel nuclei
    common.write_labels(tmp_path, "t", np.zeros((3, 3), np.int32))
    path = common.write_labels(tmp_path, "t", labels)
    assert path.name == "t.npy" and not (tmp_path / "labels" / "t.png").exists()
    back = np.load(path)
    assert back.dtype == np.int32 and back.max() == 90000 and len(np.unique(back)) == 90000
    with pytest.raises(ValueError, match="must be 2-D"):
        common.write_labels(tmp_path, "u", np.zeros((2, 2, 2)))


# ---- _common: the --predict-from command line and predict_only -------------------------------------------------------
def test_parse_args_predict_from_rules(thread_env, tmp_path):
    with pytest.raises(SystemExit):
        common.parse_args("x", argv=["--output", str(tmp_path)])  # training needs --data
    with pytest.raises(SystemExit):
        common.parse_args("x", argv=["--data", "d", "--output", "o", "--input", "a.tif"])  # --input needs RUN
    with pytest.raises(SystemExit):
        common.parse_args("x", argv=["--predict-from", "r", "--output", "o", "--warmup", "-1"])
    args = common.parse_args("x", argv=["--predict-from", "r", "--output", "o", "--threads", "3"])
    assert args.predict_from == Path("r") and args.data is None and args.split is None
    assert os.environ["OMP_NUM_THREADS"] == "3"
    assert common.parse_args("x", argv=["--data", "d", "--output", "o"]).split == common.DEFAULT_SPLIT


def _threshold_predict(threshold: float):
    """A stand-in for a peer's model: dark pixels, 4-connected components."""
    from scipy import ndimage

    def predict(rgb):
        return ndimage.label(rgb.mean(axis=2) < threshold)[0]

    return predict


def test_predict_only_uses_the_runs_thresholds_and_test_tiles(thread_env, dataset, tmp_path):
    run = make_run(tmp_path, "stardist", {"prob": 120.0, "nms": 0.3}, data=dataset)
    seen = {}

    def load(run_dir, record):
        seen["run"], seen["prob"] = run_dir, record["thresholds"]["prob"]
        return _threshold_predict(record["thresholds"]["prob"])

    out = tmp_path / "pred"
    args = common.parse_args("x", argv=["--predict-from", str(run), "--output", str(out), "--warmup", "1"])
    path = common.predict_only(args, "stardist", load, {"stardist": "test"})
    record = json.loads(path.read_text())
    test_ids = [i for k, v in json.loads((dataset / "splits.json").read_text())["kumar2017"].items()
                if k.startswith("test") for i in v]
    assert seen == {"run": run, "prob": 120.0}
    assert record["test_tiles"] == test_ids and record["predict_from"] == str(run.resolve())
    assert record["thresholds"] == {"prob": 120.0, "nms": 0.3} and record["threads"] == 1 and record["warmup"] == 1
    assert sorted(record["seconds_by_tile"]) == sorted(record["cpu_seconds_by_tile"]) == sorted(test_ids)
    assert record["seconds_per_tile_min"] <= record["seconds_per_tile"]
    for t in test_ids:
        got = np.asarray(Image.open(out / "labels" / f"{t}.png"))
        want = _threshold_predict(120.0)(common.read_image(dataset, t))
        assert record["nuclei_by_tile"][t] == want.max() == got.max() > 0
        assert ((got > 0) == (want > 0)).all()


def test_predict_only_input_images_and_errors(thread_env, dataset, tmp_path):
    run = make_run(tmp_path, "instanseg", data=dataset)
    tile = sorted((dataset / "train" / "images").iterdir())[0]
    out = tmp_path / "pred"
    load = lambda run_dir, record: _threshold_predict(100.0)  # noqa: E731
    args = common.parse_args("x", argv=["--predict-from", str(run), "--output", str(out), "--input", str(tile)])
    record = json.loads(common.predict_only(args, "instanseg", load).read_text())
    assert record["test_tiles"] == [tile.stem] and (out / "labels" / f"{tile.stem}.png").is_file()

    def fails(argv, peer, message):
        a = common.parse_args("x", argv=argv)
        with pytest.raises(SystemExit, match=message):
            common.predict_only(a, peer, load)

    (run / "instanseg" / "model_weights.pth").unlink()
    fails(["--predict-from", str(run), "--output", str(out)], "instanseg", r"model_weights\.pth: missing")
    run = make_run(tmp_path, "stardist", data=dataset)
    fails(["--predict-from", str(run), "--output", str(out)], "cellpose", "a run of 'stardist'")
    fails(["--predict-from", str(run), "--output", str(run)], "stardist", "is the run folder itself")
    fails(["--predict-from", str(run), "--output", str(out), "--input", str(tmp_path / "no.tif")], "stardist",
          "no.tif: no such image")
    twin = tmp_path / "other" / tile.name
    twin.parent.mkdir()
    twin.write_bytes(tile.read_bytes())
    fails(["--predict-from", str(run), "--output", str(out), "--input", str(tile), str(twin)], "stardist",
          "several images named")
    fails(["--predict-from", str(run), "--output", str(out), "--split", "nope"], "stardist", "no split 'nope'")


# ---- speed.py --------------------------------------------------------------------------------------------------------
def test_default_venv_is_the_setup_scripts(tmp_path):
    for peer in ("stardist", "cellpose", "instanseg"):
        digest = subprocess.run(f"cat setup_{peer}.sh _venv.sh | sha256sum | cut -c1-10", shell=True, cwd=PEERS,
                                capture_output=True, text=True, check=True).stdout.strip()
        assert speed.default_venv(peer, {"NUCLEI_D2_PEERS": str(tmp_path)}) == tmp_path / f"{peer}-{digest}"
        assert speed.default_venv(peer, {}) == Path.home() / ".cache" / "nuclei-d2" / "peers" / f"{peer}-{digest}"


def test_summarize_ratio_to_the_first_nuclei_d2_model():
    rows = speed.summarize([
        {"method": "stardist", "kind": "peer", "source": "r", "threads": 1, "seconds": [3.0, 5.0],
         "cpu_seconds": [1.0, 2.0]},
        {"method": "a", "kind": "zoo", "source": "a", "threads": 1, "seconds": [2.0, 1.0, 3.0],
         "cpu_seconds": [0.5, 0.5, 0.5]},
        {"method": "b", "kind": "config", "source": "b.yaml b.pth", "threads": 1, "seconds": [8.0],
         "cpu_seconds": None},
    ])
    by = {r["method"]: r for r in rows}
    assert [r["method"] for r in rows] == ["stardist", "a", "b"]
    assert by["a"]["s_per_tile_mean"] == 2.0 and by["a"]["s_per_tile_min"] == 1.0 and by["a"]["tiles"] == 3
    assert by["a"]["ratio"] == 1.0 and by["stardist"]["ratio"] == 2.0 and by["b"]["ratio"] == 4.0
    assert by["stardist"]["cpu_s_per_tile_mean"] == 1.5 and by["stardist"]["cpu_ratio"] == 3.0
    assert np.isnan(by["b"]["cpu_s_per_tile_mean"]) and np.isnan(by["b"]["cpu_ratio"])
    table = speed.format_table(rows).splitlines()
    assert table[0].endswith("ratio to a | CPU ratio |") and len(table) == 5
    assert table[2] == "| stardist | peer | 2 | 1 | 4.00 | 3.00 | 1.50 | 2.00 | 3.00 |"
    with pytest.raises(ValueError, match="no nuclei-d2 model"):
        speed.summarize([{"method": "s", "kind": "peer", "source": "r", "threads": 1, "seconds": [1.0]}])
    with pytest.raises(ValueError, match="a: no timed tile"):
        speed.summarize([{"method": "a", "kind": "zoo", "source": "a", "threads": 1, "seconds": []}])
    with pytest.raises(ValueError, match="a: 1 CPU times for 2 tiles"):
        speed.summarize([{"method": "a", "kind": "zoo", "source": "a", "threads": 1, "seconds": [1.0, 2.0],
                          "cpu_seconds": [1.0]}])


def test_write_outputs_and_read_predict_json(tmp_path):
    rows = speed.summarize([{"method": "a", "kind": "zoo", "source": "a", "threads": 2, "seconds": [1.5, 2.5]},
                            {"method": "cellpose", "kind": "peer", "source": "r", "threads": 2, "seconds": [6.0]}])
    path_csv, path_json = speed.write_outputs(tmp_path, rows, {"tiles": ["x", "y"]})
    with open(path_csv) as f:
        back = list(csv.DictReader(f))
    assert [r["method"] for r in back] == ["a", "cellpose"] and float(back[1]["ratio"]) == 3.0
    assert json.loads(path_json.read_text())["tiles"] == ["x", "y"]
    pred = tmp_path / "predict.json"
    with pytest.raises(ValueError, match="missing"):
        speed.read_predict_json(pred, ["x"])
    pred.write_text(json.dumps({"seconds_by_tile": {"y": 2.0, "x": 1.0}}))
    assert speed.read_predict_json(pred, ["x", "y"]) == ([1.0, 2.0], None)
    pred.write_text(json.dumps({"seconds_by_tile": {"y": 2.0, "x": 1.0}, "cpu_seconds_by_tile": {"y": 0.2, "x": 0.1}}))
    assert speed.read_predict_json(pred, ["y", "x"]) == ([2.0, 1.0], [0.2, 0.1])
    with pytest.raises(ValueError, match="no time for tile z"):
        speed.read_predict_json(pred, ["x", "z"])
    pred.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        speed.read_predict_json(pred, ["x"])


def test_speed_argument_errors(dataset, tmp_path, capsys):
    run = make_run(tmp_path, "stardist", data=dataset)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("")
    base = ["--data", str(dataset), "--output", str(tmp_path / "out"), "--tiles", "2"]

    def error(argv, message):
        with pytest.raises(SystemExit):
            speed.parse_args(base + argv)
        assert message in capsys.readouterr().err

    error(["--peer", f"stardist={run}"], "give at least one nuclei-d2 model")
    error(["--model", "m", "--peer", f"stardist{run}"], "expected NAME=PATH")
    error(["--model", "m", "--peer", f"mesmer={run}"], "unknown peer 'mesmer'")
    error(["--model", "m", "--peer-venv", f"stardist={venv}"], "no --peer stardist=RUN")
    error(["--model", "m", "--peer", f"cellpose={run}", "--peer-venv", f"cellpose={venv}"], "a run of 'stardist'")
    error(["--model", "m", "--peer", f"stardist={tmp_path}"], "run.json: missing")
    error(["--model", "m", "--peer", f"stardist={run}", "--peer-venv", f"stardist={tmp_path}"], "no venv at")
    error(["--model", "m", "--model", "m"], "method 'm' given twice")
    error(["--model", "m", "--tiles", "0"], "--tiles must be >= 1")
    error(["--model", "m", "--threads", "0"], "--threads must be >= 1")
    error(["--model", "m", "--tiles", "3"], "has only 2 test tiles")
    error(["--config", str(cfg), str(tmp_path / "w.pth")], "w.pth: no such file")
    error(["--model", "m", "--split", "nope"], "no split 'nope'")
    args = speed.parse_args(base + ["--peer", f"stardist={run}", "--peer-venv", f"stardist={venv}", "--model", "m",
                                    "--config", str(cfg), str(cfg)])
    assert [m[0] for m in args.ours] == ["m", "c"] and args.peers == [("stardist", run, venv)]
    assert len(args.tile_ids) == 2
    with pytest.raises(SystemExit, match="--model m: not a model zoo entry"):
        speed.check_zoo_names(args)


def test_peer_command_is_what_the_peer_scripts_parse(thread_env, dataset, tmp_path):
    run = make_run(tmp_path, "cellpose", data=dataset)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    args = speed.parse_args(["--model", "m", "--peer", f"cellpose={run}", "--peer-venv", f"cellpose={venv}",
                             "--data", str(dataset), "--tiles", "2", "--threads", "2", "--warmup", "3",
                             "--output", str(tmp_path / "out")])
    cmd = speed.peer_command("cellpose", run, venv, args)
    assert cmd[:2] == [str(venv / "bin" / "python"), str(PEERS / "train_cellpose.py")]
    peer = common.parse_args("x", argv=cmd[2:])  # the command line every train_<peer>.py parses
    assert peer.predict_from == run and peer.threads == 2 and peer.warmup == 3
    assert peer.output == tmp_path / "out" / "cellpose"
    assert [p.stem for p in peer.input] == args.tile_ids and all(p.is_file() for p in peer.input)


def test_speed_times_a_nuclei_d2_model_through_the_predictor(dataset, tmp_path, capsys):
    """End to end for nuclei-d2 models: a tiny two-stage U-Net (random weights) given twice, as config + weights."""
    from nuclei_d2.modeling import build_nuclei_model

    cfg = tiny_cfg("two_stage_unet-tiny.yaml")
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    torch.save({"model": build_nuclei_model(cfg).state_dict()}, weights)
    (tmp_path / "a.yaml").write_text(cfg.dump())
    (tmp_path / "b.yaml").write_text(cfg.dump())
    out = tmp_path / "out"
    argv = ["--config", str(tmp_path / "a.yaml"), str(weights), "--config", str(tmp_path / "b.yaml"), str(weights),
            "--data", str(dataset), "--tiles", "2", "--warmup", "0", "--output", str(out)]
    assert speed.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| a | config | 2 | 1 |" in printed and "ratio to a | CPU ratio |" in printed
    record = json.loads((out / "speed.json").read_text())
    assert [r["method"] for r in record["rows"]] == ["a", "b"] and record["rows"][0]["ratio"] == 1.0
    assert record["rows"][1]["ratio"] == pytest.approx(np.mean(record["seconds_by_method"]["b"])
                                                       / np.mean(record["seconds_by_method"]["a"]))
    assert all(c > 0 for c in record["cpu_seconds_by_method"]["a"])
    for t in record["tiles"]:
        a = np.asarray(Image.open(out / "a" / "labels" / f"{t}.png"))
        b = np.asarray(Image.open(out / "b" / "labels" / f"{t}.png"))
        assert a.shape == (192, 192) and (a == b).all()  # same model, same tile, same map


def test_speed_help_and_argument_errors_import_no_torch():
    code = ("import runpy, sys\nsys.argv = ['speed.py'] + sys.argv[1:]\ntry:\n"
            f"    runpy.run_path({str(PEERS / 'speed.py')!r}, run_name='__main__')\n"
            "finally:\n    print('torch imported:', 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--peer NAME=RUN" in done.stdout and "torch imported: False" in done.stdout
    done = subprocess.run([sys.executable, "-c", code, "--output", "x"], capture_output=True, text=True)
    assert done.returncode == 2 and "give at least one nuclei-d2 model" in done.stderr
    assert "torch imported: False" in done.stdout
