"""The model zoo: packing a real trained run, sha256-checked loading, float16 storage, the tools' zoo names, and the
shipped entries scoring as their cards say on real Kumar tiles."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONFIGS, REPO, load_script, load_tool

from nuclei_d2 import model_zoo
from nuclei_d2.engine.zoo_entry import add_ensemble_entry, dataset_records, half_state, pack_model_entry, score_records
from nuclei_d2.errors import CheckpointError, ConfigError

PACKAGE_ZOO = REPO / "nuclei_d2" / "model_zoo"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A real NB U-Net trained for 40 iterations on the synthetic tiles (AJI ~0.3 on their test split)."""
    out = tmp_path_factory.mktemp("zoo_run")
    code = load_tool("train_net").main(["--config-file", str(CONFIGS / "nb_unet-tiny.yaml"), "MODEL.DEVICE", "cpu",
                                        "SOLVER.MAX_ITER", "40", "OUTPUT_DIR", str(out)])
    assert code == 0 and (out / "model_final.pth").is_file()
    return out


@pytest.fixture(scope="module")
def zoo(tiny_run, tmp_path_factory) -> Path:
    """A zoo folder holding the tiny run packed twice: float16 ("nb-tiny") and float32 ("nb-tiny-fp32")."""
    root = tmp_path_factory.mktemp("zoo")
    held = tiny_run / "inference" / "nuclei_synth_test" / "nuclei_results.json"
    for name, f16 in (("nb-tiny", True), ("nb-tiny-fp32", False)):
        pack_model_entry(name, str(tiny_run / "config.yaml"), str(tiny_run / "model_final.pth"), root=root,
                         description="tiny NB U-Net", held_out=str(held), check_dataset="nuclei_synth_test",
                         check_images=2, float16=f16,
                         card={"trained_on": {"datasets": ["nuclei_synth_train"], "tiles": 4}})
    return root


@pytest.fixture
def use_zoo(zoo, monkeypatch) -> Path:
    monkeypatch.setenv(model_zoo.ZOO_ENV, str(zoo))
    return zoo


def _copy_zoo(zoo: Path, dest: Path) -> Path:
    shutil.copytree(zoo, dest)
    return dest


