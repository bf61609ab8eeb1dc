#!/usr/bin/env python
"""Trained checkpoints alone and as ensembles on one dataset, in one table (issue 24).

    python benchmarks/ensemble.py --member mrplus=runs/mrplus/train --member ts=runs/ts_stage2/train \\
        --dataset kumar_test --output-dir runs/ensembles/mrplus_ts
    python benchmarks/ensemble.py --member nb=runs/nb/config.yaml:runs/nb/model_final.pth \\
        --member ts=runs/ts/config.yaml:runs/ts/model_final.pth --ensembles all --merge shared --output-dir out/
    python benchmarks/ensemble.py --member a=A.yaml:a.pth --member b=B.yaml:b.pth --member c=C.yaml:c.pth \\
        --ensembles a+b a+b+c --merge instances --min-votes 1 --tta-off --output-dir out/

A member is ``NAME=CONFIG.yaml:WEIGHTS`` or ``NAME=RUN_DIR`` (the run's ``config.yaml`` and ``model_final.pth``, as
tools/train_net.py leaves them in its OUTPUT_DIR). Rows:

* every member **alone**, exactly as ``tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS WEIGHTS``
  evaluates it: its own config's test-time augmentation (``TEST.AUG``), merge and post-processing;
* each **ensemble** (``--ensembles a+b a+b+c``; ``all`` = every subset of two or more members; default: all members
  together), as :func:`nuclei_d2.inference.test_time.build_test_time_wrapper` evaluates it with the first member's
  config as the main one and the others as ``TEST.ENSEMBLE.WEIGHTS`` / ``CONFIGS``: every member predicts the first
  member's test-time copies, and the predictions are merged per ``--merge`` (``TEST.MERGE.MODE``): "probs" averages
  the probability maps of dense models that predict the same maps, "shared" averages the maps dense models of
  different methods share by meaning (the NB U-Net's "inside" and the two-stage U-Net's eroded "foreground"), then
  post-processes with the first member; "instances" votes nuclei across any models (``--min-votes``, ``--iou``);
  "auto" is "probs" when it applies, else "instances". The inputs are mapped with the first member's config and the
  input channels every member needs (selected by name per member), so any member may come first.

Every model is built and loaded once. A member's predictions of an image (its nuclei on each test-time copy, or its
maps summed over the copies) are computed once and kept in memory for every row that needs them (same member, same
copies, same input mapping): the ensemble rows then cost only their merge. Memory: a dense member's maps are
``K x H x W`` float32 per image and set of copies (12 MB for three maps of a 1000x1000 tile, 170 MB for the 14 Kumar
test tiles); nuclei are kept as crops (megabytes).

Columns: AJI, PQ, Dice1, F1 (means over images), AJI on organs seen / not seen in training, the standard error of the
mean AJI over images, seconds per tile of inference (model passes, test-time copies, merging and post-processing; not
reading the image or scoring it; an ensemble row counts the passes of its members even when they came from the
memory), training minutes (``--train-minutes NAME=MINUTES`` with all of a member's stages, else what its
checkpoint's ``SOLVER.TIME_BUDGET`` clock counted; an ensemble row sums its members'), and for an ensemble the
two-sided Wilcoxon signed-rank p-value of its per-image AJI against its best member alone
(nuclei_d2.evaluation.offline.compare_predictions, as ``tools/evaluate.py --pred-b``). The object-level Hausdorff
distance is not computed.

Writes to ``--output-dir`` once every row is done (each file atomically): ``table.csv``, ``summary.json`` (settings,
every metric of every row, the train_net command that reproduces each ensemble row) and ``per_image/<row>.csv``.
Errors in the members, configs, weights or options are one line before anything runs.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this clone's nuclei_d2, whatever the venv has installed

if TYPE_CHECKING:
    from nuclei_d2.inference.prediction_cache import PredictionCache

#: TEST.MERGE.MODE values (nuclei_d2.inference.test_time.MERGE_MODES; listed here so --help needs no torch).
MERGE_CHOICES = ("auto", "probs", "shared", "instances")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
RUN_CONFIG, RUN_WEIGHTS = "config.yaml", "model_final.pth"
COLUMNS = ["row", "members", "kind", "merge", "predictions_per_image", "n_images", "AJI", "AJI_se", "PQ", "Dice1",
           "F1", "AJI_same_organ", "AJI_new_organ", "s_per_tile", "train_minutes", "best_member", "p_vs_best_member"]

logger = logging.getLogger("benchmarks.ensemble")


# ---- command line (standard library only) ------------------------------------------------------------------------

def parse_member(text: str) -> tuple[str, str, str]:
    """``NAME=CONFIG.yaml:WEIGHTS``, ``NAME=RUN_DIR`` or ``NAME=zoo:ENTRY`` -> (name, config file or ``zoo:ENTRY``,
    weights file); ValueError if bad."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--member {text!r}: expected NAME=CONFIG.yaml:WEIGHTS or NAME=RUN_DIR")
    if not NAME_RE.match(name):
        raise ValueError(f"--member {text!r}: the name {name!r} may hold only letters, digits, '_', '.' and '-'")
    if rest.startswith("zoo:"):  # a model zoo entry (nuclei_d2.model_zoo): its config and weights
        from nuclei_d2.model_zoo import get_entry

        entry = get_entry(rest[len("zoo:"):])
        if entry.kind != "model":
            raise ValueError(f"--member {text!r}: {entry.name} is an ensemble entry; give its members "
                             f"({', '.join(entry.members)}) as members")
        return name, rest, str(entry.weights_path)
    m = re.match(r"^(.+?\.ya?ml):(.+)$", rest)
    if m:
        return name, m.group(1), m.group(2)
    if os.path.isdir(rest):
        return name, os.path.join(rest, RUN_CONFIG), os.path.join(rest, RUN_WEIGHTS)
    if rest.endswith((".yaml", ".yml")):
        raise ValueError(f"--member {text!r}: no weights after the config: NAME=CONFIG.yaml:WEIGHTS")
    raise ValueError(f"--member {text!r}: {rest} is not a run folder (with {RUN_CONFIG} and {RUN_WEIGHTS}) and not "
                     "CONFIG.yaml:WEIGHTS")


