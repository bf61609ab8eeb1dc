"""``tools/predict.py`` after parsing: config checks, sharding over processes, exit statuses.

The batch machinery (inputs, outputs, resume, interrupts) is :mod:`nuclei_d2.inference.run`; this module adds what
needs the engine's :func:`~nuclei_d2.engine.defaults.setup_cfg` (and lives above inference for that reason).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..inference.predictor import Predictor
from ..inference.run import (
    Interrupted,
    RunOptions,
    _os_error_text,
    _remove_empty,
    merge_summaries,
    prepare_output_dir,
    raise_on_signals,
    run_batch,
)
from .defaults import leave_process_group, setup_cfg

__all__ = ["config_overrides", "predict_worker", "run_predict"]

logger = logging.getLogger(__name__)


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError as e:
        raise ValueError(f"--shard must be K/N (e.g. 0/4), got {text!r}") from e
    if not 0 <= k < n:
        raise ValueError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def config_overrides(args: Any) -> list[str]:
    """The ``KEY VALUE`` config overrides of the parsed command line (its ``opts`` and the flags that set keys)."""
    opts = list(args.opts)
    if args.weights:
        opts += ["MODEL.WEIGHTS", args.weights]
    if getattr(args, "exported", None):
        from ..export.runtime import runtime_of_export

        opts += ["INFERENCE.EXPORTED", args.exported,
                 "INFERENCE.RUNTIME", getattr(args, "runtime", None) or runtime_of_export(args.exported)]
    elif getattr(args, "runtime", None):
        opts += ["INFERENCE.RUNTIME", args.runtime]
    if getattr(args, "allow_pickle", False):
        opts += ["MODEL.CHECKPOINT.ALLOW_PICKLE", "True"]
    return opts


def predict_worker(args: Any) -> int:
    """One process of ``tools/predict.py`` (after Detectron2's ``launch``); returns the exit status."""
    from detectron2.utils import comm

    with raise_on_signals():
        cfg = setup_cfg(args.config_file, config_overrides(args), eval_only=True)
        if not cfg.MODEL.WEIGHTS and cfg.INFERENCE.RUNTIME == "torch":
            logger.warning("MODEL.WEIGHTS is empty: predicting with randomly initialised weights (testing only)")
        k, n = _parse_shard(args.shard)
        world, rank = comm.get_world_size() * n, k * comm.get_world_size() + comm.get_rank()
        predictor = Predictor(cfg, tile_size=args.tile_size, overlap=args.overlap, batch_size=args.batch_size,
                              progress=False if args.no_progress else None)
        options = RunOptions(outputs=args.outputs or list(cfg.INFERENCE.OUTPUTS), level=args.level,
                             magnification=args.magnification, tissue_mask=args.tissue_mask,
                             tissue_threshold=args.tissue_threshold, label_suffix=args.label_format,
                             overwrite=args.overwrite, backend=args.backend)
        try:
            summary = run_batch(predictor, args.input, args.output, options, rank=rank, world=world)
        except Interrupted as e:
            if e.summary is not None:
                print(e.summary.format(), flush=True)
            return e.exit_code
        if comm.get_world_size() > 1:
            comm.synchronize()
            if comm.is_main_process() and n == 1:
                summary = merge_summaries(args.output, world)
        if comm.is_main_process():
            print(summary.format())
        leave_process_group()
        return 1 if summary.failures else 0


def run_predict(args: Any) -> int:
    """``tools/predict.py`` after parsing: check the output folder, build the model, run; return the exit status.

    0 all done, 1 some inputs failed, 2 bad config, arguments, checkpoint or output folder (one line on stderr,
    nothing written), 128 + signal when interrupted (130 Ctrl-C, 143 SIGTERM; the summary says how to resume).
    """
    from detectron2.engine import launch

    created: list[Path] = []
    try:
        with raise_on_signals():
            _parse_shard(args.shard)
            created = prepare_output_dir(args.output)  # first: an unusable --output costs nothing
            if args.num_gpus * args.num_machines > 1:
                launch(predict_worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                       dist_url=args.dist_url, args=(args,))
                # the workers' exit statuses are lost in launch: read the merged summary (machine 0) instead
                summary_path = Path(args.output) / "summary.json"
                if args.machine_rank == 0 and summary_path.is_file():
                    return 1 if json.loads(summary_path.read_text())["counts"].get("failed", 0) else 0
                return 0
            return predict_worker(args)
    except Interrupted as e:  # before the batch started (config, model): nothing was written
        _remove_empty(created)
        print(f"interrupted by {e.name} before any input was predicted; nothing written", file=sys.stderr)
        return e.exit_code
    except (ConfigError, ValueError) as e:  # includes a refused checkpoint and OutputError
        _remove_empty(created)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {_os_error_text(e)}", file=sys.stderr)
        return 2
