#!/usr/bin/env bash
# Cellpose in its own venv with torch on CPU. Cellpose 3.1.1.2, the last release that trains from scratch: Cellpose 4
# (4.2.1.1, the current release) refuses `CellposeModel(pretrained_model=None)` with "Must specify a pretrained model,
# training from scratch is not implemented", and its pretrained weights (cpsam) cannot be downloaded here.
# Torch 2.14.1 (nuclei-d2's own version) comes from the PyTorch CPU wheel index when it answers, otherwise from PyPI
# (the CUDA build, which runs on CPU too and brings ~3 GB of CUDA libraries).
# Usage: bash benchmarks/peers/setup_cellpose.sh   -> prints the venv path last.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

install_cellpose() {
    local index=()
    if torch_cpu_index_reachable "$1"; then
        index=(--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple)
    fi
    "$1" -m pip install -q "${index[@]}" "torch==2.14.1"
    "$1" -m pip install -q "cellpose==3.1.1.2" "torch==2.14.1" "numpy==2.0.2" "numba==0.61.2" "llvmlite==0.44.0" \
        "tifffile==2025.5.10" "pillow==11.3.0"
}

peer_venv cellpose "${BASH_SOURCE[0]}" \
    "import torch, cellpose; from cellpose import models, train; print(torch.__version__)" \
    install_cellpose
