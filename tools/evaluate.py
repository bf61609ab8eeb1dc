#!/usr/bin/env python
"""Score saved nucleus segmentations against ground truth, or compare two prediction sets.

    python tools/evaluate.py --gt GT_LABELS/ --pred PRED_LABELS/ [--output-dir out/]
    python tools/evaluate.py --gt test_coco.json --pred output/inference/coco_instances_results.json
    python tools/evaluate.py --gt GT/ --pred A/ --pred-b B/ --names unet hovernet   # paired Wilcoxon per metric
    python tools/evaluate.py --gt GT/ --pred P/ --organs metadata.json --train-organs liver,breast,kidney,prostate

Metrics and conventions: docs/metrics.md. Everything lives in nuclei_d2.evaluation.offline.
"""

import sys

from nuclei_d2.evaluation.offline import main

if __name__ == "__main__":
    sys.exit(main())
