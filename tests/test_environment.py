"""The environment around the code: a clone runs its own code whatever the shared venv holds (tools, pytest,
scripts/setup_env.sh), scripts/test.sh fails on tests' leftovers, and the licence is declared."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

TOOLS = sorted((REPO / "tools").glob("*.py"))

# Runs a tool file's top level (not its main) and says where `nuclei_d2` would be imported from, without importing it.
PROBE = ("import importlib.util, runpy, sys; runpy.run_path(sys.argv[1], run_name='probe'); "
         "print(importlib.util.find_spec('nuclei_d2').origin)")


@pytest.fixture(scope="module")
def clone_b(tmp_path_factory) -> Path:
    """Another clone of this repository, whose nuclei_d2 reports another version and says when it is imported.

    Putting it on PYTHONPATH stands for the venv having clone B installed (an editable install is found after
    PYTHONPATH, so this shadows this clone more strongly than the old setup_env.sh did).
    """
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout")
    b = tmp_path_factory.mktemp("clones") / "B"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{REPO}", str(b)], check=True, timeout=120)
    (b / "nuclei_d2" / "version.py").write_text('__version__ = "0.0.0+clone-b"\n')
    init = b / "nuclei_d2" / "__init__.py"
    init.write_text('import sys\nsys.stderr.write("nuclei_d2 of clone B imported\\n")\n' + init.read_text())
    return b


def _env_with(b: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(b), OMP_NUM_THREADS="1")


@pytest.mark.parametrize("tool", TOOLS, ids=[t.stem for t in TOOLS])
def test_every_tool_imports_its_own_clone(tool, clone_b):
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tool)], capture_output=True, text=True, timeout=300,
                          cwd=clone_b, env=_env_with(clone_b))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(REPO / "nuclei_d2" / "__init__.py"), (
        f"{tool.name} would import {proc.stdout.strip()}: it must put its own clone first on sys.path")


@pytest.mark.parametrize("script", sorted((REPO / "benchmarks").glob("*.py")), ids=lambda p: p.stem)
def test_every_benchmark_puts_its_own_clone_first(script):
    """Benchmarks are run as scripts too (``python benchmarks/x.py``); read, not run (each imports torch)."""
    tree = ast.parse(script.read_text())
    imports = [n.lineno for n in ast.walk(tree)
               if isinstance(n, ast.Import) and any(a.name.split(".")[0] == "nuclei_d2" for a in n.names)
               or isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "nuclei_d2"]
    if not imports:
        pytest.skip("does not import nuclei_d2")
    inserts = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "sys.path.insert"]
    first_import, insert = min(imports), min(inserts, default=-1)
    assert 0 <= insert < first_import, f"{script.name}: put the clone on sys.path before importing nuclei_d2"


def test_a_tool_run_from_another_clone_runs_this_clones_code(clone_b, tmp_path):
    """A real run (up to its config check): nothing of clone B is imported."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "demo.py"), "--config-file",
                           str(tmp_path / "missing.yaml")], capture_output=True, text=True, timeout=300,
                          cwd=clone_b, env=_env_with(clone_b))
    assert "clone B" not in proc.stderr
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr, proc.stderr[-3000:]


def test_pytest_imports_this_clone(clone_b, tmp_path):
    probe = tmp_path / "test_probe.py"
    probe.write_text("import importlib.util\n\n\ndef test_origin():\n"
                     "    assert importlib.util.find_spec('nuclei_d2').origin == "
                     f"{str(REPO / 'nuclei_d2' / '__init__.py')!r}\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
                           str(REPO / "pyproject.toml"), "--rootdir", str(REPO), str(probe)],
                          capture_output=True, text=True, timeout=300, cwd=clone_b, env=_env_with(clone_b))
    assert proc.returncode == 0, proc.stdout[-3000:]


# ---- scripts/setup_env.sh, run against a stand-in venv (it never builds one here) -----------------------------------

FAKE_PYTHON = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/../calls.log"
exit 0
"""


def _fake_venv(root: Path, installed: bool) -> Path:
    """A finished venv as setup_env.sh sees it: the marker, a python that logs its arguments, and optionally a
    previous editable install of nuclei-d2 in site-packages."""
    venv = root / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".nuclei-d2-complete").touch()
    py = venv / "bin" / "python"
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    sp = venv / "lib" / "python3.11" / "site-packages"
    sp.mkdir(parents=True)
    if installed:
        (sp / "nuclei_d2-0.1.0.dist-info").mkdir()
        (sp / "__editable__.nuclei_d2-0.1.0.pth").write_text("import __editable___nuclei_d2_0_1_0_finder\n")
    return venv


def _setup_env(*args: str, env: dict[str, str] | None = None, script: Path = REPO / "scripts" / "setup_env.sh"):
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, NUCLEI_D2_PYTHON=sys.executable, **(env or {})))


@pytest.mark.parametrize("installed", [False, True])
def test_setup_env_never_installs_the_clone_and_removes_an_old_install(tmp_path, installed):
    venv = _fake_venv(tmp_path, installed)
    proc = _setup_env(env={"NUCLEI_D2_VENV": str(venv)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(venv)
    log = (tmp_path / "venv" / "calls.log")
    calls = log.read_text().splitlines() if log.is_file() else []
    assert not [c for c in calls if "install" in c.split() and ("-e" in c.split() or str(REPO) in c)], calls
    assert any("uninstall" in c.split() and "nuclei-d2" in c.split() for c in calls) == installed, calls


def test_setup_env_key_ignores_comments_but_not_pins(tmp_path):
    """``--path`` prints the venv a run would use without building it; comment edits keep it, a pin change moves it."""
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "setup_env.sh"
    text = (REPO / "scripts" / "setup_env.sh").read_text()
    shutil.copy(REPO / "requirements.txt", tmp_path / "requirements.txt")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}

    def path_for(script_text: str, requirements: str | None = None) -> str:
        script.write_text(script_text)
        if requirements is not None:
            (tmp_path / "requirements.txt").write_text(requirements)
        proc = _setup_env("--path", env=env, script=script)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    base = path_for(text)
    assert base.startswith(str(tmp_path / "cache" / "nuclei-d2" / "venv-"))
    assert not (tmp_path / "cache").exists()  # nothing built
    assert path_for(text.replace("\n#", "\n# reworded:\n#", 1) + "\n   # a trailing comment line\n\n") == base
    assert path_for(re.sub(r"torch==\S+", "torch==0.0.1", text, count=1)) != base
    requirements = (REPO / "requirements.txt").read_text()
    assert path_for(text, requirements + "\nsomething-new==1.0\n") != base


# ---- scripts/test.sh: leftovers of the tests ------------------------------------------------------------------------

LEAKY_TEST = """import os, tempfile