def parse_train_minutes(items: Sequence[str] | None, names: Sequence[str]) -> dict[str, float]:
    """``--train-minutes NAME=MINUTES ...`` -> {name: minutes}; ValueError for an unknown name or a bad number."""
    out: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or name not in names:
            raise ValueError(f"--train-minutes {item!r}: expected NAME=MINUTES with NAME one of {list(names)}")
        try:
            minutes = float(value)
        except ValueError:
            minutes = -1.0
        if not minutes >= 0:
            raise ValueError(f"--train-minutes {item!r}: the minutes must be a number >= 0")
        out[name] = minutes
    return out


def parse_ensembles(items: Sequence[str] | None, names: Sequence[str]) -> list[list[str]]:
    """``--ensembles`` -> the member names of each ensemble row (None: all members together; ``all``: every subset
    of two or more, by size then in member order)."""
    if not items:
        return [list(names)] if len(names) > 1 else []
    if list(items) == ["all"]:
        return [list(c) for k in range(2, len(names) + 1) for c in itertools.combinations(names, k)]
    out: list[list[str]] = []
    for item in items:
        parts = item.split("+")
        unknown = [p for p in parts if p not in names]
        if unknown:
            raise ValueError(f"--ensembles {item!r}: unknown member(s) {unknown}; the members are {list(names)} "
                             "(or give 'all')")
        if len(set(parts)) != len(parts):
            raise ValueError(f"--ensembles {item!r}: a member appears twice")
        if len(parts) < 2:
            raise ValueError(f"--ensembles {item!r}: an ensemble needs two members or more (each member alone is "
                             "always a row)")
        if parts not in out:
            out.append(parts)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line (standard library only: ``--help`` and argument errors never import torch)."""
    p = argparse.ArgumentParser(
        prog="ensemble.py",
        description="Evaluate trained checkpoints alone and as ensembles on one dataset and print one table "
                    "(AJI, PQ, Dice1, F1, seconds per tile).")
    p.add_argument("--member", action="append", required=True,
                   metavar="NAME=CONFIG.yaml:WEIGHTS|NAME=RUN_DIR|NAME=zoo:ENTRY",
                   help="a trained model (repeat for each); RUN_DIR holds config.yaml and model_final.pth; ENTRY is "
                        "a model zoo entry (docs/model_zoo.md)")
    p.add_argument("--dataset", default="kumar_test", help="registered dataset with ground truth (default kumar_test)")
    p.add_argument("--ensembles", nargs="+", metavar="A+B",
                   help="ensembles to evaluate, e.g. a+b a+b+c, or 'all' (every subset of two or more); default: all "
                        "members together. The first member of each gives the test-time copies, the input mapping "
                        "and (probs/shared) the post-processing")
    p.add_argument("--merge", choices=MERGE_CHOICES, default="auto",
                   help="TEST.MERGE.MODE of the ensembles (default auto: probs when every member is a dense model "
                        "with the same maps, else instances)")
    p.add_argument("--min-votes", type=int, nargs="+", default=None,
                   help="instances merge: keep a nucleus predicted by at least N of the members x copies (default: "
                        "the first member's TEST.MERGE.MIN_VOTES); several values give one row per value per "
                        "ensemble, from the same cached predictions (to choose N on a training split)")
    p.add_argument("--iou", type=float, default=None,
                   help="instances merge: mask IoU from which two predictions are one nucleus (default: the first "
                        "member's TEST.MERGE.IOU_THRESHOLD)")
    p.add_argument("--tta-off", action="store_true", help="no test-time augmentation for any row (TEST.AUG.ENABLED "
                                                          "False)")
    p.add_argument("--max-images", type=int, default=0, help="evaluate the first N images only (0 = all)")
    p.add_argument("--train-minutes", nargs="+", metavar="NAME=MINUTES",
                   help="training minutes of a member, all its stages (e.g. a two-stage U-Net's two); an ensemble "
                        "row sums its members'. Default: the minutes its checkpoint's training clock counted "
                        "(SOLVER.TIME_BUDGET; that stage only), else unknown")
    p.add_argument("--output-dir", required=True, help="folder for table.csv, summary.json and per_image/")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ... applied to every member")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        members = [parse_member(t) for t in args.member]
        names = [m[0] for m in members]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"--member: the name(s) {dup} are given twice")
        ensembles = parse_ensembles(args.ensembles, names)
        args.train_minutes = parse_train_minutes(args.train_minutes, names)
        if args.min_votes is not None and min(args.min_votes) < 1:
            raise ValueError(f"--min-votes must be >= 1, got {min(args.min_votes)}")
        if args.iou is not None and not 0.0 < args.iou <= 1.0:
            raise ValueError(f"--iou must be in (0, 1], got {args.iou}")
        if args.max_images < 0:
            raise ValueError(f"--max-images must be >= 0, got {args.max_images}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run(args, members, ensembles)


# ---- the benchmark (heavy imports inside) ------------------------------------------------------------------------

#: INPUT keys the inference mapper does not read: members whose configs differ only in these see the same inputs.
_TRAINING_INPUT_KEYS = ("CROP", "MIN_SIZE_TRAIN", "MAX_SIZE_TRAIN", "MIN_SIZE_TRAIN_SAMPLING", "RANDOM_FLIP",
                        "TARGETS", "EXTRA_CHANNELS", "BOUNDARY_WIDTH", "ERODE_RADIUS", "BORDER_IS_CONTOUR",
                        "MASK_FORMAT")


def input_view(cfg: Any) -> str:
    """What the inference mapper of ``cfg`` does to an image, as text: two members with the same view get the same
    RGB (and the same extra channels by name), so their predictions can be shared between rows. Conservative: every
    INPUT key not known to be training-only counts (of INPUT.NUCLEI the stain normalisation and the magnification)."""
    node = cfg.INPUT.clone()
    node.defrost()
    for k in _TRAINING_INPUT_KEYS:
        node.pop(k, None)
    if "NUCLEI" in node:
        for k in list(node.NUCLEI):
            if not k.startswith("STAIN") and k != "SCALE":
                node.NUCLEI.pop(k)
    return node.dump()


def cached_wrapper_class():
    """:class:`CachedWrapper` (defined on first use: it subclasses a torch module)."""
    from nuclei_d2.inference.test_time import TestTimeWrapper

    class CachedWrapper(TestTimeWrapper):
        """A :class:`TestTimeWrapper` whose member predictions come from a :class:`PredictionCache` shared by every
        row, keyed by member name and input view (rows hold different member lists); the merge and
        post-processing are the wrapper's own. It adds up the seconds of the predictions each image used."""

        __test__ = False

        def __init__(self, members: Sequence[Any], transforms: Sequence[Any], *, cache: PredictionCache,
                     names: Sequence[str], view: str, **kwargs: Any):
            super().__init__(members, transforms, **kwargs)
            self.prediction_cache, self.names, self.view = cache, list(names), view
            self.spent = 0.0  # seconds of the member predictions used for the current image (computed now or before)
            self.fresh = 0.0  # of which computed in this call

        def member_id(self, index: int) -> tuple[str, str]:
            return self.names[index], self.view

        def cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
            value, seconds, fresh = self.prediction_cache.get(key, compute)
            self.spent += seconds
            if fresh:
                self.fresh += seconds
            return value

        def predict(self, inp: dict[str, Any]) -> tuple[dict[str, Any], float]:
            """(output, inference seconds: the member predictions it used plus its own merge)."""
            self.spent = self.fresh = 0.0
            t0 = time.perf_counter()
            out = self([inp])[0]
            wall = time.perf_counter() - t0
            return out, self.spent + (wall - self.fresh)

    return CachedWrapper