def test_pack_writes_a_checked_float16_entry(zoo, tiny_run):
    manifest = yaml.safe_load((zoo / "manifest.yaml").read_text())["entries"]
    entry = manifest["nb-tiny"]
    assert entry["sha256"] == model_zoo.file_sha256(zoo / entry["weights"])
    assert entry["config_sha256"] == model_zoo.file_sha256(zoo / entry["config"])
    state = torch.load(zoo / entry["weights"], map_location="cpu", weights_only=True)
    assert set(state) == {"model"}  # no optimizer / trainer state
    floats = [v for v in state["model"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    fp32 = zoo / manifest["nb-tiny-fp32"]["weights"]
    assert (zoo / entry["weights"]).stat().st_size < 0.6 * fp32.stat().st_size
    card = entry["card"]
    assert card["dtype"] == "float16" and manifest["nb-tiny-fp32"]["card"]["dtype"] == "float32"
    assert card["training"]["iterations"] == 40 and card["meta_architecture"] == "NucleusBoundaryUNet"
    assert card["check"]["images"] == ["synth_test_000", "synth_test_001"] and len(card["check"]["AJI"]) == 2
    results = json.loads((tiny_run / "inference" / "nuclei_synth_test" / "nuclei_results.json").read_text())
    assert card["held_out"]["scores"]["AJI"] == pytest.approx(results["summary"]["all"]["mean"]["AJI"])
    # the packed config loads nothing by itself: MODEL.WEIGHTS comes from the manifest
    assert yaml.safe_load((zoo / entry["config"]).read_text())["MODEL"]["WEIGHTS"] == ""


def test_float16_weights_predict_as_float32(use_zoo, tiny_run):
    """The float16 file's nuclei score within 0.005 AJI of the run's own float32 weights, image by image."""
    from nuclei_d2.engine.defaults import setup_cfg
    from nuclei_d2.engine.zoo_entry import _load_model

    records = dataset_records("nuclei_synth_test", 2)
    cfg = setup_cfg(str(tiny_run / "config.yaml"), ["MODEL.WEIGHTS", str(tiny_run / "model_final.pth")],
                    eval_only=True)
    ref = score_records(cfg, _load_model(cfg, cfg.MODEL.WEIGHTS, "run"), records)
    got = score_records(model_zoo.get_config("nb-tiny"), model_zoo.get("nb-tiny"), records)
    assert [r["image"] for r in got] == [r["image"] for r in ref]
    for a, b in zip(ref, got, strict=True):
        assert b["AJI"] == pytest.approx(a["AJI"], abs=0.005)
    assert max(r["AJI"] for r in ref) > 0.1  # a trained model, not a blank one


def test_entry_scores_as_its_card(use_zoo):
    """What the shipped-zoo test checks, on the tiny zoo: verified load, card images, card AJI within tolerance."""
    entry = model_zoo.get_entry("nb-tiny")
    check = entry.card["check"]
    got = score_records(model_zoo.get_config("nb-tiny"), model_zoo.get("nb-tiny"),
                        dataset_records(check["dataset"], check["images"]))
    for r, aji in zip(got, check["AJI"], strict=True):
        assert r["AJI"] == pytest.approx(aji, abs=check["tolerance"])
    cfg = model_zoo.get_config("nb-tiny")
    assert cfg.MODEL.WEIGHTS == str(use_zoo / "weights" / "nb-tiny.pth")
    assert model_zoo.get_config("nb-tiny", trained=False).MODEL.WEIGHTS == ""
    assert model_zoo.list_models() == ["nb-tiny", "nb-tiny-fp32"]


def test_tampered_or_missing_file_is_refused(zoo, tmp_path, monkeypatch):
    bad = _copy_zoo(zoo, tmp_path / "zoo")
    monkeypatch.setenv(model_zoo.ZOO_ENV, str(bad))
    weights = bad / "weights" / "nb-tiny.pth"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"nb-tiny\.pth: sha256 .* differs from the manifest"):
        model_zoo.get_config("nb-tiny")
    with pytest.raises(CheckpointError, match="differs from the manifest"):
        model_zoo.get("nb-tiny")
    (bad / "configs" / "nb-tiny-fp32.yaml").unlink()
    with pytest.raises(CheckpointError, match=r"nb-tiny-fp32\.yaml: model zoo file not found"):
        model_zoo.get_config("nb-tiny-fp32")


def test_unknown_name_lists_the_entries(use_zoo):
    with pytest.raises(ConfigError, match=r"unknown model zoo entry 'nope'; available: nb-tiny, nb-tiny-fp32"):
        model_zoo.get_config("nope")
    assert model_zoo.get_entry("nb-tiny").kind == "model"


def test_bad_manifests_are_one_line_errors(tmp_path):
    (tmp_path / "manifest.yaml").write_text("entries: [unclosed\n")
    with pytest.raises(ConfigError, match="manifest.yaml: not valid YAML"):
        model_zoo.load_manifest(tmp_path)
    (tmp_path / "manifest.yaml").write_text("entries:\n  a: {kind: model, config: c.yaml}\n")
    with pytest.raises(ConfigError, match="entry 'a' lacks weights, sha256, config_sha256"):
        model_zoo.load_manifest(tmp_path)
    (tmp_path / "manifest.yaml").write_text("entries:\n  e: {kind: ensemble, members: [x, y]}\n")
    with pytest.raises(ConfigError, match=r"ensemble 'e' names members that are not model entries: \['x', 'y'\]"):
        model_zoo.load_manifest(tmp_path)
    with pytest.raises(ConfigError, match="model zoo manifest not found"):
        model_zoo.load_manifest(tmp_path / "nowhere")


def test_half_state_keeps_what_float16_cannot_hold():
    state = {"w": torch.tensor([1.0, 2.5]), "big": torch.tensor([1e6]), "n": torch.tensor(3),
             "d": torch.tensor([0.5], dtype=torch.float64)}
    half = half_state(state)
    assert half["w"].dtype == torch.float16 and torch.equal(half["w"].float(), state["w"])
    assert half["big"].dtype == torch.float32  # 1e6 overflows float16
    assert half["n"].dtype == torch.int64 and half["d"].dtype == torch.float64


def test_ensemble_entry_loads_its_members(zoo, tiny_run, tmp_path, monkeypatch):
    root = _copy_zoo(zoo, tmp_path / "zoo")
    monkeypatch.setenv(model_zoo.ZOO_ENV, str(root))
    held = tiny_run / "inference" / "nuclei_synth_test" / "nuclei_results.json"
    entry = add_ensemble_entry("nb-pair", ["nb-tiny", "nb-tiny-fp32"], root=root,
                               overrides={"TEST.MERGE.MODE": "probs"}, description="two copies",
                               card={"held_out": {"command": "benchmarks/ensemble.py ...", "note": "by hand"}},
                               held_out=str(held), check_dataset="nuclei_synth_test", check_images=2)
    assert entry["card"]["check"]["images"] == ["synth_test_000", "synth_test_001"]
    # the held-out scores join the command and note the card was given (they do not replace them)
    card = model_zoo.get_entry("nb-pair").card
    assert card["held_out"]["command"] == "benchmarks/ensemble.py ..." and card["held_out"]["note"] == "by hand"
    assert card["held_out"]["scores"]["AJI"] == pytest.approx(
        json.loads(held.read_text())["summary"]["all"]["mean"]["AJI"], abs=1e-4)
    cfg = model_zoo.get_config("nb-pair")
    assert cfg.MODEL.WEIGHTS == str(root / "weights" / "nb-tiny.pth")
    assert list(cfg.TEST.ENSEMBLE.WEIGHTS) == [str(root / "weights" / "nb-tiny-fp32.pth")]
    assert cfg.TEST.MERGE.MODE == "probs"
    model = model_zoo.get("nb-pair")
    assert type(model).__name__ == "TestTimeWrapper" and len(model.models) == 2
    assert "members: nb-tiny + nb-tiny-fp32" in model_zoo.format_table()
    # a member's file altered: the ensemble refuses to load too
    (root / "weights" / "nb-tiny-fp32.pth").write_bytes(b"not weights")
    with pytest.raises(CheckpointError, match="nb-tiny-fp32.pth: sha256"):
        model_zoo.get_config("nb-pair")


def test_ensemble_member_with_a_submodel_config_need_not_come_first(zoo, tmp_path, monkeypatch):
    """The shipped two-stage U-Net (its stage-1 net has a config file of its own) as the second member of an ensemble:
    its sub-model config reaches it through TEST.ENSEMBLE.OPTS, and the member builds with that stage-1 net."""
    root = _copy_zoo(zoo, tmp_path / "zoo")
    shipped = yaml.safe_load((PACKAGE_ZOO / "manifest.yaml").read_text())["entries"]
    member = shipped["two_stage_unet-monuseg"]
    assert member["submodel_configs"], "the shipped two-stage entry has a stage-1 config file"
    for rel in [member["config"], member["weights"], *(f["file"] for f in member["submodel_configs"].values())]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PACKAGE_ZOO / rel, root / rel)
    manifest = yaml.safe_load((root / "manifest.yaml").read_text())
    manifest["entries"]["two_stage_unet-monuseg"] = member
    manifest["entries"]["mixed"] = {"kind": "ensemble", "members": ["nb-tiny", "two_stage_unet-monuseg"],
                                    "overrides": {"TEST.MERGE.MODE": "instances"}}
    (root / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    monkeypatch.setenv(model_zoo.ZOO_ENV, str(root))
    cfg = model_zoo.get_config("mixed")
    stage1 = str(root / next(iter(member["submodel_configs"].values()))["file"])
    assert [list(o) for o in cfg.TEST.ENSEMBLE.OPTS] == [[next(iter(member["submodel_configs"])), stage1]]
    model = model_zoo.get("mixed")
    assert [type(m).__name__ for m in model.models] == ["NucleusBoundaryUNet", "TwoStageUNet"]
    assert model_zoo.get_config("mixed", trained=False).TEST.ENSEMBLE.OPTS == []


def test_ensemble_opts_must_pair_with_the_weights(tiny_run):
    from nuclei_d2.config import build_cfg
    from nuclei_d2.inference.ensemble import load_ensemble_members

    cfg = build_cfg(str(tiny_run / "config.yaml"), ["MODEL.DEVICE", "cpu"])
    weights = [str(tiny_run / "model_final.pth")]
    with pytest.raises(ValueError, match="TEST.ENSEMBLE.OPTS lists 2 override lists for 1 weights files"):
        load_ensemble_members(cfg, weights, opts=[[], []])
    with pytest.raises(ValueError, match=r"TEST.ENSEMBLE.OPTS\[0\] .* KEY VALUE pairs"):
        load_ensemble_members(cfg, weights, opts=[["MODEL.NB.THRESHOLD"]])
    (member,) = load_ensemble_members(cfg, weights, opts=[["MODEL.NB.THRESHOLD", "0.9"]])
    assert member.model.post["threshold"] == pytest.approx(0.9) and cfg.MODEL.NB.THRESHOLD != pytest.approx(0.9)


def test_ensemble_build_failure_leaves_the_manifest_as_it_was(zoo, tmp_path):
    root = _copy_zoo(zoo, tmp_path / "zoo")
    before = (root / "manifest.yaml").read_text()
    with pytest.raises(ConfigError):
        add_ensemble_entry("nb-bad", ["nb-tiny", "nb-tiny-fp32"], root=root, check_dataset="no_such_dataset")
    assert (root / "manifest.yaml").read_text() == before
    # a failure once the entry is in the manifest (its config does not build): the entry is taken out again
    with pytest.raises(ConfigError, match="TEST.MERGE.NOPE"):
        add_ensemble_entry("nb-bad", ["nb-tiny", "nb-tiny-fp32"], root=root, overrides={"TEST.MERGE.NOPE": 1},
                           check_dataset="nuclei_synth_test")
    assert "nb-bad" not in model_zoo.load_manifest(root)
    assert list(model_zoo.load_manifest(root)) == ["nb-tiny", "nb-tiny-fp32"]


def test_build_tool_refuses_bad_input_and_writes_nothing(tiny_run, tmp_path, capsys):
    tool = load_tool("build_zoo_entry")
    root = tmp_path / "zoo"
    root.mkdir()
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    code = tool.main(["--name", "x", "--config-file", str(tiny_run / "config.yaml"), "--weights", str(bad),
                      "--zoo", str(root), "--check-dataset", "nuclei_synth_test"])
    assert code == 2 and "bad.pth" in capsys.readouterr().err
    assert list(root.iterdir()) == []
    assert tool.main(["--name", "a/b", "--config-file", str(tiny_run / "config.yaml"), "--weights",
                      str(tiny_run / "model_final.pth"), "--zoo", str(root)]) == 2
    assert list(root.iterdir()) == []
    # comma-separated lists, so the KEY VALUE overrides that end the command stay overrides
    assert tool.main(["--name", "ok", "--config-file", str(tiny_run / "config.yaml"), "--weights",
                      str(tiny_run / "model_final.pth"), "--zoo", str(root), "--check-dataset", "nuclei_synth_test",
                      "--trained-on", "a_train,b_train", "--check-images", "synth_test_001",
                      "MODEL.NB.MIN_SIZE", "7"]) == 0
    entry = model_zoo.get_entry("ok", root)
    assert entry.card["trained_on"]["datasets"] == ["a_train", "b_train"]
    assert entry.card["check"]["images"] == ["synth_test_001"]
    assert model_zoo.get_config("ok", root=root).MODEL.NB.MIN_SIZE == 7


def _run(args: list[str], env_zoo: Path | None, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if env_zoo is not None:
        env[model_zoo.ZOO_ENV] = str(env_zoo)
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)


def test_predict_tool_takes_zoo_names(zoo, tmp_path):
    listing = _run([str(REPO / "tools" / "predict.py"), "--list-models"], zoo, tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "nb-tiny-fp32" in listing.stdout and "tiny NB U-Net" in listing.stdout
    image = dataset_records("nuclei_synth_test", 1)[0]["file_name"]
    done = _run([str(REPO / "tools" / "predict.py"), "--model", "nb-tiny", "--input", image, "--output",
                 str(tmp_path / "out"), "--outputs", "geojson", "csv", "--no-progress"], zoo, tmp_path)
    assert done.returncode == 0, done.stderr
    stem = Path(image).stem
    features = json.loads((tmp_path / "out" / f"{stem}.geojson").read_text())["features"]
    assert len(features) > 0
    # altered weights: exit 2, one line naming the file, no output folder
    bad = _copy_zoo(zoo, tmp_path / "bad_zoo")
    (bad / "weights" / "nb-tiny.pth").write_bytes(b"x")
    refused = _run([str(REPO / "tools" / "predict.py"), "--model", "nb-tiny", "--input", image, "--output",
                    str(tmp_path / "out2")], bad, tmp_path)
    assert refused.returncode == 2 and "nb-tiny.pth: sha256" in refused.stderr
    assert not (tmp_path / "out2").exists()
    unknown = _run([str(REPO / "tools" / "predict.py"), "--model", "nope", "--input", image, "--output",
                    str(tmp_path / "out3")], zoo, tmp_path)
    assert unknown.returncode == 2 and "available: nb-tiny, nb-tiny-fp32" in unknown.stderr
    both = _run([str(REPO / "tools" / "predict.py"), "--model", "nb-tiny", "--config-file", "c.yaml", "--input",
                 image, "--output", "o"], zoo, tmp_path)
    assert both.returncode == 2 and "not both" in both.stderr


def test_train_net_evaluates_and_fine_tunes_a_zoo_entry(use_zoo, tmp_path):
    """``--config-file zoo:NAME``: --eval-only scores the entry (its card's held-out number: the same images here);
    training starts from its weights."""
    tool = load_tool("train_net")
    assert tool.main(["--config-file", "zoo:nb-tiny", "--eval-only", "MODEL.DEVICE", "cpu",
                      "OUTPUT_DIR", str(tmp_path / "eval")]) == 0
    aji = json.loads((tmp_path / "eval" / "metrics_final.json").read_text())["nuclei"]["AJI"]
    assert aji == pytest.approx(model_zoo.get_entry("nb-tiny").card["held_out"]["scores"]["AJI"], abs=0.01)
    assert tool.main(["--config-file", "zoo:nb-tiny", "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "2",
                      "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "ft")]) == 0
    assert (tmp_path / "ft" / "model_final.pth").is_file()
    saved = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())
    assert saved["MODEL"]["WEIGHTS"] == str(use_zoo / "weights" / "nb-tiny.pth")


# ---- the shipped zoo ----------------------------------------------------------------------------------------------


def test_shipped_zoo_manifest_and_sizes(monkeypatch):
    """The shipped manifest loads; every file is in place, <= 25 MB each and <= 60 MB in all; every model entry's
    card has what the model card promises (training data, minutes, command, held-out scores, speed, licence)."""
    monkeypatch.delenv(model_zoo.ZOO_ENV, raising=False)
    entries = model_zoo.load_manifest(PACKAGE_ZOO)
    total = 0
    for e in entries.values():
        if e.kind == "ensemble":
            continue
        model_zoo.verify_entry(e, PACKAGE_ZOO)
        size = e.weights_path.stat().st_size
        assert size <= 25e6, f"{e.name}: {size / 1e6:.1f} MB"
        total += size
        for key in ("trained_on", "training", "held_out", "seconds_per_tile", "licence", "check"):
            assert key in e.card, f"{e.name}: card lacks {key}"
        assert {"minutes", "iterations", "command"} <= set(e.card["training"]), e.name
    assert total <= 60e6
    tracked = subprocess.run(["git", "ls-files", "nuclei_d2/model_zoo"], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode == 0 and tracked.stdout:
        listed = {e.weights for e in entries.values() if e.kind == "model"}
        weights = {Path(p).relative_to("nuclei_d2/model_zoo").as_posix() for p in tracked.stdout.split()
                   if p.endswith(".pth")}
        assert weights == listed, "every tracked weights file is a manifest entry's, and the other way round"


def _shipped_names() -> list[str]:
    env = os.environ.pop(model_zoo.ZOO_ENV, None)
    try:
        return list(model_zoo.load_manifest(PACKAGE_ZOO))
    finally:
        if env is not None:
            os.environ[model_zoo.ZOO_ENV] = env


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.parametrize("name", _shipped_names() or [pytest.param("none", marks=pytest.mark.skip(
    reason="the shipped zoo has no entries yet"))])
def test_shipped_entry_scores_as_its_card_on_kumar_tiles(name, shared_data, monkeypatch):
    """Every shipped entry loads (sha256 first) and scores within its card's tolerance on its two check tiles."""
    from nuclei_d2.utils.io import read_image_rgb

    monkeypatch.delenv(model_zoo.ZOO_ENV, raising=False)
    entry = model_zoo.get_entry(name)
    check = entry.card["check"]
    root = shared_data / "monuseg2018" / "train"
    records = []
    for image in check["images"]:
        path = next((root / "images").glob(f"{image}.*"))
        h, w = read_image_rgb(path).shape[:2]
        records.append({"file_name": str(path), "label_file": str(root / "labels" / f"{image}.png"),
                        "image_id": image, "height": h, "width": w})
    got = score_records(model_zoo.get_config(name), model_zoo.get(name, device="cpu"), records)
    for r, aji in zip(got, check["AJI"], strict=True):
        assert r["AJI"] == pytest.approx(aji, abs=check["tolerance"]), (name, r["image"])


def test_ensemble_benchmark_takes_zoo_members(use_zoo, tiny_run, tmp_path, capsys):
    """``benchmarks/ensemble.py --member NAME=zoo:ENTRY``: the entry scores as the run it was packed from."""
    import csv

    bench = load_script("benchmarks/ensemble.py")
    assert bench.parse_member("z=zoo:nb-tiny") == ("z", "zoo:nb-tiny", str(use_zoo / "weights" / "nb-tiny.pth"))
    assert bench.main(["--member", "z=zoo:nb-tiny", "--member", f"run={tiny_run}", "--dataset", "nuclei_synth_test",
                       "--ensembles", "z+run", "--output-dir", str(tmp_path / "bench")]) == 0
    with open(tmp_path / "bench" / "table.csv") as f:
        rows = {r["row"]: r for r in csv.DictReader(f)}
    assert float(rows["z"]["AJI"]) == pytest.approx(float(rows["run"]["AJI"]), abs=0.005)
    assert "z" in capsys.readouterr().out


# ---- the flagship and the demo's zoo step -------------------------------------------------------------------------


def test_flagship_is_set_by_the_builder_and_checked(zoo, tiny_run, tmp_path):
    root = _copy_zoo(zoo, tmp_path / "zoo")
    assert model_zoo.flagship(root) is None
    held = tiny_run / "inference" / "nuclei_synth_test" / "nuclei_results.json"
    pack_model_entry("nb-lead", str(tiny_run / "config.yaml"), str(tiny_run / "model_final.pth"), root=root,
                     held_out=str(held), check_dataset="nuclei_synth_test", check_images=1, flagship=True)
    assert model_zoo.flagship(root) == "nb-lead"
    assert list(model_zoo.load_manifest(root)) == ["nb-tiny", "nb-tiny-fp32", "nb-lead"]
    # rebuilding another entry keeps the flagship; a manifest naming a flagship that is no entry is refused
    text = (root / "manifest.yaml").read_text()
    assert "flagship: nb-lead" in text
    (root / "manifest.yaml").write_text(text.replace("flagship: nb-lead", "flagship: nb-gone"))
    with pytest.raises(ConfigError, match="flagship 'nb-gone' is not an entry; entries: nb-tiny, nb-tiny-fp32, "
                                          "nb-lead"):
        model_zoo.load_manifest(root)


def test_zoo_demo_writes_outputs_and_a_command_that_works(zoo, tmp_path, monkeypatch, capsys):
    """The demo's zoo step segments the tile with the flagship, writes overlay / GeoJSON / CSV, and the command it
    prints does the same from the shell (same nucleus count)."""
    from nuclei_d2.engine.demo import run_zoo_demo

    root = _copy_zoo(zoo, tmp_path / "zoo")
    monkeypatch.setenv(model_zoo.ZOO_ENV, str(root))
    image = dataset_records("nuclei_synth_test", 1)[0]["file_name"]
    assert run_zoo_demo(image, tmp_path / "none") is None  # no flagship: said, nothing written
    assert "no flagship entry" in capsys.readouterr().out and not (tmp_path / "none").exists()

    text = (root / "manifest.yaml").read_text()
    (root / "manifest.yaml").write_text(text + "flagship: nb-tiny\n")
    assert model_zoo.flagship() == "nb-tiny" and "flagship (what scripts/demo.sh runs): nb-tiny" in \
        model_zoo.format_table()
    summary = run_zoo_demo(image, tmp_path / "demo")
    out = capsys.readouterr().out
    assert summary["model"] == "nb-tiny" and summary["nuclei_predicted"] > 0
    for kind in ("overlay", "geojson", "csv"):
        assert Path(summary[kind]).is_file() and summary[kind] in out, kind
    features = json.loads(Path(summary["geojson"]).read_text())["features"]
    assert len(features) == summary["nuclei_predicted"]
    assert summary["command"] in out and "--model nb-tiny" in summary["command"]
    command = summary["command"].replace("YOUR_IMAGE_OR_SLIDE", image).replace("OUT_FOLDER", str(tmp_path / "me"))
    env = {**os.environ, model_zoo.ZOO_ENV: str(root)}
    done = subprocess.run([*command.split(), "--no-progress"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    mine = json.loads((tmp_path / "me" / f"{Path(image).stem}.geojson").read_text())["features"]
    assert len(mine) == len(features)


def test_demo_tool_zoo_only_refuses_a_tampered_flagship(zoo, tmp_path):
    root = _copy_zoo(zoo, tmp_path / "zoo")
    (root / "manifest.yaml").write_text((root / "manifest.yaml").read_text() + "flagship: nb-tiny\n")
    (root / "weights" / "nb-tiny.pth").write_bytes(b"altered")
    proc = _run([str(REPO / "tools" / "demo.py"), "--zoo-only", "--output", str(tmp_path / "demo")], root, tmp_path)
    assert proc.returncode == 2 and "nb-tiny.pth: sha256" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "demo" / "zoo").exists()
