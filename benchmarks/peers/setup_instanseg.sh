#!/usr/bin/env bash
# InstanSeg (instanseg-torch) in its own venv with CPU torch. Training goes through the package's
# instanseg.scripts.train.instanseg_training (no console script for it: the only one installed is `inference`).
# Its training imports torchvision, monai, seaborn and edt (the package's "full" extra, not its base requirements), so
# they are pinned here; torch 2.14.1 / torchvision 0.29.1 as in nuclei-d2 (CPU wheel index when it answers, else PyPI).
# Usage: bash benchmarks/peers/setup_instanseg.sh   -> prints the venv path last.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

install_instanseg() {
    local index=()
    if torch_cpu_index_reachable "$1"; then
        index=(--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple)
    fi
    "$1" -m pip install -q "${index[@]}" "torch==2.14.1" "torchvision==0.29.1"
    "$1" -m pip install -q "instanseg-torch==0.1.2" "torch==2.14.1" "torchvision==0.29.1" "monai==1.5.1" \
        "seaborn==0.13.2" "edt==3.1.2" "numpy==2.2.6" "scikit-image==0.25.2" "tifffile==2025.5.10" \
        "pandas==2.3.3" "pillow==11.3.0"
}

peer_venv instanseg "${BASH_SOURCE[0]}" \
    "import torch, instanseg; from instanseg.scripts.train import instanseg_training; from instanseg import InstanSeg; import instanseg.utils.augmentations, instanseg.utils.loss.instanseg_loss, edt" \
    install_instanseg
