"""Loading weights never runs code, refuses misfits and damaged files in one line, and checks paths before a run.

Every route a weights file takes (MODEL.WEIGHTS through NucleiPredictor and train_net --eval-only, DISTANCE_NET.WEIGHTS,
STAGE1.WEIGHTS, DENSENET_WEIGHTS, TEST.ENSEMBLE.WEIGHTS) gets a malicious pickle whose unpickling would create a
marker file: the marker must never appear.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, REPO, load_tool, tiny_cfg

from nuclei_d2.config import build_cfg
from nuclei_d2.engine.defaults import RANDOM_INIT_OPTS
from nuclei_d2.errors import CheckpointError, ConfigError

NB = "nb_unet-tiny.yaml"


class Marker:
    """Unpickling this creates ``path``: what a malicious checkpoint would do (run code)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def raw_cfg(config: str, *opts: str):
    """A config without setup_cfg's pre-start checks, so the loader itself is what is tested."""
    return build_cfg(str(CONFIGS / config), ["MODEL.DEVICE", "cpu", *RANDOM_INIT_OPTS, *opts])


def model_of(config: str, *opts: str, seed: int = 0) -> torch.nn.Module:
    from nuclei_d2.modeling import build_nuclei_model

    torch.manual_seed(seed)
    return build_nuclei_model(raw_cfg(config, *opts))


def save(path: Path, state: dict, **extra) -> Path:
    torch.save({"model": state, "iteration": 3, **extra}, path)
    return path


def evil_pth(path: Path, state: dict, marker: Path) -> Path:
    return save(path, state, evil=Marker(marker))


def evil_pkl(path: Path, state: dict, marker: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "test", "evil": Marker(marker)},
                    f)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "code_ran"
    yield path
    assert not path.exists(), "unpickling ran code from a checkpoint"


@pytest.fixture(scope="module")
def nb_state() -> dict:
    return model_of(NB, seed=1).state_dict()


# ---- the loader ----------------------------------------------------------------------------------------------------


def test_loader_reads_state_dicts_and_refuses_code_pickles_and_damaged_files(tmp_path, marker, nb_state):
    from nuclei_d2.checkpoint import load_checkpoint_file

    good = save(tmp_path / "good.pth", nb_state)
    loaded = load_checkpoint_file(good)
    assert loaded["iteration"] == 3 and all(torch.equal(loaded["model"][k], v) for k, v in nb_state.items())

    with pytest.raises(CheckpointError, match=r"evil.pth: refusing to load: .*objects other than tensors"):
        load_checkpoint_file(evil_pth(tmp_path / "evil.pth", nb_state, marker))
    pkl = evil_pkl(tmp_path / "evil.pkl", nb_state, marker)
    with pytest.raises(CheckpointError, match=r"evil.pkl: refusing to load a .pkl .*arbitrary code.*ALLOW_PICKLE"):
        load_checkpoint_file(pkl)

    data = good.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pth").write_bytes(os.urandom(4096))
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    torch.save({"note": "no tensors"}, tmp_path / "notes.pth")
    for name in ("truncated.pth", "random.pth", "empty.pth", "list.pth", "notes.pth", "missing.pth"):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint_file(tmp_path / name, what="MODEL.WEIGHTS")
        msg = str(e.value)
        assert msg.startswith(f"MODEL.WEIGHTS: {tmp_path / name}: ") and "\n" not in msg, msg


def test_pkl_loads_only_when_allowed(tmp_path, nb_state):
    from nuclei_d2.checkpoint import NucleiCheckpointer
    from nuclei_d2.inference.predictor import NucleiPredictor

    pkl = tmp_path / "zoo.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in nb_state.items()}, "__author__": "test"}, f)
    with pytest.raises(CheckpointError, match="refusing to load a .pkl"):
        NucleiPredictor(raw_cfg(NB, "MODEL.WEIGHTS", str(pkl)))
    with pytest.raises(CheckpointError, match="MODEL.WEIGHTS: .*zoo.pkl: refusing"):
        tiny_cfg(NB, "MODEL.WEIGHTS", str(pkl))  # refused before anything starts
    predictor = NucleiPredictor(raw_cfg(NB, "MODEL.WEIGHTS", str(pkl), "MODEL.CHECKPOINT.ALLOW_PICKLE", "True"))
    for k, v in predictor.model.state_dict().items():
        assert torch.equal(v, nb_state[k]), k
    assert tiny_cfg(NB, "MODEL.WEIGHTS", str(pkl), "MODEL.CHECKPOINT.ALLOW_PICKLE", "True").MODEL.WEIGHTS == str(pkl)
    assert NucleiCheckpointer.from_config(predictor.model, raw_cfg(NB)).allow_pickle is False