class Member:
    """One trained model: its config (built like tools/train_net.py --eval-only builds it) and weights, loaded."""

    def __init__(self, name: str, config: str, weights: str, dataset: str, opts: Sequence[str], tta_off: bool):
        from nuclei_d2.checkpoint import NucleiCheckpointer
        from nuclei_d2.engine.defaults import setup_cfg
        from nuclei_d2.errors import ConfigError
        from nuclei_d2.modeling import build_nuclei_model

        self.name, self.config, self.weights = name, config, weights
        # overrides a member needs beyond its config file (a zoo entry's sub-model config files)
        self.sub_opts: list[str] = []
        where = f"--member {name}"
        zoo_minutes = float("nan")
        if config.startswith("zoo:"):  # checked against the manifest's sha256, then used as a config file
            from nuclei_d2.model_zoo import get_entry, resolve_zoo_config

            zoo_minutes = float((get_entry(config[4:]).card.get("training") or {}).get("minutes", float("nan")))
            config, zoo_opts = resolve_zoo_config(config)
            self.config = config
            pairs = list(zip(zoo_opts[::2], zoo_opts[1::2], strict=True))
            self.sub_opts = [x for k, v in pairs if k != "MODEL.WEIGHTS" for x in (k, v)]
        if not os.path.isfile(config):
            raise ConfigError(f"{where}: config file not found: {config}")
        if "://" not in weights and not os.path.isfile(weights):
            raise ConfigError(f"{where}: weights file not found: {weights}")
        overrides = [*self.sub_opts, *opts, "MODEL.WEIGHTS", weights, "DATASETS.TEST", repr((dataset,)),
                     "TEST.ENSEMBLE.WEIGHTS", "[]", "TEST.ENSEMBLE.CONFIGS", "[]", "TEST.ENSEMBLE.OPTS", "[]"]
        if tta_off:
            overrides += ["TEST.AUG.ENABLED", "False"]
        try:
            self.cfg = setup_cfg(config, overrides, eval_only=True)
            self.model = build_nuclei_model(self.cfg)
            rest = NucleiCheckpointer.from_config(self.model, self.cfg, config_file=config).load(weights)
        except (ConfigError, ValueError) as e:  # ValueError: a config the model cannot be built from
            raise ConfigError(f"{where}: {e}") from None
        self.train_minutes = checkpoint_train_minutes(rest)
        if math.isnan(self.train_minutes):
            self.train_minutes = zoo_minutes
        self.model.eval()
        self.view = input_view(self.cfg)
        logger.info("member %s: %s (%s, weights %s)", name, type(self.model).__name__, config, weights)


