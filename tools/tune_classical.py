#!/usr/bin/env python
"""Tune the classical floor's parameters on a registered training split and write them as a config file.

    python tools/tune_classical.py --config-file configs/classical_watershed.yaml --dataset kumar_train
    python tools/tune_classical.py --threshold-scale 0.9 1.0 1.1 --sigma-factor 0.5 --min-size 30 --max-images 4
    python tools/train_net.py --config-file output/classical_watershed/tuned.yaml --eval-only

Everything lives in nuclei_d2.engine.tune_classical; docs/classical.md explains the method.
"""

import sys

from nuclei_d2.engine.tune_classical import main

if __name__ == "__main__":
    sys.exit(main())
