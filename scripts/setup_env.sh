#!/usr/bin/env bash
# Build (or reuse) the Python environment nuclei-d2 runs in, and install nuclei_d2 into it in editable mode.
#
#   bash scripts/setup_env.sh            # prints the venv's path on its last line
#
# The venv lives outside the clone, keyed by a hash of everything that decides its contents, so a second run (and CI
# on the same machine) reuses it in seconds; a bare machine builds it from scratch (~2-3 minutes here).
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

key=$( { cat "$here/requirements.txt" "$here/scripts/setup_env.sh"; "$py" --version; echo "$d2_mode"; } \
       | sha256sum | cut -c1-16)
venv=${NUCLEI_D2_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/nuclei-d2/venv-$key}
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

# Editable install of the project itself (cheap; repeated on every run so a moved clone is picked up).
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$here" >&2
echo "$venv"