# ---- every route -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pth", "pkl"])
def test_model_weights_route_never_runs_code(tmp_path, marker, nb_state, kind):
    from nuclei_d2.inference.predictor import NucleiPredictor

    path = (evil_pth if kind == "pth" else evil_pkl)(tmp_path / f"evil.{kind}", nb_state, marker)
    with pytest.raises(CheckpointError, match=f"evil.{kind}: refusing"):
        NucleiPredictor(raw_cfg(NB, "MODEL.WEIGHTS", str(path)))


@pytest.mark.parametrize("kind", ["pth", "pkl"])
def test_distance_weights_route_never_runs_code(tmp_path, marker, kind):
    from nuclei_d2.modeling.maskrcnn_plus import DISTANCE_NET, build_distance_net
    from nuclei_d2.modeling.submodel import SubModel

    net, _ = build_distance_net(SubModel(DISTANCE_NET, str(CONFIGS / "distance_unet-tiny.yaml")))
    path = (evil_pth if kind == "pth" else evil_pkl)(tmp_path / f"evil.{kind}", net.state_dict(), marker)
    with pytest.raises(CheckpointError, match=f"DISTANCE_NET.WEIGHTS: .*evil.{kind}: refusing"):
        model_of("maskrcnn_plus-tiny.yaml", "MODEL.MASKRCNN_PLUS.DISTANCE_NET.WEIGHTS", str(path))


@pytest.mark.parametrize("kind", ["pth", "pkl"])
def test_stage1_weights_route_never_runs_code(tmp_path, marker, kind):
    state = model_of("brpnet-tiny.yaml").state_dict()
    path = (evil_pth if kind == "pth" else evil_pkl)(tmp_path / f"evil.{kind}", state, marker)
    with pytest.raises(CheckpointError, match=f"STAGE1.WEIGHTS: .*evil.{kind}: refusing"):
        model_of("brpnet_stage2-tiny.yaml", "MODEL.BRPNET.STAGE1.WEIGHTS", str(path))


def test_densenet_weights_route_refuses_pickles(tmp_path, marker):
    state = model_of("brpnet-tiny.yaml").tafe.backbone.state_dict()
    path = evil_pkl(tmp_path / "densenet.pkl", state, marker)
    with pytest.raises(CheckpointError, match="DENSENET_WEIGHTS: .*densenet.pkl: refusing"):
        model_of("brpnet-tiny.yaml", "MODEL.BRPNET.DENSENET_WEIGHTS", str(path))


@pytest.mark.parametrize("kind", ["pth", "pkl"])
def test_ensemble_weights_route_never_runs_code(tmp_path, marker, nb_state, kind):
    from nuclei_d2.inference.ensemble import load_ensemble_members

    path = (evil_pth if kind == "pth" else evil_pkl)(tmp_path / f"evil.{kind}", nb_state, marker)
    with pytest.raises(CheckpointError, match=f"evil.{kind}: refusing"):
        load_ensemble_members(raw_cfg(NB), [str(path)])


# ---- the fit check -------------------------------------------------------------------------------------------------


def test_another_architecture_or_width_is_refused_naming_file_config_and_keys(tmp_path, nb_state):
    from nuclei_d2.checkpoint import NucleiCheckpointer
    from nuclei_d2.inference.ensemble import load_ensemble_members
    from nuclei_d2.inference.predictor import NucleiPredictor

    nb = save(tmp_path / "nb.pth", nb_state)
    two_stage = str(CONFIGS / "two_stage_unet-tiny.yaml")
    model = model_of("two_stage_unet-tiny.yaml")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        NucleiCheckpointer.from_config(model, raw_cfg("two_stage_unet-tiny.yaml"), config_file=two_stage).load(str(nb))
    msg = str(e.value)
    assert str(nb) in msg and two_stage in msg and "ALLOW_PARTIAL" in msg and "\n" not in msg
    assert "seg_net.encoder.0.0.weight (not in the file)" in msg and "TwoStageUNet" in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "refused, yet something was loaded"

    wide = save(tmp_path / "wide.pth", model_of(NB, "MODEL.UNET.BASE_CHANNELS", "16").state_dict())
    with pytest.raises(CheckpointError, match=r"wide.pth: does not fit .*of another shape.*\(file 16x3x3x3, model "
                                              r"8x3x3x3\)"):
        NucleiPredictor(raw_cfg(NB, "MODEL.WEIGHTS", str(wide)))
    with pytest.raises(CheckpointError, match="wide.pth: does not fit"):
        load_ensemble_members(raw_cfg(NB), [str(wide)])

    # the explicit override keeps Detectron2's partial loading (fine-tuning from a backbone): what fits is loaded
    predictor = NucleiPredictor(raw_cfg(NB, "MODEL.WEIGHTS", str(wide), "MODEL.CHECKPOINT.ALLOW_PARTIAL", "True"))
    assert predictor.model.state_dict()["unet.encoder.0.0.weight"].shape[0] == 8
    nb_net = {k[len("unet."):]: v for k, v in nb_state.items()}
    save(tmp_path / "backbone.pth", {f"seg_net.{k}": v for k, v in nb_net.items() if k in model.seg_net.state_dict()
                                     and v.shape == model.seg_net.state_dict()[k].shape})
    with pytest.raises(CheckpointError, match="backbone.pth: does not fit"):  # the distance U-Net would stay random
        NucleiCheckpointer(model).load(str(tmp_path / "backbone.pth"))
    NucleiCheckpointer(model, allow_partial=True).load(str(tmp_path / "backbone.pth"))
    loaded = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert loaded and all(k.startswith("seg_net.") for k in loaded)