def checkpoint_train_minutes(checkpoint: dict[str, Any]) -> float:
    """Minutes of training a checkpoint's SOLVER.TIME_BUDGET clock counted (its trainer state), NaN if none."""
    hooks = (checkpoint.get("trainer") or {}).get("hooks") or {}
    seconds = (hooks.get("TimeBudgetHook") or {}).get("seconds")
    return float(seconds) / 60.0 if isinstance(seconds, int | float) else math.nan


def _is_plain_nuclei_rcnn(model: Any) -> bool:
    """A NucleiRCNN whose inference is NucleiRCNN's (postprocess_raw of the raw outputs) and soft masks work."""
    from detectron2.modeling import GeneralizedRCNN

    from nuclei_d2.inference.test_time import _supports_soft_masks
    from nuclei_d2.modeling.rcnn import NucleiRCNN

    cls = type(model)
    return (isinstance(model, NucleiRCNN) and cls.inference is NucleiRCNN.inference
            and cls.forward is GeneralizedRCNN.forward and _supports_soft_masks(model))


class Row:
    """One line of the table: how to map the images and predict one of them, and how to score it."""

    def __init__(self, name: str, members: list[str], kind: str, cfg: Any, predict: Callable, merge: str,
                 predictions: int, transforms: list[str], *, command: str = "", min_votes: int | None = None,
                 iou: float | None = None):
        self.name, self.members, self.kind, self.cfg = name, members, kind, cfg
        self.predict, self.merge, self.predictions, self.transforms = predict, merge, predictions, transforms
        self.command, self.min_votes, self.iou = command, min_votes, iou
        self.train_minutes = math.nan  # the member's, or the sum of the ensemble's members' (NaN if one is unknown)
        self.result: dict[str, Any] = {}
        self.records: list[dict[str, Any]] = []


