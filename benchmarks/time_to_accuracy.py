#!/usr/bin/env python
"""Time-to-accuracy on CPU: train a config for a wall-clock budget and evaluate it at fixed training minutes.

Run by hand (not a test), e.g.

    export NUCLEI_D2_DATASETS=/path/to/prepared   # tools/convert_dataset.py prepare-builtin monuseg2018 ...
    python benchmarks/time_to_accuracy.py --config-file configs/maskrcnn_baseline-cpu.yaml --minutes 120 \\
        --eval-every 15 --output-dir runs/tta/maskrcnn_baseline
    python benchmarks/time_to_accuracy.py --config-file configs/nb_unet-cpu.yaml --minutes 30 --eval-every 10 \\
        --output-dir runs/tta/nb_unet DATASETS.TEST "('kumar_test',)"

The clock is the trainer's (``SOLVER.TIME_BUDGET.MINUTES``, set to ``--minutes``; nuclei_d2/engine/time_budget.py):
it counts training steps only, not evaluation or checkpoint writing, and the learning-rate schedule runs on it, so a
cosine decay completes within the budget however slow the machine (``SOLVER.TIME_BUDGET.LR_ON_CLOCK False``: the
schedule runs over ``SOLVER.MAX_ITER`` iterations, as in the runs made before that key existed). Training stops at
``--minutes`` (or at ``SOLVER.MAX_ITER``, whichever comes first), and the model is evaluated on ``DATASETS.TEST``
(the Kumar test split in the ``*-cpu.yaml`` configs) every ``--eval-every`` minutes and at the end. Methods that need
a model trained beforehand (Mask R-CNN+'s distance U-Net, the two-stage U-Net's stage 1) pass its training time with
``--prior-minutes``; it is added to every point of the curve.

Writes to ``--output-dir``: ``curve.csv`` (minutes, iteration, AJI, PQ, Dice1, F1 and their same-organ / new-organ
variants), ``curve.png`` (AJI and PQ vs minutes, the classical floor as horizontal lines) and ``summary.json``
(final numbers, minutes to reach the classical floor's AJI, inference seconds per tile). The classical floor is
evaluated on the same test set with ``--floor-config`` (default ``configs/classical_watershed.yaml``).

With ``SOLVER.EMA.ENABLED True`` (an average of the weights, nuclei_d2/engine/ema.py) every point also evaluates the
averaged weights: ``curve_ema.csv`` (same columns as ``curve.csv``, which keeps the raw weights), dashed EMA lines in
``curve.png``, ``final_ema`` in ``summary.json``, and ``train/model_ema_final.pth`` beside ``train/model_final.pth``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this clone's nuclei_d2, whatever the venv has installed
KEYS = ("AJI", "PQ", "Dice1", "F1")
COLUMNS = ["minutes", "iteration", *KEYS, *(f"{k}-seen" for k in KEYS), *(f"{k}-unseen" for k in KEYS),
           "eval_seconds", "inference_s_per_tile"]


def _flat(results: dict) -> dict:
    nuclei = results.get("nuclei", results)
    return {k: float(nuclei[k]) for k in nuclei if isinstance(nuclei[k], int | float)}


def evaluate(cfg, model) -> tuple[dict, float, float]:
    """(flat nuclei metrics, evaluation seconds, inference seconds per image) of ``model`` on ``DATASETS.TEST``."""
    from detectron2.data import DatasetCatalog

    from nuclei_d2.engine import NucleiTrainer

    n = sum(len(DatasetCatalog.get(d)) for d in cfg.DATASETS.TEST)
    t = time.perf_counter()
    results = NucleiTrainer.test(cfg, model)
    seconds = time.perf_counter() - t
    return _flat(results), seconds, seconds / max(n, 1)


def make_hook(points: list[float], prior: float, on_point):
    from detectron2.engine import HookBase

    class EvalPointsHook(HookBase):
        """Evaluate at fixed minutes of the trainer's training clock (SOLVER.TIME_BUDGET) and after training.

        Registered last, so its evaluations run after the step was timed: they do not count as training minutes.
        """

        def before_train(self):
            self.clock = self.trainer.training_clock
            self.next = 0
            self.last_iter = -1

        def minutes(self) -> float:
            return self.clock.minutes() + prior

        def _point(self, last: int):
            on_point(self.minutes(), last + 1, self.trainer.model)
            self.last_iter = last

        def after_step(self):
            if self.trainer.iter + 1 >= self.trainer.max_iter:
                return  # the last step: after_train evaluates it
            m = self.minutes()
            if self.next < len(points) and m >= points[self.next]:
                while self.next < len(points) and m >= points[self.next]:
                    self.next += 1
                self._point(self.trainer.iter)

        def after_train(self):
            # The budget was spent or SOLVER.MAX_ITER reached (not an exception): evaluate the final model.
            last = self.trainer.iter - 1
            if self.trainer.iter >= self.trainer.max_iter and self.last_iter != last:
                self._point(last)

    return EvalPointsHook()


def minutes_to_reach(rows: list[dict], key: str, target: float) -> float | None:
    """First curve point (minutes) where ``key`` >= ``target``; None if never."""
    for r in rows:
        if r[key] >= target:
            return r["minutes"]
    return None


def plot(rows: list[dict], floor: dict | None, path: Path, title: str, ylabel: str, threads: int = 1,
         ema_rows: list[dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    minutes = [r["minutes"] for r in rows]
    for key, colour in (("AJI", "tab:blue"), ("PQ", "tab:orange")):
        ax.plot(minutes, [r[key] for r in rows], "o-", color=colour, label=key)
        if floor is not None:
            ax.axhline(floor[key], color=colour, ls="--", lw=1, label=f"classical floor {key} {floor[key]:.3f}")
        if ema_rows:
            ax.plot([r["minutes"] for r in ema_rows], [r[key] for r in ema_rows], "s-.", color=colour, mfc="none",
                    label=f"{key} (EMA of the weights)")
    ax.set_xlabel(f"training minutes ({threads} CPU thread{'s' if threads > 1 else ''}, evaluation excluded)")
    ax.set_xlim(left=0)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(0.8, max([r["AJI"] for r in rows + (ema_rows or [])] + [0])))
    ax.grid(alpha=0.3)
    ax.set_title("\n".join(textwrap.wrap(title, 95)), fontsize=9)  # long override lists wrap, not clip
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--minutes", type=float, default=120.0, help="training budget (wall-clock minutes)")
    p.add_argument("--eval-every", type=float, default=15.0, help="evaluate every N training minutes")
    p.add_argument("--prior-minutes", type=float, default=0.0,
                   help="training minutes already spent on models this one needs (added to the clock)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--floor-config", default=str(REPO / "configs" / "classical_watershed.yaml"),
                   help="config of the classical floor drawn on the curve ('' = none)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.eval_every <= 0:
        p.error("--minutes and --eval-every must be > 0")

    import torch
    from detectron2.utils.logger import setup_logger

    import nuclei_d2  # noqa: F401  (registers datasets and models)
    from nuclei_d2.engine import ConfigError, NucleiTrainer, setup_cfg
    from nuclei_d2.modeling import build_nuclei_model

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_logger(str(out / "log.txt"))
    setup_logger(str(out / "log.txt"), name="nuclei_d2")
    log = logging.getLogger("nuclei_d2")
    try:
        cfg = setup_cfg(args.config_file, ["OUTPUT_DIR", str(out / "train"), *args.opts,
                                           "SOLVER.TIME_BUDGET.MINUTES", str(args.minutes)])
        floor_cfg = None
        if args.floor_config:
            floor_cfg = setup_cfg(args.floor_config, ["OUTPUT_DIR", str(out / "floor"), "DATASETS.TEST",
                                                      str(tuple(cfg.DATASETS.TEST)), "MODEL.DEVICE", "cpu"],
                                  eval_only=True)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("time-to-accuracy: %s for %.0f min on %d threads, load average %.1f", args.config_file, args.minutes,
             torch.get_num_threads(), os.getloadavg()[0])

    floor = None
    if floor_cfg is not None:
        floor, _, floor_s = evaluate(floor_cfg, build_nuclei_model(floor_cfg))
        floor["inference_s_per_tile"] = floor_s
        log.info("classical floor: AJI %.3f PQ %.3f Dice1 %.3f (%.2f s per tile, incl. evaluation)",
                 floor["AJI"], floor["PQ"], floor["Dice1"], floor_s)

    rows: list[dict] = []
    ema_rows: list[dict] = []  # SOLVER.EMA: the averaged weights at the same points
    csv_path = out / "curve.csv"

    def add_row(rows: list[dict], path: Path, cfg, minutes: float, iteration: int, model, what: str = "") -> None:
        metrics, seconds, per_tile = evaluate(cfg, model)
        row = {"minutes": round(minutes, 2), "iteration": iteration, **{k: metrics.get(k, float("nan"))
                                                                        for k in COLUMNS[2:-2]},
               "eval_seconds": round(seconds, 1), "inference_s_per_tile": round(per_tile, 2)}
        rows.append(row)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)
        log.info("[%.1f min, iter %d]%s AJI %.3f PQ %.3f Dice1 %.3f", minutes, iteration, what, row["AJI"], row["PQ"],
                 row["Dice1"])

    def on_point(minutes: float, iteration: int, model) -> None:
        add_row(rows, csv_path, cfg, minutes, iteration, model)
        if ema is not None:  # the same model with the average swapped in (and the raw weights put back after)
            with ema.ema.swapped_into(model):
                add_row(ema_rows, out / "curve_ema.csv", ema_cfg, minutes, iteration, model, " EMA")

    points = [args.prior_minutes + args.eval_every * i
              for i in range(1, int(args.minutes // args.eval_every) + 1)]
    trainer = NucleiTrainer(cfg)
    from nuclei_d2.engine.ema import ema_hook_of

    ema = ema_hook_of(trainer)
    ema_cfg = cfg.clone()  # the EMA's evaluation writes under train/ema/, not over the raw weights' files
    ema_cfg.defrost()
    ema_cfg.OUTPUT_DIR = str(out / "train" / "ema")
    ema_cfg.freeze()
    from detectron2.engine import hooks as d2_hooks

    # The evaluations are this script's (at its points, EMA included): Detectron2's EvalHooks (TEST.EVAL_PERIOD and
    # the one after training) would repeat the last one.
    trainer._hooks = [h for h in trainer._hooks if not isinstance(h, d2_hooks.EvalHook)]
    trainer.register_hooks([make_hook(points, args.prior_minutes, on_point)])
    trainer.resume_or_load(resume=False)
    trainer.train()

    if not rows:
        print("error: no evaluation point was reached", file=sys.stderr)
        return 1
    summary = {"config": args.config_file, "opts": args.opts, "budget_minutes": args.minutes,
               "prior_minutes": args.prior_minutes, "final": rows[-1], "floor": floor,
               "minutes_to_floor_AJI": minutes_to_reach(rows, "AJI", floor["AJI"]) if floor else None,
               "minutes_to_floor_PQ": minutes_to_reach(rows, "PQ", floor["PQ"]) if floor else None,
               "threads": torch.get_num_threads()}
    if ema_rows:
        summary["final_ema"] = ema_rows[-1]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    opts = " ".join(Path(o).name if "/" in o else o for o in args.opts)  # paths shortened to file names
    prior = f" after {args.prior_minutes:g} min of a prior stage" if args.prior_minutes else ""
    plot(rows, floor, out / "curve.png", f"{Path(args.config_file).name}{prior} {opts}"[:200],
         f"AJI / PQ on {', '.join(cfg.DATASETS.TEST)}", threads=torch.get_num_threads(), ema_rows=ema_rows)
    from tabulate import tabulate

    for title, table in (("", rows), ("EMA of the weights (curve_ema.csv):", ema_rows)):
        if title and table:
            print(title)
        if table:
            print(tabulate([[r[c] for c in ("minutes", "iteration", "AJI", "PQ", "Dice1", "AJI-seen", "AJI-unseen",
                                            "inference_s_per_tile")] for r in table],
                           headers=["min", "iter", "AJI", "PQ", "Dice1", "AJI same", "AJI new", "s/tile"],
                           floatfmt=".3f"))
    if floor:
        print(f"classical floor: AJI {floor['AJI']:.3f} PQ {floor['PQ']:.3f} Dice1 {floor['Dice1']:.3f}; "
              f"minutes to reach its AJI: {summary['minutes_to_floor_AJI']}")
    print(f"wrote {csv_path}, {out / 'curve.png'}, {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
