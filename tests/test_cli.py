"""Tool start-up as a user meets it: ``--help`` and argument errors come back without importing torch, a run prints
no third-party deprecation warnings, and dataset problems are one line naming what to do."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import CONFIGS, REPO

TOOLS = ["convert_dataset", "demo", "evaluate", "predict", "train_net", "tune_classical", "tune_inference"]
TINY = str(CONFIGS / "maskrcnn_baseline-tiny.yaml")

# Runs a tool as ``python tools/<name>.py ARGS`` would, then reports whether torch got imported; exits with the tool's
# status. Imports only the standard library itself.
WRAPPER = """
import runpy, sys
path, args = sys.argv[1], sys.argv[2:]
sys.argv = [path, *args]
code = 0
try:
    runpy.run_path(path, run_name="__main__")
except SystemExit as e:
    code = e.code
sys.stderr.write(f"\\nTORCH_IMPORTED={'torch' in sys.modules}\\n")
sys.exit(code)
"""


def run_tool_wrapped(python: str, tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", WRAPPER, str(REPO / "tools" / f"{tool}.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("tool", TOOLS)
def test_help_does_not_import_torch(python, tool):
    proc = run_tool_wrapped(python, tool, "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout
    assert "TORCH_IMPORTED=False" in proc.stderr, f"{tool} --help imported torch"


@pytest.mark.parametrize("tool", TOOLS)
def test_argument_error_exits_2_without_torch(python, tool):
    proc = run_tool_wrapped(python, tool, "--no-such-option")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr  # unknown option, or missing required ones
    assert "TORCH_IMPORTED=False" in proc.stderr, f"{tool}: an argument error imported torch"


def test_train_net_parser_keeps_detectron2_options():
    from conftest import load_tool

    tool = load_tool("train_net")
    args = tool.build_parser().parse_args(["--config-file", "a.yaml", "--resume", "--num-gpus", "2", "--num-machines",
                                           "3", "--machine-rank", "1", "SOLVER.MAX_ITER", "5"])
    assert (args.config_file, args.resume, args.eval_only, args.num_gpus, args.num_machines, args.machine_rank) == (
        "a.yaml", True, False, 2, 3, 1)
    assert args.opts == ["SOLVER.MAX_ITER", "5"]
    # Detectron2's default: a port derived from the user id, the same in every run of this user.
    port = 2**15 + 2**14 + hash(os.getuid()) % 2**14
    assert tool.resolve_dist_url(args).dist_url == f"tcp://127.0.0.1:{port}"
    args = tool.build_parser().parse_args(["--dist-url", "auto", "--eval-only"])
    assert tool.resolve_dist_url(args).dist_url == "auto" and args.eval_only and args.opts == []


@pytest.mark.slow
def test_a_run_prints_no_third_party_deprecation_warnings(python, tmp_path):
    """One training iteration and the evaluation after it: Detectron2's and fvcore's ``torch.jit.script`` at import
    (FutureWarning) and Detectron2's anchor grid (``torch.meshgrid`` UserWarning) are not the user's business."""
    cmd = [python, str(REPO / "tools" / "train_net.py"), "--config-file", TINY, "MODEL.DEVICE", "cpu",
           "OUTPUT_DIR", str(tmp_path / "out"), "SOLVER.MAX_ITER", "1", "DATASETS.SYNTHETIC.NUM_TEST", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FutureWarning" not in proc.stderr, proc.stderr[-3000:]
    assert "torch.meshgrid" not in proc.stderr, proc.stderr[-3000:]


def test_own_warnings_are_still_shown():
    """The filters are narrow: a user's own FutureWarning (and torch's, outside the imports we silence) still shows."""
    import warnings

    import nuclei_d2  # noqa: F401

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        warnings.warn("mine", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["mine"]
    assert not any(f[0] == "ignore" and f[1] is None and f[2] in (Warning, FutureWarning, UserWarning)
                   for f in warnings.filters), "a blanket ignore filter"


def test_unregistered_dataset_lists_ours_and_counts_detectron2s():
    from nuclei_d2.data.datasets import register_nuclei_dataset, unregister_nuclei_dataset
    from nuclei_d2.engine.defaults import ConfigError, check_datasets

    register_nuclei_dataset("my_own_tiles", "/nonexistent/my_own_tiles.json")
    try:
        with pytest.raises(ConfigError) as err:
            check_datasets(["kumar_trian"], "DATASETS.TRAIN")
    finally:
        unregister_nuclei_dataset("my_own_tiles")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("DATASETS.TRAIN: dataset 'kumar_trian' is not registered. Did you mean kumar_train")
    for name in ("kumar_train", "kumar_test", "monuseg2018_train", "pannuke_fold1_types", "nuclei_synth_train",
                 "my_own_tiles"):
        assert name in msg
    assert "coco_2017_train" not in msg and "lvis_v1_val" not in msg
    assert "and 52 Detectron2 built-ins (COCO, LVIS, Cityscapes, VOC, ADE20K)" in msg
    # a close match among Detectron2's names is still suggested
    with pytest.raises(ConfigError, match="Did you mean coco_2017_train"):
        check_datasets(["coco_2017_trian"], "DATASETS.TEST")


@pytest.mark.slow
def test_unprepared_builtin_dataset_is_one_line_naming_the_file_and_command(python, tmp_path):
    empty = tmp_path / "datasets"
    empty.mkdir()
    cmd = [python, str(REPO / "tools" / "train_net.py"), "--config-file", TINY, "MODEL.DEVICE", "cpu",
           "OUTPUT_DIR", str(tmp_path / "out"), "DATASETS.TRAIN", "('kumar_train',)"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "NUCLEI_D2_DATASETS": str(empty), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "kumar_train" in line]
    assert len(errors) == 1, proc.stderr
    line = errors[0]
    assert line.startswith("error: DATASETS.TRAIN: dataset 'kumar_train' is not prepared")
    assert str(empty / "kumar" / "kumar_train.json") in line
    assert "python tools/convert_dataset.py prepare-builtin monuseg2018 --source" in line
    assert not (tmp_path / "out").exists()


def test_unprepared_user_dataset_names_its_json(tmp_path):
    from nuclei_d2.data.datasets import register_nuclei_dataset, unregister_nuclei_dataset
    from nuclei_d2.engine.defaults import ConfigError, check_datasets

    register_nuclei_dataset("my_unprepared", tmp_path / "mine.json")
    try:
        with pytest.raises(ConfigError, match=r"--dataset: dataset 'my_unprepared' is not prepared: .*mine\.json"):
            check_datasets(["my_unprepared"], "--dataset")
        check_datasets(["my_unprepared"], "--dataset", prepared=False)  # registered is all that is asked
        (tmp_path / "mine.json").write_text("{}")
        check_datasets(["my_unprepared"], "--dataset")
    finally:
        unregister_nuclei_dataset("my_unprepared")


@pytest.fixture
def broken_dataset(tmp_path):
    """A registered dataset whose JSON exists but lists an image file that does not."""
    import json

    from nuclei_d2.data.datasets import register_nuclei_dataset, unregister_nuclei_dataset

    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": str(tmp_path / "gone.png"), "height": 8,
                                            "width": 8}],
                                "annotations": [], "categories": [{"id": 1, "name": "nucleus"}]}))
    register_nuclei_dataset("broken_images_ds", path)
    yield path
    unregister_nuclei_dataset("broken_images_ds")


@pytest.mark.parametrize("tool", ["tune_classical", "tune_inference"])
def test_tune_tools_report_missing_images_in_one_line(tool, broken_dataset, tmp_path, capsys):
    from conftest import load_tool

    args = [] if tool == "tune_classical" else ["--grid", "MODEL.CLASSICAL.MIN_SIZE=5,10"]
    args += ["--config-file", str(CONFIGS / "classical_watershed.yaml"), "--dataset", "broken_images_ds",
             "--output", str(tmp_path / "tuned.yaml")]
    assert load_tool(tool).main([*args, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "broken_images_ds" in err and "gone.png" in err
    assert not (tmp_path / "tuned.yaml").exists()


@pytest.mark.slow
def test_train_net_reports_missing_images_in_one_line(python, broken_dataset, tmp_path):
    cmd = [python, str(REPO / "tools" / "train_net.py"), "--config-file", TINY, "MODEL.DEVICE", "cpu",
           "OUTPUT_DIR", str(tmp_path / "out"), "DATASETS.REGISTER", repr([f"broken_images_ds:{broken_dataset}"]),
           "DATASETS.TRAIN", "('broken_images_ds',)"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "error: dataset 'broken_images_ds': 1 image file(s) listed in" in proc.stderr and "gone.png" in proc.stderr


@pytest.mark.parametrize("tool_name", ["train_net", "tune_inference"])
def test_allow_pickle_flag_sets_the_config_key(tool_name):
    from conftest import load_tool

    tool = load_tool(tool_name)
    parser = tool.build_parser()
    assert "arbitrary code" in parser.format_help()
    base = ["--config-file", TINY] + (["--grid", "MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.5"] if tool_name != "train_net"
                                      else [])
    args = parser.parse_args([*base, "--allow-pickle", "MODEL.DEVICE", "cpu"])
    if tool_name == "train_net":
        args = tool.resolve_dist_url(args)
    else:  # tune_inference adds the override in main(), before the package sees the arguments
        args.opts = [*args.opts, "MODEL.CHECKPOINT.ALLOW_PICKLE", "True"] if args.allow_pickle else args.opts
    assert args.opts[-2:] == ["MODEL.CHECKPOINT.ALLOW_PICKLE", "True"]
    plain = parser.parse_args([*base, "MODEL.DEVICE", "cpu"])
    assert "MODEL.CHECKPOINT.ALLOW_PICKLE" not in (plain.opts or [])


@pytest.mark.slow
def test_train_net_eval_only_reads_a_pkl_only_with_allow_pickle(python, tmp_path):
    """A Detectron2-model-zoo-style ``.pkl`` (a plain pickle of numpy arrays) is refused by default in one line and
    evaluated with ``--allow-pickle``."""
    import pickle

    from nuclei_d2.config import build_cfg
    from nuclei_d2.modeling.build import build_nuclei_model

    model = build_nuclei_model(build_cfg(TINY, ["MODEL.DEVICE", "cpu"]))
    pkl = tmp_path / "zoo_style.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in model.state_dict().items()}, "__author__": "test"}, f)
    cmd = [python, str(REPO / "tools" / "train_net.py"), "--config-file", TINY, "--eval-only", "MODEL.DEVICE", "cpu",
           "MODEL.WEIGHTS", str(pkl), "OUTPUT_DIR", str(tmp_path / "out"), "DATASETS.SYNTHETIC.NUM_TEST", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert str(pkl) in refused.stderr and "--allow-pickle" in refused.stderr
    assert not (tmp_path / "out" / "metrics_final.json").exists()
    allowed = subprocess.run([*cmd[:4], "--allow-pickle", *cmd[4:]], capture_output=True, text=True, timeout=600,
                             cwd=REPO, env=env)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
