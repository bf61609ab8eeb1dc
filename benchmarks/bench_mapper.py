#!/usr/bin/env python
"""Training data-loading cost: seconds per sample of ``NucleiDatasetMapper`` with and without the decode cache.

Run by hand (not a test), with the Kumar split prepared (``tools/convert_dataset.py prepare-builtin monuseg2018``):

    python benchmarks/bench_mapper.py [--configs nb_unet-cpu.yaml maskrcnn_plus-cpu.yaml] [--samples 64]

For each config, one mapper per setting (``INPUT.NUCLEI.DECODE_CACHE_MB`` 0, then the config's own value) maps
``--samples`` random training tiles after every tile was mapped once (a loader worker's steady state after its first
epoch); samples are unpickled first, as Detectron2's serialised dataset hands them out. Printed as a table with the
cached/uncached ratio measured in the same run, since machines are noisy.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

import numpy as np
from detectron2.data import DatasetCatalog
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's nuclei_d2, whatever the venv has installed

import nuclei_d2  # noqa: F401  (registers the datasets)
from nuclei_d2.data.mapper import NucleiDatasetMapper
from nuclei_d2.engine import setup_cfg

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def seconds_per_sample(cfg, samples: int, seed: int = 0) -> float:
    mapper = NucleiDatasetMapper(cfg, is_train=True)
    blobs = [pickle.dumps(d) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])]
    for blob in blobs:  # first epoch: every tile decoded once
        mapper(pickle.loads(blob))
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for i in rng.integers(len(blobs), size=samples):
        mapper(pickle.loads(blobs[i]))
    return (time.perf_counter() - start) / samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["nb_unet-cpu.yaml", "two_stage_unet-cpu.yaml",
                                                     "maskrcnn_plus-cpu.yaml"])
    p.add_argument("--samples", type=int, default=64)
    args = p.parse_args()
    rows = []
    for name in args.configs:
        path = Path(name) if Path(name).exists() else CONFIGS / name
        cfg = setup_cfg(str(path), [])
        size = cfg.INPUT.NUCLEI.DECODE_CACHE_MB
        off = seconds_per_sample(setup_cfg(str(path), ["INPUT.NUCLEI.DECODE_CACHE_MB", "0.0"]), args.samples)
        on = seconds_per_sample(cfg, args.samples)
        rows.append([path.name, cfg.DATASETS.TRAIN[0], f"{off:.4f}", f"{on:.4f} ({size:.0f} MB)", f"{off / on:.1f}x"])
    print(tabulate(rows, headers=["config", "dataset", "s/sample, no cache", "s/sample, cache", "speed-up"]))


if __name__ == "__main__":
    main()
