#!/usr/bin/env python
"""Segment nuclei in images, folders, large tiles and whole slides; write GeoJSON (QuPath), COCO results, label maps,
per-nucleus CSV measurements and overlays. See docs/inference.md.

    python tools/predict.py --config-file configs/maskrcnn_baseline.yaml --weights model_final.pth \\
        --input slides/ --output out --outputs geojson csv overlay --tissue-mask MODEL.DEVICE cpu
"""

import logging
import sys

import nuclei_d2  # noqa: F401  (registers datasets and models)
from nuclei_d2.inference.run import predict_main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(predict_main())