def test_leaks():
    with open(os.path.join(tempfile.gettempdir(), "big.bin"), "wb") as f:
        f.write(b"x" * (3 << 20))
"""


def _fake_venv_running(root: Path) -> Path:
    """A finished venv whose python is this interpreter (setup_env.sh reuses it; nothing is installed)."""
    venv = root / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".nuclei-d2-complete").touch()
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    return venv


@pytest.mark.parametrize("leak", [False, True])
def test_test_sh_fails_when_the_tests_leave_temporary_files(tmp_path, leak):
    test_file = tmp_path / "probe" / "test_writes.py"
    test_file.parent.mkdir()
    # Without the leak, the same file goes to a folder of the test's own instead of the temp folder.
    test_file.write_text(LEAKY_TEST if leak else LEAKY_TEST.replace("tempfile.gettempdir()",
                                                                    repr(str(tmp_path / "probe"))))
    env = dict(os.environ, NUCLEI_D2_VENV=str(_fake_venv_running(tmp_path)), NUCLEI_D2_TEST_LEFTOVER_MB="1",
               TMPDIR=str(tmp_path / "sys_tmp"))
    (tmp_path / "sys_tmp").mkdir()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "test.sh"), "-p", "no:cacheprovider", str(test_file)],
                          capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert "1 passed" in out, out[-3000:]
    if leak:
        assert proc.returncode != 0 and "error: the tests left 3 MB in the temporary folder" in out, out[-3000:]
        assert "big.bin" in out  # the largest entries are named
    else:
        assert proc.returncode == 0 or "All checks passed" not in out, out[-3000:]
        assert "error: the tests left" not in out and "the tests left 0 MB" in out, out[-3000:]
        assert list((tmp_path / "sys_tmp").iterdir()) == []  # its private temp folder is gone


OUTPUT_WRITER = """from pathlib import Path

CLONE = Path(__file__).resolve().parents[1]


def test_writes_output():
    (CLONE / "output" / "run").mkdir(parents=True)
    (CLONE / "output" / "run" / "metrics.json").write_text("{}")


def test_writes_elsewhere(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
"""


def test_conftest_fails_a_test_writing_into_output_and_leaves_no_temp_files(tmp_path):
    """tests/conftest.py in a stand-in clone: the writer into output/ errors, naming the file; the generated-datasets
    folder it makes in the temp folder is gone when the run ends."""
    clone = tmp_path / "clone"
    (clone / "tests").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "conftest.py", clone / "tests" / "conftest.py")
    (clone / "tests" / "test_probe.py").write_text(OUTPUT_WRITER)
    (tmp_path / "sys_tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "NUCLEI_D2_DATASETS"}
    env.update(TMPDIR=str(tmp_path / "sys_tmp"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
                           "tmp_path_retention_policy=failed", str(clone / "tests")], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "2 passed, 1 error" in proc.stdout, proc.stdout[-3000:]  # errors at teardown
    assert "test_writes_output" in proc.stdout and "wrote into the clone's output/" in proc.stdout
    assert "metrics.json" in proc.stdout
    left = [p.name for p in (tmp_path / "sys_tmp").iterdir() if not p.name.startswith("pytest-of-")]
    assert left == [], left


def test_pytest_keeps_only_failed_tests_tmp_path():
    import tomllib

    ini = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert ini.get("tmp_path_retention_policy") == "failed"


# ---- licence ---------------------------------------------------------------------------------------------------------

def test_licence_file_and_package_metadata_agree(tmp_path):
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10000  # the full text, not a pointer to it
    # The metadata a wheel would carry (built into tmp_path: nothing is written into the clone).
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "deprecat" not in proc.stderr.lower(), proc.stderr[-2000:]
    meta = (tmp_path / "nuclei_d2.egg-info" / "PKG-INFO").read_text().splitlines()
    assert "License-Expression: Apache-2.0" in meta and "License-File: LICENSE" in meta
    assert "Requires-Python: >=3.10" in meta and any(m.startswith("Classifier: Programming Language") for m in meta)
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Licences", 1)[1] if "## Licences" in readme else ""
    for needle in ("Apache", "CC BY-NC-SA 4.0", "CC0", "non-commercial", "LICENSE"):
        assert needle in section, needle
