"""What the training-step benchmarks share (bench_autocast, bench_compile, bench_memory_format): a config by name,
one real training batch, and the timed step (forward under optional bfloat16 autocast, backward, optimizer)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from detectron2.data import DatasetCatalog
from detectron2.utils.events import EventStorage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this clone's nuclei_d2, whatever the venv has installed

import nuclei_d2  # noqa: E402,F401  (registers the datasets)
from nuclei_d2.data.mapper import NucleiDatasetMapper  # noqa: E402

CONFIGS = REPO / "configs"


def config_path(name: str) -> Path:
    """``name`` as given if it exists, else the file of that name in configs/."""
    return Path(name) if Path(name).exists() else CONFIGS / name


def real_batch(cfg) -> list[dict]:
    """``SOLVER.IMS_PER_BATCH`` mapped training crops of the config's first training set."""
    mapper = NucleiDatasetMapper(cfg, is_train=True)
    dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    batch = [b for b in (mapper(d) for d in dicts[: 2 * cfg.SOLVER.IMS_PER_BATCH]) if b is not None]
    return batch[: cfg.SOLVER.IMS_PER_BATCH]


def step_seconds(model, optimizer, batch, iters: int, bf16: bool = False) -> float:
    """Mean seconds of ``iters`` training steps; without ``optimizer`` only forward + backward."""
    with EventStorage():
        start = time.perf_counter()
        for _ in range(iters):
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            else:
                model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                losses = model(batch)
            sum(v.float() for v in losses.values()).backward()
            if optimizer is not None:
                optimizer.step()
    return (time.perf_counter() - start) / iters