def _timed_model(model: Any) -> Callable:
    def predict(inp: dict[str, Any]) -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        out = model([inp])[0]
        return out, time.perf_counter() - t0

    return predict


def alone_row(member: Member, cache: PredictionCache) -> Row:
    """The member as its own config evaluates it (tools/train_net.py --eval-only), sharing its predictions through
    ``cache`` where that gives the same output: a test-time wrapper (its copies / map sums), a dense model without
    test-time augmentation (one-copy map average: the same maps, the same post-processing), a Mask R-CNN without it
    (its raw outputs give both its own nuclei and the soft masks ensembles merge)."""
    import torch

    from nuclei_d2.inference.ensemble import EnsembleMember
    from nuclei_d2.inference.test_time import TestTimeWrapper, build_test_time_wrapper, rcnn_soft_crops
    from nuclei_d2.inference.tta import parse_tta_transforms
    from nuclei_d2.modeling.dense_base import DenseSegmentor

    wrapper_cls = cached_wrapper_class()
    model, cfg = member.model, member.cfg
    wrapped = build_test_time_wrapper(cfg, model)
    identity = parse_tta_transforms(["identity"])

    def cached(transforms: Sequence[Any], merge: str, w: Any = None) -> Any:
        kw = dict(iou_threshold=cfg.TEST.MERGE.IOU_THRESHOLD, min_votes=cfg.TEST.MERGE.MIN_VOTES,
                  mask_threshold=cfg.TEST.MERGE.MASK_THRESHOLD, soft_masks=cfg.TEST.MERGE.SOFT_MASKS,
                  extra_channels=list(cfg.INPUT.EXTRA_CHANNELS), input_format=cfg.INPUT.FORMAT,
                  min_visible=cfg.TEST.MIN_VISIBLE_FRACTION)
        if w is not None:
            kw = dict(iou_threshold=w.iou_threshold, min_votes=w.min_votes, mask_threshold=w.mask_threshold,
                      soft_masks=w.soft_masks, extra_channels=list(w.extra_channels), input_format=w.input_format,
                      min_visible=w.min_visible)
        return wrapper_cls([EnsembleMember(model, None, member.name)], transforms, merge=merge, cache=cache,
                           names=[member.name], view=member.view, **kw).eval()

    if isinstance(wrapped, TestTimeWrapper):
        w = cached(wrapped.transforms, wrapped.merge_mode, wrapped)
        return Row(member.name, [member.name], "member", cfg, w.predict, w.merge_mode, w.num_predictions,
                   [t.name for t in w.transforms])
    if isinstance(model, DenseSegmentor):
        w = cached(identity, "probs")
        return Row(member.name, [member.name], "member", cfg, w.predict, "-", 1, ["identity"])
    if _is_plain_nuclei_rcnn(model):
        t_id = identity[0]
        # its soft masks go under the key they have in the rows that merge them
        key_of = wrapper_cls([EnsembleMember(model, None, member.name)], identity, merge="instances", cache=cache,
                             names=[member.name], view=member.view, soft_masks=True)

        @torch.no_grad()
        def predict(inp: dict[str, Any]) -> tuple[dict[str, Any], float]:
            t0 = time.perf_counter()
            raw = model.inference([inp], do_postprocess=False)[0]
            t_raw = time.perf_counter() - t0
            out = {"instances": model.postprocess_raw(raw, inp)}
            seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            h, w = inp["image"].shape[-2:]
            height, width = int(inp.get("height", h)), int(inp.get("width", w))
            soft = t_id.invert(rcnn_soft_crops(raw, height, width), height, width)
            cache.put(key_of.prediction_key("copy", 0, identity, inp), soft, t_raw + time.perf_counter() - t1)
            return out, seconds

        return Row(member.name, [member.name], "member", cfg, predict, "-", 1, ["identity"])
    return Row(member.name, [member.name], "member", cfg, _timed_model(model), "-", 1, ["identity"])


