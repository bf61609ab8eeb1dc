#!/usr/bin/env bash
# StarDist 2D in its own venv: CPU TensorFlow 2.15 (Keras 2, the combination StarDist/CSBDeep test most), numpy<2.
# Usage: bash benchmarks/peers/setup_stardist.sh   -> prints the venv path last.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

install_stardist() {
    "$1" -m pip install -q "tensorflow-cpu==2.15.1" "stardist==0.9.2" "csbdeep==0.8.2" "numpy==1.26.4" \
        "numba==0.60.0" "llvmlite==0.43.0" "scikit-image==0.24.0" "tifffile==2024.8.30" "imageio==2.35.1" \
        "pillow==10.4.0"
}

peer_venv stardist "${BASH_SOURCE[0]}" \
    "import tensorflow, stardist, csbdeep; from stardist.models import StarDist2D; print(tensorflow.__version__)" \
    install_stardist
