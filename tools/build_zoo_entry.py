#!/usr/bin/env python
"""Pack a training run into a model zoo entry (weights as float16 where predictions stay equal, sha256, card), or
add an ensemble of entries. See docs/model_zoo.md.

    python tools/build_zoo_entry.py --name NAME --config-file RUN/config.yaml --weights RUN/model_final.pth \\
        --held-out HELDOUT_RUN/inference/kumar_test/nuclei_results.json --description "..." \\
        --trained-on monuseg2018_train --tiles 30 --command "python tools/train_net.py ..."
    python tools/build_zoo_entry.py --name ENSEMBLE --ensemble NAME1 NAME2 --set TEST.MERGE.MIN_VOTES 2 \\
        --held-out ENSEMBLE_EVAL/inference/kumar_test/nuclei_results.json
"""

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this clone's nuclei_d2, whatever the venv has installed

#: MoNuSeg 2018's terms, for the card (docs/model_zoo.md explains what they mean for users of the weights).
MONUSEG_LICENCE = "CC BY-NC-SA 4.0 (trained on MoNuSeg 2018: non-commercial use, share alike, attribution)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Pack a trained run (or an ensemble of entries) into the model zoo.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--name", required=True, help="entry name (letters, digits, '-', '_', '.')")
    p.add_argument("--config-file", help="the run's config.yaml (a model entry)")
    p.add_argument("--weights", help="the run's model_final.pth (or model_ema_final.pth)")
    p.add_argument("--ensemble", nargs="+", metavar="ENTRY", help="member entries (an ensemble entry; first = main)")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="ensemble: a config key set on the first member's config (repeatable)")
    p.add_argument("--held-out", default="",
                   help="nuclei_results.json of the same recipe trained on kumar_train, evaluated on kumar_test")
    p.add_argument("--held-out-command", default="", help="the commands that produced --held-out (for the card)")
    p.add_argument("--held-out-note", default="",
                   help="a remark on the held-out numbers for the card (e.g. when and where they were measured)")
    p.add_argument("--description", default="", help="one line for the zoo table")
    # (comma-separated values, not nargs="+": that would swallow the KEY VALUE overrides that end the command)
    p.add_argument("--trained-on", default="", help="datasets the shipped weights were trained on, comma-separated")
    p.add_argument("--tiles", type=int, default=None, help="number of training tiles")
    p.add_argument("--command", default="", help="the command that trained the shipped weights")
    p.add_argument("--minutes", type=float, default=None, help="training minutes (default: the checkpoint's clock)")
    p.add_argument("--licence", default=MONUSEG_LICENCE, help="terms of the training data")
    p.add_argument("--check-dataset", default="kumar_test", help="dataset of the check images")
    p.add_argument("--check-images", default="2",
                   help="check image names, comma-separated, or one number N (the first N images)")
    p.add_argument("--flagship", action="store_true",
                   help="make this entry the zoo's flagship (the model scripts/demo.sh runs)")
    p.add_argument("--float32", action="store_true", help="store float32 even where float16 predicts the same")
    p.add_argument("--zoo", default=None, help="zoo folder (default: $NUCLEI_D2_MODEL_ZOO or the shipped zoo)")
    p.add_argument("opts", nargs="*", default=[], help="KEY VALUE overrides applied to the run's config")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if bool(args.ensemble) == bool(args.config_file or args.weights):
        p.error("give either --config-file and --weights (a model entry) or --ensemble NAME ... (an ensemble)")
    if not args.ensemble and not (args.config_file and args.weights):
        p.error("a model entry needs both --config-file and --weights")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from nuclei_d2.engine.zoo_entry import add_ensemble_entry, pack_model_entry
    from nuclei_d2.errors import ConfigError

    names = [n.strip() for n in args.check_images.split(",") if n.strip()]
    images = int(names[0]) if len(names) == 1 and names[0].isdigit() else names
    card = {"licence": args.licence}
    if args.trained_on:
        datasets = [d.strip() for d in args.trained_on.split(",") if d.strip()]
        card["trained_on"] = {"datasets": datasets, **({"tiles": args.tiles} if args.tiles else {})}
    training = {k: v for k, v in (("minutes", args.minutes), ("command", args.command)) if v}
    if training:
        card["training"] = training
    held = {k: v for k, v in (("command", args.held_out_command), ("note", args.held_out_note)) if v}
    if held:
        card["held_out"] = held
    try:
        if args.ensemble:
            entry = add_ensemble_entry(args.name, args.ensemble, root=args.zoo, overrides=dict(args.set),
                                       description=args.description, card=card, held_out=args.held_out,
                                       check_dataset=args.check_dataset, check_images=images,
                                       flagship=args.flagship)
        else:
            entry = pack_model_entry(args.name, args.config_file, args.weights, root=args.zoo,
                                     description=args.description, card=card, held_out=args.held_out,
                                     check_dataset=args.check_dataset, check_images=images,
                                     float16=not args.float32, opts=args.opts, flagship=args.flagship)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    check = entry["card"]["check"]
    print(f"zoo entry {args.name}: check AJI {check['AJI']} on {check['images']} ({check['dataset']})"
          + (f", weights sha256 {entry['sha256']}" if "sha256" in entry else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
