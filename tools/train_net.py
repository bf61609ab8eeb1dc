#!/usr/bin/env python
"""Train or evaluate any nuclei-d2 model (Detectron2 conventions).

    python tools/train_net.py --config-file configs/maskrcnn_baseline-tiny.yaml MODEL.DEVICE cpu
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file EXPORT/config.yaml --eval-only INFERENCE.RUNTIME onnxruntime \
        INFERENCE.EXPORTED EXPORT                                 # evaluate an exported model (docs/export.md)
    python tools/train_net.py --config-file CFG --resume          # continue from OUTPUT_DIR/last_checkpoint
    python tools/train_net.py --config-file CFG --num-gpus 2      # 2 processes (GPUs, or CPU on gloo)
    python tools/train_net.py --config-file zoo:NAME DATASETS.TRAIN "('mine',)" ...  # fine-tune a zoo entry
"""

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this clone's nuclei_d2, whatever the venv has installed


def build_parser() -> argparse.ArgumentParser:
    """Detectron2's ``default_argument_parser`` options, built with the standard library only (``--help`` and
    argument errors never import torch)."""
    p = argparse.ArgumentParser(
        prog="train_net.py",
        description="Train or evaluate a nuclei-d2 model. Config overrides follow the options as KEY VALUE pairs.",
        epilog="""
Examples:
    python tools/train_net.py --config-file configs/maskrcnn_baseline-tiny.yaml MODEL.DEVICE cpu
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file CFG --resume
    python tools/train_net.py --config-file CFG --num-gpus 2

Run on several machines:
    (machine0)$ python tools/train_net.py --machine-rank 0 --num-machines 2 --dist-url <URL> [--other-flags]
    (machine1)$ python tools/train_net.py --machine-rank 1 --num-machines 2 --dist-url <URL> [--other-flags]

Exit status: 0 done, 2 a config, weights or dataset problem (one line on stderr saying what to do).
""",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="", metavar="FILE",
                   help="path to config file, or zoo:NAME (a model zoo entry: fine-tune it, or --eval-only to score "
                        "it on DATASETS.TEST)")
    p.add_argument("--resume", action="store_true",
                   help="resume from OUTPUT_DIR/last_checkpoint if it exists (else start from MODEL.WEIGHTS)")
    p.add_argument("--eval-only", action="store_true", help="perform evaluation only")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pickled weights (.pkl; sets MODEL.CHECKPOINT.ALLOW_PICKLE True). Unpickling a "
                        "file can run arbitrary code: use it only for files you trust")
    p.add_argument("--num-gpus", type=int, default=1, help="number of processes (GPUs) *per machine*")
    p.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    p.add_argument("--machine-rank", type=int, default=0, help="the rank of this machine (unique per machine)")
    p.add_argument("--dist-url", default=None,
                   help="initialization URL for pytorch distributed backend, or 'auto' (default: "
                        "tcp://127.0.0.1:<a port derived from your user id>, as Detectron2 does)")
    p.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                   help='config overrides at the end of the command: space-separated "PATH.KEY VALUE" pairs')
    return p


def resolve_dist_url(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in Detectron2's default ``--dist-url``: a fixed port per user, so orphan processes of an earlier run show
    up as a port in use; turn ``--allow-pickle`` into its config override."""
    if args.allow_pickle:
        args.opts = [*(args.opts or []), "MODEL.CHECKPOINT.ALLOW_PICKLE", "True"]
    if args.dist_url is None:
        port = 2**15 + 2**14 + hash(os.getuid() if sys.platform != "win32" else 1) % 2**14
        args.dist_url = f"tcp://127.0.0.1:{port}"
    return args


def setup(args):
    from detectron2.engine import default_setup
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger

    from nuclei_d2.engine import setup_cfg

    cfg = setup_cfg(args.config_file, args.opts, resume=args.resume, eval_only=args.eval_only, check_data=True)
    shown = args
    if args.config_file.startswith("zoo:"):  # Detectron2 logs the config file's text: the entry's file
        from nuclei_d2.model_zoo import resolve_zoo_config

        shown = argparse.Namespace(**{**vars(args), "config_file": resolve_zoo_config(args.config_file)[0]})
    default_setup(cfg, shown)
    # nuclei_d2's own messages (time budget, EMA, compile, ...) to the console and OUTPUT_DIR/log.txt, as
    # Detectron2 projects do for theirs
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="nuclei_d2")
    return cfg


def run(args):
    """One process of the run (Detectron2's ``launch`` starts ``--num-gpus`` of them)."""
    # (detectron2.utils does not import detectron2.modeling, whose import warnings nuclei_d2 quiets: see its __init__)
    from detectron2.utils import comm

    from nuclei_d2.checkpoint import NucleiCheckpointer
    from nuclei_d2.engine import NucleiTrainer, leave_process_group

    cfg = setup(args)
    if args.eval_only:
        model = NucleiTrainer.build_model(cfg)
        if cfg.INFERENCE.RUNTIME != "torch":  # an export folder's networks instead of weights (docs/export.md)
            from nuclei_d2.engine.export import install_runtime

            install_runtime(model, cfg)
        else:
            NucleiCheckpointer.from_config(model, cfg, cfg.OUTPUT_DIR, config_file=args.config_file).resume_or_load(
                cfg.MODEL.WEIGHTS, resume=args.resume)
        res = NucleiTrainer.test(cfg, model)
        res = res if comm.is_main_process() else None
    else:
        trainer = NucleiTrainer(cfg, config_file=args.config_file)
        trainer.resume_or_load(resume=args.resume)
        res = trainer.train()
    leave_process_group()
    return res


def main(argv=None) -> int:
    args = resolve_dist_url(build_parser().parse_args(argv))
    # Heavy imports (torch, detectron2) only after parsing; nuclei_d2 before detectron2.engine, so the third-party
    # warnings it quiets at import stay quiet.
    from nuclei_d2.data.datasets import DatasetLoadError
    from nuclei_d2.engine import ConfigError, setup_cfg

    try:
        # Check the config in the parent first, so mistakes are reported once, before any process is spawned.
        setup_cfg(args.config_file, args.opts, resume=args.resume, eval_only=args.eval_only, check_data=True)
        from detectron2.engine import launch

        launch(run, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except (ConfigError, DatasetLoadError) as e:  # a dataset's files broken after the check: one process only
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