def ensemble_row(members: list[Member], cache: PredictionCache, merge: str, min_votes: int | None,
                 iou: float | None, dataset: str, opts: Sequence[str], tta_off: bool, label_votes: bool = False) -> Row:
    """An ensemble as build_test_time_wrapper builds it with the first member's config as the main one, except that
    the inputs carry every channel a member needs (so any member may come first)."""
    from nuclei_d2.config import RGB, input_channel_names
    from nuclei_d2.inference.ensemble import EnsembleMember, inference_resolution
    from nuclei_d2.inference.tta import parse_tta_transforms

    first = members[0]
    cfg = first.cfg
    names: list[str] = []
    for m in members:
        names += [n for n in input_channel_names(m.cfg) if n not in names]
    extra = [n for n in names if n not in RGB]
    mapper_cfg = cfg.clone()
    mapper_cfg.defrost()
    mapper_cfg.INPUT.EXTRA_CHANNELS = extra
    resolutions = {inference_resolution(m.cfg) for m in members}
    if len(resolutions) > 1:  # members at different magnifications: each resizes the original tile itself
        mapper_cfg.INPUT.MIN_SIZE_TEST = 0
        mapper_cfg.INPUT.NUCLEI.SCALE = 1.0
    mapper_cfg.freeze()
    inputs = input_channel_names(mapper_cfg)
    wrapped = []
    for m in members:
        own = input_channel_names(m.cfg)
        channels = None if own == inputs else [inputs.index(n) for n in own]
        own_res = inference_resolution(m.cfg)
        resize = own_res if own_res != inference_resolution(mapper_cfg) else None
        wrapped.append(EnsembleMember(m.model, channels, m.name, resize=resize))
    aug = cfg.TEST.AUG
    transforms = (parse_tta_transforms(list(aug.TRANSFORMS), float(aug.HUE_DELTA)) if aug.ENABLED
                  else parse_tta_transforms(["identity"]))
    mm = cfg.TEST.MERGE
    min_votes = int(mm.MIN_VOTES if min_votes is None else min_votes)
    iou = float(mm.IOU_THRESHOLD if iou is None else iou)
    label = "+".join(m.name for m in members) + (f"@votes{min_votes}" if label_votes else "")
    try:
        w = cached_wrapper_class()(wrapped, transforms, iou_threshold=iou, min_votes=min_votes,
                                   mask_threshold=mm.MASK_THRESHOLD, soft_masks=mm.SOFT_MASKS, extra_channels=extra,
                                   input_format=cfg.INPUT.FORMAT, merge=merge, cache=cache,
                                   min_visible=cfg.TEST.MIN_VISIBLE_FRACTION,
                                   names=[m.name for m in members], view=input_view(mapper_cfg))
    except ValueError as e:
        raise ValueError(f"ensemble {label}: {e}") from None
    command = ""
    if inputs == input_channel_names(cfg):  # what tools/train_net.py can do: the first member's inputs serve all
        others = members[1:]
        command = " ".join([
            "python tools/train_net.py --config-file", first.config, "--eval-only", *first.sub_opts, *opts,
            "MODEL.WEIGHTS", first.weights, "DATASETS.TEST", f"\"('{dataset}',)\"", "TEST.ENSEMBLE.WEIGHTS",
            f"\"{[m.weights for m in others]}\"", "TEST.ENSEMBLE.CONFIGS", f"\"{[m.config for m in others]}\"",
            *(["TEST.ENSEMBLE.OPTS", f"\"{[m.sub_opts for m in others]}\""] if any(m.sub_opts for m in others)
              else []),
            "TEST.MERGE.MODE", merge, "TEST.MERGE.MIN_VOTES", str(min_votes), "TEST.MERGE.IOU_THRESHOLD", f"{iou:g}",
            *(["TEST.AUG.ENABLED", "False"] if tta_off else [])])
    w.eval()
    return Row(label, [m.name for m in members], "ensemble", mapper_cfg, w.predict, w.merge_mode, w.num_predictions,
               [t.name for t in w.transforms], command=command, min_votes=min_votes, iou=iou)


