"""Layers only point down: no module of nuclei_d2 imports from a layer above its own (docs/architecture.md).

Every ``import`` / ``from ... import`` in every module counts, including those inside functions (a lazy import is
still a dependency). The package root ``nuclei_d2/__init__.py`` may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "nuclei_d2"

#: Bottom to top; a module may import from its own layer and the layers below. Keep in step with docs/architecture.md.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "version", "utils", "layers"),
    ("structures", "postprocess", "config", "checkpoint", "solver"),
    ("stain",),
    ("data",),
    ("modeling",),
    ("export",),
    ("evaluation",),
    ("inference",),
    ("model_zoo",),
    ("engine",),
)
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in ``source`` (relative imports resolved against ``module``).

    ``from . import x`` yields ``<package>.x`` (x may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                prefix = ".".join(base)
                if node.module:
                    out.append((node.lineno, f"{prefix}.{node.module}"))
                else:
                    out += [(node.lineno, f"{prefix}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module or ""))
    return out


def _layer(module: str, root: str) -> str | None:
    """The top-level part of ``root`` that ``module`` belongs to (``nuclei_d2.data.mapper`` -> ``data``)."""
    parts = module.split(".")
    return parts[1] if parts[0] == root and len(parts) > 1 else None


def upward_imports(package: Path, layers: dict[str, int]) -> list[str]:
    """One line per import of a module from a layer above its own; also parts of the package no layer names."""
    root = package.name
    problems = []
    for path in sorted(package.rglob("*.py")):
        module = _module_name(path, package)
        own = _layer(module, root)
        if own is None:  # the package root may import anything
            continue
        if own not in layers:
            problems.append(f"{module}: its folder/module {own!r} is in no layer (add it to LAYERS)")
            continue
        for line, target in imported_modules(path.read_text(), module, path.name == "__init__.py"):
            other = _layer(target, root)
            if other is None or other == own:
                continue
            if other not in layers:
                problems.append(f"{module}:{line} imports {target}, which is in no layer")
            elif layers[other] > layers[own]:
                problems.append(f"{module}:{line} imports {target} ({other!r} is above {own!r})")
    return problems


def test_no_module_imports_from_a_layer_above():
    problems = upward_imports(PACKAGE, LEVEL)
    assert not problems, "imports that point up the layers (docs/architecture.md):\n" + "\n".join(problems)


def test_every_top_level_part_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    assert parts == set(LEVEL), f"in no layer: {sorted(parts - set(LEVEL))}; gone: {sorted(set(LEVEL) - parts)}"


def test_layer_order_matches_docs():
    doc = (REPO / "docs" / "architecture.md").read_text()
    line = " -> ".join(", ".join(names) for names in LAYERS)
    assert line in doc, f"docs/architecture.md should state the layer order as: {line}"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("statement", [
    "from ..modeling.net import Net\n",  # relative, at module level
    "def f():\n    from pkg.modeling import net\n",  # absolute, inside a function
    "import pkg.modeling.net\n",
    "from .. import modeling\n",
])
def test_an_upward_import_is_reported(tmp_path, statement):
    pkg = tmp_path / "pkg"
    _write(pkg / "__init__.py", "from . import utils, modeling\n")  # the root may import anything
    _write(pkg / "utils" / "__init__.py", "")
    _write(pkg / "utils" / "io.py", statement)
    _write(pkg / "modeling" / "__init__.py", "")
    _write(pkg / "modeling" / "net.py", "from ..utils.io import *\nclass Net: ...\n")  # downward: fine
    problems = upward_imports(pkg, {"utils": 0, "modeling": 1})
    assert len(problems) == 1 and problems[0].startswith("pkg.utils.io:"), problems
    assert "pkg.modeling" in problems[0] and "'modeling' is above 'utils'" in problems[0]


def test_downward_and_same_layer_imports_pass(tmp_path):
    pkg = tmp_path / "pkg"
    _write(pkg / "__init__.py", "")
    _write(pkg / "utils" / "__init__.py", "from .io import read\n")
    _write(pkg / "utils" / "io.py", "import os\ndef read(): ...\n")
    _write(pkg / "layers" / "__init__.py", "from ..utils import io\n")  # same layer
    _write(pkg / "modeling" / "__init__.py", "from ..utils.io import read\nfrom ..layers import io\n")
    assert upward_imports(pkg, {"utils": 0, "layers": 0, "modeling": 1}) == []
