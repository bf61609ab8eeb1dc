#!/usr/bin/env bash
# Build (or reuse) the Python environment nuclei-d2 runs in: PyTorch, Detectron2 and requirements.txt, not the clone.
#
#   bash scripts/setup_env.sh            # prints the venv's path on its last line
#   bash scripts/setup_env.sh --path     # only print the path this clone's requirements map to (builds nothing)
#
# The venv lives outside the clone, keyed by a hash of everything that decides its contents (requirements.txt and
# this script without their comment lines, the interpreter's version, the Detectron2 mode and source), so a second
# run, other clones with the same requirements and CI on the same machine reuse it in seconds; a bare machine builds
# it from scratch (~3-5 minutes here). Editing a comment does not rebuild it; changing a pin or a command does.
#
# The clone itself is never installed into the venv: one venv serves several clones, and an installed clone would
# shadow the others (running clone B's setup made clone A's tools import B's code). Every entry point puts its own
# clone first instead: tools/*.py insert their repository root into sys.path, pytest has `pythonpath = ["."]`
# (pyproject.toml), scripts/*.sh run from the clone. A nuclei-d2 installed by an older version of this script is
# uninstalled. For `import nuclei_d2` elsewhere, use PYTHONPATH=/path/to/clone (or pip install -e in a venv of its own).
#
# Environment knobs:
#   NUCLEI_D2_VENV        use this venv path instead of the cached one
#   NUCLEI_D2_PYTHON      the interpreter to build the venv from (default: python3.11, else python3)
#   NUCLEI_D2_DETECTRON2  how to get Detectron2:
#       auto     (default) official Detectron2 if the interpreter already has it, else the sal-detectron2 wheel
#       sal      always the sal-detectron2 0.7.2 wheel (official commit of April 2024, pure Python here)
#       official build official Detectron2 from $NUCLEI_D2_DETECTRON2_SRC (a local checkout, or a pip URL such as
#                git+https://github.com/facebookresearch/detectron2.git) with --no-build-isolation
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${NUCLEI_D2_PYTHON:-$(command -v python3.11 || command -v python3)}
d2_mode=${NUCLEI_D2_DETECTRON2:-auto}

# torch 2.14.1 + torchvision 0.29.1: the pair that imports together on this machine (2.13.0's torchvision fails with
# "operator torchvision::nms does not exist"), and the newest pip may take from the local wheel cache.
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
# sal-detectron2 0.7.2 is the only PyPI wheel of Detectron2 that installs: official commit of April 2024 plus a
# Python 3.11 fix. It is tagged cp310, hence the --target install below. Its compiled _C is for torch 2.3.1 and is
# not used here: torchvision provides the ops the project needs (ROIAlign, NMS).
SAL_PIN=sal-detectron2==0.7.2

# Comment-only and blank lines are left out of the key, so documentation edits here or in requirements.txt reuse the
# venv; any other change (a pin, a command, the interpreter, the Detectron2 mode or source) builds a new one.
key=$( { grep -hEv '^[[:space:]]*(#|$)' "$here/requirements.txt" "$here/scripts/setup_env.sh"; "$py" --version;
         echo "$d2_mode ${NUCLEI_D2_DETECTRON2_SRC:-}"; } | sha256sum | cut -c1-16)
venv=${NUCLEI_D2_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/nuclei-d2/venv-$key}
if [ "${1:-}" = --path ]; then
  echo "$venv"
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ -f "$venv/.nuclei-d2-complete" ]; then
  echo "[setup] reusing $venv" >&2
else
  echo "[setup] building $venv (a few minutes on a bare machine)" >&2
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  "$py" -m venv "$venv"
  pip=("$venv/bin/python" -m pip)
  "${pip[@]}" install -q --upgrade "pip<26.2" wheel >&2
  "${pip[@]}" install -q "${TORCH_PINS[@]}" >&2
  "${pip[@]}" install -q -r "$here/requirements.txt" >&2
  # staintools' metadata asks for the GUI opencv-python, which would shadow the headless build: install it alone.
  "${pip[@]}" install -q --no-deps staintools==2.1.2 >&2

  if [ "$d2_mode" = official ]; then
    : "${NUCLEI_D2_DETECTRON2_SRC:?set NUCLEI_D2_DETECTRON2_SRC to a detectron2 checkout or pip URL}"
    "${pip[@]}" install -q --no-build-isolation "$NUCLEI_D2_DETECTRON2_SRC" >&2
  elif [ "$d2_mode" = auto ] && "$venv/bin/python" -c 'import detectron2' 2>/dev/null; then
    echo "[setup] detectron2 already importable; keeping it" >&2
  else
    sp=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # Re-running this line only warns about existing targets; --no-deps because fvcore/iopath are pinned above.
    "${pip[@]}" install -q --no-deps --only-binary=:all: --python-version 3.10 --implementation cp \
      --target "$sp" --upgrade "$SAL_PIN" >&2
  fi
  "$venv/bin/python" - <<'PY' >&2
import detectron2, torch, torchvision
from detectron2.modeling import build_model  # noqa: F401  (fails early if fvcore/iopath are off)
print(f"[setup] detectron2 {detectron2.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}")
PY
  touch "$venv/.nuclei-d2-complete"
fi

# No install of the clone (see the top). Remove one an older version of this script made, editable or not: it would
# shadow every clone whose entry point does not put itself first (a `python -c`, a notebook).
if compgen -G "$venv/lib/python*/site-packages/nuclei_d2-*.dist-info" >/dev/null \
   || compgen -G "$venv/lib/python*/site-packages/nuclei_d2.egg-link" >/dev/null \
   || compgen -G "$venv/lib/python*/site-packages/nuclei-d2.egg-link" >/dev/null; then
  echo "[setup] uninstalling the nuclei-d2 an older setup installed into $venv (clones run their own code)" >&2
  "$venv/bin/python" -m pip uninstall -y -q nuclei-d2 >&2
fi
echo "$venv"