def test_a_small_head_difference_still_loads(tmp_path):
    """Another number of classes (the usual fine-tuning case) leaves a few head tensors: under the threshold."""
    from nuclei_d2.checkpoint import FIT_THRESHOLD, NucleiCheckpointer, checkpoint_fit

    other = model_of("maskrcnn_baseline-tiny.yaml", "MODEL.ROI_HEADS.NUM_CLASSES", "3", seed=2)
    path = save(tmp_path / "three_classes.pth", other.state_dict())
    model = model_of("maskrcnn_baseline-tiny.yaml")
    fit = checkpoint_fit(model.state_dict(), other.state_dict())
    assert 0 < fit.tensor_share <= FIT_THRESHOLD and fit.mismatched
    NucleiCheckpointer(model).load(str(path))
    key = "backbone.bottom_up.stem.conv1.weight"
    assert torch.equal(model.state_dict()[key], other.state_dict()[key])


def test_fit_threshold_counts_tensors_and_elements():
    from nuclei_d2.checkpoint import checkpoint_fit

    model = {f"t{i}": torch.zeros(10) for i in range(10)} | {"big": torch.zeros(1000)}
    assert checkpoint_fit(model, model).fits()
    one_small_missing = {k: v for k, v in model.items() if k != "t0"}
    assert checkpoint_fit(model, one_small_missing).fits()  # 1/11 tensors, 10/1100 elements
    assert not checkpoint_fit(model, {k: v for k, v in model.items() if k not in ("t0", "t1")}).fits()  # 2/11
    assert not checkpoint_fit(model, {k: v for k, v in model.items() if k != "big"}).fits()  # 91% of elements
    ddp = {f"module.{k}": v for k, v in model.items()}
    assert checkpoint_fit(model, ddp).fits()
    assert checkpoint_fit(model, one_small_missing | {"t1": torch.zeros(1)}).mismatched[0][0] == "t1"


# ---- pre-start checks ----------------------------------------------------------------------------------------------


def test_missing_weights_name_the_key_and_the_command_that_makes_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh working directory: nothing trained yet
    with pytest.raises(ConfigError) as e:
        tiny_cfg("brpnet_stage2-tiny.yaml")
    assert str(e.value) == ("MODEL.BRPNET.STAGE1.WEIGHTS: weights file not found: "
                            "'./output/brpnet-tiny/stage1/model_final.pth'; produce it with: "
                            f"python tools/train_net.py --config-file {CONFIGS / 'brpnet-tiny.yaml'}")
    with pytest.raises(ConfigError, match=r"^MODEL.TWO_STAGE.STAGE1.WEIGHTS: weights file not found: "
                                          r"'./output/two_stage_unet-tiny/stage1/model_final.pth'; produce it with: "
                                          r"python tools/train_net.py --config-file .*two_stage_unet-tiny.yaml$"):
        tiny_cfg("two_stage_unet_stage2-tiny.yaml")
    with pytest.raises(ConfigError, match=r"^MODEL.MASKRCNN_PLUS.DISTANCE_NET.WEIGHTS: weights file not found: "
                                          r"'runs/d/model_final.pth'; produce it with: python tools/train_net.py "
                                          r"--config-file \S*configs/distance_unet-tiny.yaml OUTPUT_DIR runs/d$"):
        tiny_cfg("maskrcnn_plus-tiny.yaml", "MODEL.MASKRCNN_PLUS.DISTANCE_NET.WEIGHTS", "runs/d/model_final.pth")
    with pytest.raises(ConfigError, match=r"^TEST.ENSEMBLE.WEIGHTS\[1\]: weights file not found: '/no/b.pth'$"):
        (tmp_path / "a.pth").write_bytes(b"")
        tiny_cfg(NB, "TEST.ENSEMBLE.WEIGHTS", f"['{tmp_path / 'a.pth'}', '/no/b.pth']")
    with pytest.raises(ConfigError, match="DENSENET_WEIGHTS: weights file not found: '/no/d121.pth'; give torchvision"):
        tiny_cfg("brpnet-tiny.yaml", "MODEL.BRPNET.DENSENET_WEIGHTS", "/no/d121.pth")
    # keys a config inherits but its model does not use are not checked (the ablation without a distance channel)
    tiny_cfg("maskrcnn_plus-tiny.yaml", "MODEL.MASKRCNN_PLUS.DISTANCE_NET.WEIGHTS", "/no/d.pth", "INPUT.EXTRA_CHANNELS",
             "['hematoxylin']", "MODEL.PIXEL_MEAN", "[1.0, 1.0, 1.0, 1.0]", "MODEL.PIXEL_STD", "[1.0, 1.0, 1.0, 1.0]")


