#!/usr/bin/env python
"""Convert nuclei datasets to COCO instance-segmentation JSON (and back); prepare the built-in datasets.

    python tools/convert_dataset.py prepare-builtin monuseg2018 --source ../shared/data/monuseg2018
    python tools/convert_dataset.py monuseg-xml --images DIR --xml DIR --out kumar.json \
        --split-file splits.json --split kumar2017/train
    python tools/convert_dataset.py labels --images DIR --labels DIR --out mine.json
    python tools/convert_dataset.py to-labels --json mine.json --out-dir labels/

Run with -h (or COMMAND -h) for every option; docs/data.md explains formats and conventions.
"""

import sys

from nuclei_d2.data.converters.cli import main

if __name__ == "__main__":
    sys.exit(main())