def evaluate_row(row: Row, dataset: str, dicts: list[dict[str, Any]], index: int, total: int) -> None:
    """Predict and score every image of ``dicts`` for ``row``; fills ``row.result`` and ``row.records``."""
    import numpy as np

    from nuclei_d2.data.mapper import NucleiDatasetMapper
    from nuclei_d2.evaluation import NucleiEvaluator

    ev_cfg = row.cfg.TEST.NUCLEI_EVAL
    evaluator = NucleiEvaluator(dataset, output_dir=None, distributed=False, iou_threshold=ev_cfg.IOU_THRESHOLD,
                                hausdorff=False, score_threshold=ev_cfg.SCORE_THRESHOLD)
    evaluator.reset()
    mapper = NucleiDatasetMapper(row.cfg, is_train=False)
    seconds = []
    logger.info("row %d/%d %s: %s, %d prediction(s) per image (%s), merge %s", index, total, row.name, row.kind,
                row.predictions, ", ".join(row.transforms), row.merge)
    for i, d in enumerate(dicts):
        inp = mapper(d)
        out, s = row.predict(inp)
        evaluator.process([inp], [out])
        seconds.append(s)
        logger.info("row %d/%d %s: image %d/%d %s in %.2f s", index, total, row.name, i + 1, len(dicts),
                    Path(str(d.get("file_name", ""))).name, s)
    flat = evaluator.evaluate()["nuclei"]
    row.records = [{k: v for k, v in r.items() if k != "_order"} for r in evaluator.records()]
    aji = np.array([float(r["AJI"]) for r in row.records])
    se = float(aji.std(ddof=1) / math.sqrt(aji.size)) if aji.size > 1 else math.nan
    row.result = {
        "row": row.name, "members": "+".join(row.members), "kind": row.kind, "merge": row.merge,
        "predictions_per_image": row.predictions, "n_images": len(row.records),
        "AJI": float(flat["AJI"]), "AJI_se": se, "PQ": float(flat["PQ"]), "Dice1": float(flat["Dice1"]),
        "F1": float(flat["F1"]), "AJI_same_organ": float(flat.get("AJI-seen", math.nan)),
        "AJI_new_organ": float(flat.get("AJI-unseen", math.nan)),
        "s_per_tile": float(np.mean(seconds)) if seconds else math.nan, "train_minutes": row.train_minutes,
        "best_member": "", "p_vs_best_member": math.nan, "metrics": dict(flat), "transforms": row.transforms,
    }
    logger.info("row %d/%d %s: AJI %.4f +- %.4f, PQ %.4f, %.2f s/tile", index, total, row.name, row.result["AJI"],
                se, row.result["PQ"], row.result["s_per_tile"])


def compare_to_best_member(rows: list[Row]) -> None:
    """For each ensemble row: its best member alone (mean AJI) and the paired Wilcoxon p-value of per-image AJI."""
    from nuclei_d2.evaluation.offline import compare_predictions

    alone = {r.name: r for r in rows if r.kind == "member"}
    for r in rows:
        if r.kind != "ensemble":
            continue
        best = max((alone[m] for m in r.members), key=lambda a: a.result["AJI"])
        cmp = compare_predictions(best.records, r.records, keys=("AJI",), names=(best.name, r.name))[0]
        r.result["best_member"] = best.name
        r.result["p_vs_best_member"] = float(cmp["p_value"])


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def format_table(rows: list[Row]) -> str:
    from tabulate import tabulate

    headers = ["row", "members x copies, merge", "AJI", "± SE", "PQ", "Dice1", "F1", "AJI same organ",
               "AJI new organ", "s/tile", "training min", "p vs best member"]
    lines = []
    for r in rows:
        x = r.result
        p = f"{x['p_vs_best_member']:.3g} ({x['best_member']})" if r.kind == "ensemble" else ""
        copies = len(r.transforms)
        how = f"{len(r.members)} x {copies} cop{'y' if copies == 1 else 'ies'}" + (
            f", {r.merge}" if r.merge != "-" else "")
        lines.append([r.name, how, _fmt(x["AJI"]), _fmt(x["AJI_se"]), _fmt(x["PQ"]), _fmt(x["Dice1"]), _fmt(x["F1"]),
                      _fmt(x["AJI_same_organ"]), _fmt(x["AJI_new_organ"]), _fmt(x["s_per_tile"], 2),
                      _fmt(x["train_minutes"], 1), p])
    return tabulate(lines, headers=headers, tablefmt="pipe", disable_numparse=True)


