"""Shared test fixtures: repository paths, the real-data folder, tiny configs."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


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
# module imports nuclei_d2, and inherited by the tools the tests run as subprocesses.
os.environ.setdefault("NUCLEI_D2_DATASETS", tempfile.mkdtemp(prefix="nuclei_d2_test_datasets_"))


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


def tiny_cfg(config: str = "maskrcnn_baseline-tiny.yaml", *opts: str):
    """A frozen config built the way tools/train_net.py builds it."""
    from nuclei_d2.engine import setup_cfg

    return setup_cfg(str(CONFIGS / config), ["MODEL.DEVICE", "cpu", *opts])


def load_tool(name: str):
    """Import ``tools/<name>.py`` as a module (tools are scripts, not a package), to call its ``main(argv)``."""
    import importlib.util

    path = REPO / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"nuclei_d2_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
