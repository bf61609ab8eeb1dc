#!/usr/bin/env python
"""Train or evaluate any nuclei-d2 model (Detectron2 conventions).

    python tools/train_net.py --config-file configs/maskrcnn_baseline-tiny.yaml MODEL.DEVICE cpu
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file CFG --resume          # continue from OUTPUT_DIR/last_checkpoint
    python tools/train_net.py --config-file CFG --num-gpus 2      # 2 processes (GPUs, or CPU on gloo)
"""

import logging
import sys

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm

import nuclei_d2  # noqa: F401  (registers datasets and models)
from nuclei_d2.engine import ConfigError, NucleiTrainer, leave_process_group, setup_cfg


def setup(args):
    cfg = setup_cfg(args.config_file, args.opts, resume=args.resume, eval_only=args.eval_only)
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = NucleiTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = NucleiTrainer.test(cfg, model)
        res = res if comm.is_main_process() else None
    else:
        trainer = NucleiTrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        res = trainer.train()
    leave_process_group()
    return res


def cli(argv=None) -> int:
    args = default_argument_parser().parse_args(argv)
    try:
        # Check the config in the parent first, so mistakes are reported once, before any process is spawned.
        setup_cfg(args.config_file, args.opts, resume=args.resume, eval_only=args.eval_only)
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except ConfigError as e:
        logging.getLogger("nuclei_d2").error(str(e))
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