def write_outputs(out: Path, rows: list[Row], members: list[Member], settings: dict[str, Any],
                  cache: PredictionCache) -> None:
    """per_image/<row>.csv, summary.json, table.csv; each atomically, after every row is done."""
    import csv

    from nuclei_d2.evaluation.report import write_records_csv
    from nuclei_d2.utils.io import atomic_write, write_json_atomic

    for r in rows:
        write_records_csv(out / "per_image" / f"{r.name}.csv", r.records, extra_keys=("image_id", "file_name"))

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    summary = {
        "settings": settings,
        "members": {m.name: {"config": m.config, "weights": m.weights, "meta_architecture": type(m.model).__name__,
                             "train_minutes": clean(m.train_minutes)} for m in members},
        "rows": [clean({**r.result, **({"min_votes": r.min_votes, "iou": r.iou, "command": r.command}
                                       if r.kind == "ensemble" else {})}) for r in rows],
        "member_predictions": {"computed": cache.computed, "reused": cache.reused},
    }
    write_json_atomic(out / "summary.json", summary, indent=1)

    def _write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            for r in rows:
                w.writerow(["" if isinstance(r.result[c], float) and math.isnan(r.result[c]) else r.result[c]
                            for c in COLUMNS])

    atomic_write(out / "table.csv", _write)


def run(args: argparse.Namespace, specs: list[tuple[str, str, str]], ensembles: list[list[str]]) -> int:
    """Build every member and row (any error: one line, exit 2, nothing written), evaluate, print, write."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from nuclei_d2.data.datasets import DatasetLoadError
    from nuclei_d2.engine.defaults import check_datasets
    from nuclei_d2.errors import ConfigError
    from nuclei_d2.utils.io import check_output_dir

    try:
        out = check_output_dir(args.output_dir)
        for name, config, weights in specs:  # every file before any model is built
            if not config.startswith("zoo:") and not os.path.isfile(config):
                raise ConfigError(f"--member {name}: config file not found: {config}")
            if "://" not in weights and not os.path.isfile(weights):
                raise ConfigError(f"--member {name}: weights file not found: {weights}")
        members = {name: Member(name, config, weights, args.dataset, args.opts, args.tta_off)
                   for name, config, weights in specs}
        check_datasets([args.dataset], "--dataset")
        from detectron2.data import DatasetCatalog

        dicts = list(DatasetCatalog.get(args.dataset))
        if args.max_images:
            dicts = dicts[: args.max_images]
        if not dicts:
            raise ValueError(f"--dataset {args.dataset}: no images")
        for name, minutes in args.train_minutes.items():  # given on the command line: all stages
            members[name].train_minutes = minutes
        from nuclei_d2.inference.prediction_cache import PredictionCache

        cache = PredictionCache()
        rows = [alone_row(m, cache) for m in members.values()]
        votes = args.min_votes or [None]
        rows += [ensemble_row([members[n] for n in e], cache, args.merge, v, args.iou, args.dataset, args.opts,
                              args.tta_off, label_votes=len(votes) > 1) for e in ensembles for v in votes]
        for r in rows:  # an ensemble's training minutes add up
            r.train_minutes = sum(members[n].train_minutes for n in r.members)
    except (ConfigError, DatasetLoadError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        for i, r in enumerate(rows):
            evaluate_row(r, args.dataset, dicts, i + 1, len(rows))
    compare_to_best_member(rows)
    settings = {"dataset": args.dataset, "n_images": len(dicts), "merge": args.merge, "min_votes": args.min_votes,
                "iou": args.iou, "tta_off": bool(args.tta_off), "opts": list(args.opts),
                "ensembles": ["+".join(e) for e in ensembles], "hausdorff": False,
                "seconds": round(time.perf_counter() - t0, 1)}
    write_outputs(out, rows, list(members.values()), settings, cache)
    print(f"\n{args.dataset}: {len(dicts)} image(s); member predictions computed {cache.computed}, reused "
          f"{cache.reused}; p: paired Wilcoxon of per-image AJI against the ensemble's best member alone\n")
    print(format_table(rows))
    print(f"\nwrote {out / 'table.csv'}, {out / 'summary.json'} and {out / 'per_image'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
