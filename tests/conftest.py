"""Shared test fixtures: repository paths, the real-data folder, tiny configs."""

from __future__ import annotations

import atexit
import getpass
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# torch.compile's inductor caches (160+ MB after tests/test_compile.py) go to a folder of this session, removed at exit:
# set before anything imports torch, which reads the location once.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _inductor_cache = tempfile.mkdtemp(prefix="nuclei-d2-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _inductor_cache
    atexit.register(shutil.rmtree, _inductor_cache, ignore_errors=True)
# Its C++ precompiled headers ignore that variable and go to <temp dir>/torchinductor_<user>: removed too when this
# session created the folder.
try:
    _user = getpass.getuser()
except (KeyError, OSError):
    _user = f"uid_{os.getuid()}"
_inductor_default = Path(tempfile.gettempdir()) / f"torchinductor_{_user}"
if not _inductor_default.exists():
    atexit.register(shutil.rmtree, _inductor_default, ignore_errors=True)


def shared_data_root() -> Path:
    """``../shared/data`` beside the clone, or ``$NUCLEI_D2_SHARED_DATA``."""
    return Path(os.environ.get("NUCLEI_D2_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_root()
    if not (root / "monuseg2018").is_dir():
        pytest.skip(f"real data not found at {root} (set NUCLEI_D2_SHARED_DATA); CI provides ../shared/data")
    return root


# Generated data (synthetic tiles) goes to a per-run temp folder unless the caller chose one; set before any test
# module imports nuclei_d2, and inherited by the tools the tests run as subprocesses. Removed when the run ends
# (processes that inherit the variable, such as spawned workers importing this file, make and remove nothing).
if "NUCLEI_D2_DATASETS" not in os.environ:
    _DATASETS_TMP = tempfile.mkdtemp(prefix="nuclei_d2_test_datasets_")
    os.environ["NUCLEI_D2_DATASETS"] = _DATASETS_TMP
    atexit.register(shutil.rmtree, _DATASETS_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


def tiny_cfg(config: str = "maskrcnn_baseline-tiny.yaml", *opts: str):
    """A frozen config built the way tools/train_net.py builds it."""
    from nuclei_d2.engine import setup_cfg

    return setup_cfg(str(CONFIGS / config), ["MODEL.DEVICE", "cpu", *opts])


def load_script(path: str | Path):
    """Import a script of this clone (``tools/*.py``, ``benchmarks/**.py``: scripts, not a package) as a module, to
    call its functions and ``main(argv)``; ``path`` is relative to the repository."""
    import importlib.util

    path = REPO / path
    name = "nuclei_d2_script_" + re.sub(r"\W", "_", str(path.relative_to(REPO).with_suffix("")))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_tool(name: str):
    """Import ``tools/<name>.py`` as a module (:func:`load_script`)."""
    return load_script(f"tools/{name}.py")


# ---- tests never write into the clone's output/ folder ---------------------------------------------------------------
# output/ belongs to the user's runs (the demo, trainings). A test that writes there (a config's default OUTPUT_DIR,
# a tool's default output) fails, naming the paths; give it tmp_path. Seen through Python's audit events, so it covers
# what runs in the test process (give the tools a test runs as subprocesses an OUTPUT_DIR / --output too).
_OUTPUT = str(REPO / "output")
_writes_into_output: list[str] = []


def _audit_output_writes(event: str, args: tuple) -> None:
    if event not in ("open", "os.mkdir", "os.rename", "os.replace", "shutil.copyfile", "shutil.move"):
        return
    try:
        if event == "open":
            path, mode, flags = args
            if isinstance(mode, str):
                writing = any(c in mode for c in "wax+")
            else:
                writing = bool(int(flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        else:  # os.mkdir(path, ...); the others (source, destination, ...)
            path, writing = (args[0] if event == "os.mkdir" else args[1]), True
        if not writing or path is None or isinstance(path, int):
            return
        full = os.path.abspath(os.fsdecode(path))
        if full == _OUTPUT or full.startswith(_OUTPUT + os.sep):
            _writes_into_output.append(full)
    except Exception:  # an audit hook must never break the operation it watches
        return


sys.addaudithook(_audit_output_writes)


@pytest.fixture(autouse=True)
def _no_writes_into_clone_output():
    start = len(_writes_into_output)
    yield
    written = sorted(set(_writes_into_output[start:]))
    if written:
        pytest.fail(f"this test wrote into the clone's output/ folder (give it tmp_path, e.g. OUTPUT_DIR): "
                    f"{written[:5]}", pytrace=False)


def train_batch(cfg, n: int = 2) -> list[dict]:
    """``n`` mapped training records of ``cfg``'s first training set (records the mapper drops are skipped)."""
    from detectron2.data import DatasetCatalog

    from nuclei_d2.data.mapper import NucleiDatasetMapper

    mapper = NucleiDatasetMapper(cfg, is_train=True)
    records = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    out, i = [], 0
    while len(out) < n:
        b = mapper(records[i % len(records)])
        i += 1
        if b is not None:
            out.append(b)
    return out


@pytest.fixture(autouse=True)
def restore_logging():
    """Remove the log handlers a test added (train_net's default_setup, Detectron2's setup_logger run in process): they
    hold pytest's captured stderr, which is closed after the test, and a later test's log line would then print a
    "Logging error" traceback into that test's stderr."""
    import logging

    def loggers():
        return [logging.getLogger(), *(v for v in logging.root.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger))]

    before = {id(lg): list(lg.handlers) for lg in loggers()}
    yield
    for lg in loggers():
        for h in [h for h in lg.handlers if h not in before.get(id(lg), [])]:
            lg.removeHandler(h)
