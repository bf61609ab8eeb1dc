#!/usr/bin/env python
"""Tune a trained model's inference settings on a registered training split and write them as a config file.

    python tools/tune_inference.py --config-file configs/maskrcnn_plus-cpu.yaml --weights model_final.pth \\
        --dataset kumar_train --grid MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.5,0.7,0.8 \\
        MODEL.ROI_HEADS.NMS_THRESH_TEST=0.3,0.4

Everything lives in nuclei_d2.engine.tune_inference; docs/time_to_accuracy.md shows what it found on Kumar.
"""

import sys

import nuclei_d2  # noqa: F401  (registers datasets and models)
from nuclei_d2.engine.tune_inference import main

if __name__ == "__main__":
    sys.exit(main())