def run_train_net(python: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([python, str(REPO / "tools" / "train_net.py"), *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_readme_headline_command_on_a_fresh_clone_is_one_line(python):
    if (REPO / "output" / "distance_unet" / "model_final.pth").is_file():
        pytest.skip("this clone has trained the distance U-Net")
    proc = run_train_net(python, "--config-file", "configs/maskrcnn_plus.yaml")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert error_lines(proc) == [
        "error: MODEL.MASKRCNN_PLUS.DISTANCE_NET.WEIGHTS: weights file not found: "
        "'./output/distance_unet/model_final.pth'; produce it with: "
        "python tools/train_net.py --config-file configs/distance_unet.yaml"]


def test_eval_only_refuses_bad_checkpoints_before_writing_metrics(tmp_path, marker, nb_state, capsys):
    """train_net --eval-only (in process: the same main() as the command line) with a wrong-width, a malicious and a
    truncated checkpoint: exit 2, one line naming the file, nothing evaluated or written."""
    wide = save(tmp_path / "wide.pth", model_of(NB, "MODEL.UNET.BASE_CHANNELS", "16").state_dict())
    evil = evil_pth(tmp_path / "evil.pth", nb_state, marker)
    data = save(tmp_path / "good.pth", nb_state).read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 3])
    config = str(CONFIGS / NB)
    train_net = load_tool("train_net")
    for weights, message in [(wide, f"{wide}: does not fit the NucleusBoundaryUNet of {config}"),
                             (evil, f"{evil}: refusing to load"),
                             (tmp_path / "truncated.pth", f"{tmp_path / 'truncated.pth'}: not a readable")]:
        out = tmp_path / f"out_{weights.stem}"
        code = train_net.main(["--config-file", config, "--eval-only", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out),
                               "MODEL.WEIGHTS", str(weights)])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), err[-3000:]
        assert not (out / "metrics_final.json").exists() and not (out / "inference").exists()


@pytest.mark.slow
def test_resume_works_with_the_safe_loader(tmp_path, monkeypatch):
    """2 iterations, then --resume to 3: optimizer, scheduler and iteration come back through weights_only."""
    import nuclei_d2.checkpoint as ck
    from nuclei_d2.engine import NucleiTrainer

    opts = ["OUTPUT_DIR", str(tmp_path), "SOLVER.CHECKPOINT_PERIOD", "1", "DATASETS.TEST", "()",
            "SOLVER.IMS_PER_BATCH", "2"]
    trainer = NucleiTrainer(tiny_cfg(NB, *opts, "SOLVER.MAX_ITER", "2"))
    trainer.resume_or_load(resume=True)
    trainer.train()
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pth"

    calls = []
    real_load = torch.load
    monkeypatch.setattr(ck.torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    trainer = NucleiTrainer(tiny_cfg(NB, *opts, "SOLVER.MAX_ITER", "3"), config_file=str(CONFIGS / NB))
    assert isinstance(trainer.checkpointer, ck.NucleiCheckpointer)
    trainer.resume_or_load(resume=True)
    assert calls and all(k.get("weights_only") is True for k in calls)
    assert trainer.start_iter == 2
    assert trainer.scheduler.last_epoch == 2 and trainer.optimizer.state  # optimizer and scheduler state restored
    trainer.train()
    final = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == 2
    assert json.loads((tmp_path / "metrics.json").read_text().splitlines()[-1])["iteration"] == 2
