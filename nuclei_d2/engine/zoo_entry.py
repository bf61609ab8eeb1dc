"""Packing a training run into a model zoo entry (``tools/build_zoo_entry.py``): small, checked, rebuildable.

A run's ``model_final.pth`` holds the optimizer and EMA state besides the model (a ResNet-18 Mask R-CNN+: 198 MB);
an entry keeps the model's state dict only, in float16 when the entry's predictions on its check images stay within
``tolerance`` AJI of the float32 weights' (else float32, said in the card), so the ResNet-18 flagship fits the zoo's
25 MB per file. The card records the check images' per-image scores of the packed file: the zoo test recomputes them,
so a corrupted file, a mismatched config or a changed post-processing fails it.

Every input is read and checked before anything is written; files go to a temporary name and are renamed, the
manifest last, so an interrupted build leaves the zoo as it was. Rebuilding an entry replaces its files in place.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..model_zoo.manifest import get_entry, load_manifest, zoo_dir
from ..utils.io import atomic_write, file_sha256

__all__ = ["add_ensemble_entry", "dataset_records", "half_state", "held_out_scores", "pack_model_entry",
           "score_records"]

logger = logging.getLogger(__name__)

#: Card scores kept from an evaluation (means over images), overall and per organ group.
CARD_METRICS = ("AJI", "PQ", "Dice1", "F1")


def half_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with float32 tensors stored as float16 (others as they are); a tensor whose values do not fit
    float16 (overflow to inf) stays float32."""
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.dtype == torch.float32:
            h = v.half()
            out[k] = h if bool(torch.isfinite(h).all()) or not bool(torch.isfinite(v).all()) else v
        else:
            out[k] = v
    return out


def held_out_scores(results_file: str | os.PathLike) -> dict[str, Any]:
    """The card's held-out scores from an evaluation's ``nuclei_results.json`` (``tools/train_net.py --eval-only``):
    AJI / PQ / Dice1 / F1 over all images, the same and new organ groups, and AJI per organ."""
    import json

    path = Path(results_file)
    try:
        data = json.loads(path.read_text())
        summary = data["summary"]
        scores = {m: float(summary["all"]["mean"][m]) for m in CARD_METRICS}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not an evaluation's nuclei_results.json ({type(e).__name__}: {e})") from e
    for group, label in (("seen", "same organ"), ("unseen", "new organ")):
        mean = (summary.get(group) or {}).get("mean") or {}
        for m in CARD_METRICS:
            if m in mean:
                scores[f"{m} {label}"] = float(mean[m])
    organs = summary.get("organs") or {}
    for organ, block in organs.items():
        mean = (block or {}).get("mean") or {}
        if "AJI" in mean:
            scores[f"AJI {organ}"] = float(mean["AJI"])
    return {"dataset": data.get("settings", {}).get("dataset", ""), "images": int(summary["all"]["n_images"]),
            "scores": scores}


def dataset_records(dataset: str, images: Sequence[str] | int) -> list[dict[str, Any]]:
    """Dataset dicts of a registered dataset: the images named (file stems), or the first N."""
    from detectron2.data import DatasetCatalog

    from ..evaluation.evaluator import _image_name

    try:
        dicts = DatasetCatalog.get(dataset)
    except KeyError as e:
        raise ConfigError(f"check dataset {dataset!r} is not registered (tools/convert_dataset.py prepares the "
                          "built-in ones)") from e
    if isinstance(images, int):
        return [copy.deepcopy(d) for d in dicts[:images]]
    by_name = {_image_name(d): d for d in dicts}
    missing = [n for n in images if n not in by_name]
    if missing:
        raise ConfigError(f"{dataset}: no images named {missing} (it has {len(by_name)} images)")
    return [copy.deepcopy(by_name[n]) for n in images]


@torch.no_grad()
def score_records(cfg: Any, model: Any, records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-image metrics of ``model`` run as evaluation runs it (the dataset mapper, whole images, the evaluator's
    overlap rule) on dataset dicts with ground truth (``label_file`` or ``annotations``). Returns ``[{"image",
    "AJI", "PQ", "Dice1", "F1", "seconds"}]``."""
    from ..data.mapper import NucleiDatasetMapper
    from ..evaluation.evaluator import _image_name, load_ground_truth
    from ..evaluation.metrics import compute_metrics
    from ..structures import nuclei_of

    mapper = NucleiDatasetMapper(cfg, is_train=False)
    out = []
    for record in records:
        inp = mapper(copy.deepcopy(dict(record)))
        start = time.perf_counter()
        instances = model([inp])[0]["instances"].to("cpu")
        seconds = time.perf_counter() - start
        m = compute_metrics(load_ground_truth(dict(record), shape=tuple(instances.image_size)),
                            nuclei_of(instances).to_label_map(), hausdorff=False)
        out.append({"image": _image_name(record), **{k: float(m[k]) for k in CARD_METRICS}, "seconds": seconds})
    return out


def _load_model(cfg: Any, weights: str, config_file: str) -> Any:
    from ..checkpoint import NucleiCheckpointer
    from ..inference.test_time import build_test_time_wrapper
    from ..modeling.build import build_nuclei_model

    model = build_nuclei_model(cfg)
    NucleiCheckpointer.from_config(model, cfg, config_file=config_file).load(weights)
    return build_test_time_wrapper(cfg, model.eval()).eval()


def _checkpoint_training(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """Iterations and training-clock minutes a train_net checkpoint records (SOLVER.TIME_BUDGET's clock)."""
    out: dict[str, Any] = {}
    if isinstance(checkpoint.get("iteration"), int | float):
        out["iterations"] = int(checkpoint["iteration"]) + 1
    hooks = (checkpoint.get("trainer") or {}).get("hooks") or {}
    seconds = (hooks.get("TimeBudgetHook") or {}).get("seconds")
    if isinstance(seconds, int | float | torch.Tensor):
        out["minutes"] = round(float(seconds) / 60, 1)
    return out


def _write_manifest(root: Path, name: str, entry: Mapping[str, Any] | None, flagship: bool = False) -> None:
    """Set (or, with None, remove) one entry of ``root/manifest.yaml``, keeping the others and their order;
    ``flagship`` makes it the zoo's flagship (a removed entry stops being it)."""
    import yaml

    path = root / "manifest.yaml"
    data = (yaml.safe_load(path.read_text()) if path.is_file() else None) or {}
    entries = dict(data.get("entries") or {})
    if entry is None:
        entries.pop(name, None)
    else:
        entries[name] = dict(entry)
    data["entries"] = entries
    if flagship:
        data["flagship"] = name
    elif entry is None and data.get("flagship") == name:
        data.pop("flagship")
    header = "# The model zoo: see nuclei_d2/model_zoo/manifest.py for the format, docs/model_zoo.md for the entries.\n"
    atomic_write(path, lambda p: p.write_text(header + yaml.safe_dump(data, sort_keys=False, width=120)))


def pack_model_entry(name: str, config_file: str, weights: str, *, root: str | os.PathLike | None = None,
                     description: str = "", card: Mapping[str, Any] | None = None, held_out: str = "",
                     check_dataset: str = "kumar_test", check_images: Sequence[str] | int = 2,
                     float16: bool = True, tolerance: float = 0.005, opts: Sequence[str] = (),
                     flagship: bool = False) -> dict[str, Any]:
    """Pack a training run's config + weights into the zoo at ``root`` (default :func:`zoo_dir`) as ``name``.

    Args:
        config_file, weights: the run's ``config.yaml`` and ``model_final.pth`` (or ``model_ema_final.pth``).
        description: one line for the table.
        card: model-card fields (``trained_on``, ``training``: minutes / iterations / command, ``licence``, ...);
            iterations and minutes default to what the checkpoint recorded.
        held_out: ``nuclei_results.json`` of the same recipe trained on ``kumar_train`` and evaluated on
            ``kumar_test`` (:func:`held_out_scores`): the card's honest numbers.
        check_dataset, check_images: images whose per-image scores the card records (names or the first N).
        float16: store float16 when the check images' AJI stays within ``tolerance`` of float32's.
        opts: config overrides applied to the run's config (e.g. tuned post-processing).
        flagship: make it the zoo's flagship (the model scripts/demo.sh runs); False keeps the current one.

    Returns the manifest entry written.
    """
    from ..checkpoint import load_checkpoint_file, model_state_of
    from ..config import build_cfg
    from ..modeling.submodel import resolve_path
    from .defaults import setup_cfg, submodels_of

    if not name or any(c in name for c in "/\\: ") or name.startswith("."):
        raise ConfigError(f"zoo entry name {name!r}: use letters, digits, '-', '_' and '.' only")
    root = Path(root) if root is not None else zoo_dir()
    # ---- read and check everything first -------------------------------------------------------------------------
    cfg = setup_cfg(config_file, list(opts), eval_only=True, freeze=False)
    checkpoint = load_checkpoint_file(weights, what="weights")
    state = {k: v for k, v in model_state_of(checkpoint).items()}
    training = {**_checkpoint_training(checkpoint), **dict((card or {}).get("training") or {})}
    held = held_out_scores(held_out) if held_out else None
    records = dataset_records(check_dataset, check_images)
    zcfg = cfg.clone()
    zcfg.MODEL.WEIGHTS = ""
    zcfg.TEST.ENSEMBLE.WEIGHTS = []
    zcfg.TEST.ENSEMBLE.CONFIGS = []
    zcfg.TEST.ENSEMBLE.OPTS = []
    zcfg.OUTPUT_DIR = f"./output/{name}"
    sub_configs: dict[str, Any] = {}
    for spec in submodels_of(cfg):  # their weights are inside the model's state dict: ship their configs only
        node = zcfg
        *parents, leaf = spec.weights_key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = ""
        if spec.config:
            path = resolve_path(spec.config)
            if path is None:
                raise ConfigError(f"{spec.key}.CONFIG: config file not found: {spec.config!r}")
            sub_configs[spec.key + ".CONFIG"] = (f"configs/{name}.{spec.key.split('.')[-1].lower()}.yaml",
                                                 build_cfg(path).dump())
    with tempfile.TemporaryDirectory(prefix="nuclei-d2-zoo-") as tmp:
        tmpdir = Path(tmp)
        for rel, text in sub_configs.values():
            (tmpdir / Path(rel).name).write_text(text)
        sub_opts = [v for key, (rel, _) in sub_configs.items() for v in (key, str(tmpdir / Path(rel).name))]
        zcfg_file = tmpdir / "config.yaml"
        zcfg_file.write_text(zcfg.dump())
        full = tmpdir / "float32.pth"
        torch.save({"model": state}, full)
        ref_cfg = setup_cfg(str(zcfg_file), [*sub_opts, "MODEL.WEIGHTS", str(full)], eval_only=True)
        ref = score_records(ref_cfg, _load_model(ref_cfg, str(full), config_file), records)
        packed, dtype = full, "float32"
        if float16:
            half = tmpdir / "float16.pth"
            torch.save({"model": half_state(state)}, half)
            half_cfg = setup_cfg(str(zcfg_file), [*sub_opts, "MODEL.WEIGHTS", str(half)], eval_only=True)
            got = score_records(half_cfg, _load_model(half_cfg, str(half), config_file), records)
            worst = max(abs(a["AJI"] - b["AJI"]) for a, b in zip(ref, got, strict=True))
            if worst <= tolerance:
                packed, dtype, ref = half, "float16", got
            else:
                logger.warning("%s: float16 weights change a check image's AJI by %.4f (> %.4f): keeping float32",
                               name, worst, tolerance)
        # ---- write: files under temporary names, renamed; the manifest last ----------------------------------------
        cfg_rel, weights_rel = f"configs/{name}.yaml", f"weights/{name}.pth"
        entry: dict[str, Any] = {"kind": "model", "description": description, "config": cfg_rel,
                                 "config_sha256": file_sha256(zcfg_file), "weights": weights_rel,
                                 "sha256": file_sha256(packed)}
        if sub_configs:
            entry["submodel_configs"] = {k: {"file": rel, "sha256": file_sha256(tmpdir / Path(rel).name)}
                                         for k, (rel, _) in sub_configs.items()}
        card_out = {k: v for k, v in dict(card or {}).items() if k != "training"}
        card_out["training"] = training
        card_out["meta_architecture"] = cfg.MODEL.META_ARCHITECTURE
        card_out["dtype"] = dtype
        card_out["parameters"] = int(sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor)))
        card_out["seconds_per_tile"] = round(sum(r["seconds"] for r in ref) / len(ref), 2)
        card_out["check"] = {"dataset": check_dataset, "images": [r["image"] for r in ref],
                             "AJI": [round(r["AJI"], 4) for r in ref], "PQ": [round(r["PQ"], 4) for r in ref],
                             "tolerance": 0.02}
        if held is not None:
            card_out["held_out"] = {**dict(card_out.get("held_out") or {}), **held}
        entry["card"] = card_out
        for rel, src in [(cfg_rel, zcfg_file), (weights_rel, packed),
                         *[(rel, tmpdir / Path(rel).name) for rel, _ in sub_configs.values()]]:
            atomic_write(root / rel, lambda p, s=src: shutil.copyfile(s, p))
    _write_manifest(root, name, entry, flagship)
    logger.info("zoo entry %s: %s, %.1f MB, check AJI %s", name, dtype, (root / weights_rel).stat().st_size / 1e6,
                card_out["check"]["AJI"])
    return entry


def add_ensemble_entry(name: str, members: Sequence[str], *, root: str | os.PathLike | None = None,
                       overrides: Mapping[str, Any] | None = None, description: str = "",
                       card: Mapping[str, Any] | None = None, held_out: str = "", check_dataset: str = "kumar_test",
                       check_images: Sequence[str] | int = 2, flagship: bool = False) -> dict[str, Any]:
    """Add an ensemble of model entries (the first gives the input channels and test-time copies; ``overrides``:
    config keys such as ``TEST.MERGE.MIN_VOTES``; ``flagship``: as :func:`pack_model_entry`'s). Its check scores are
    measured through the zoo itself; if that fails, the manifest is left as it was."""
    from ..model_zoo import get, get_config

    root = Path(root) if root is not None else zoo_dir()
    if len(members) < 2:
        raise ConfigError(f"ensemble {name!r} needs two or more members, got {list(members)}")
    for m in members:
        if get_entry(m, root).kind != "model":
            raise ConfigError(f"ensemble {name!r}: member {m!r} is not a model entry")
    held = held_out_scores(held_out) if held_out else None
    records = dataset_records(check_dataset, check_images)
    import yaml

    load_manifest(root)  # a valid manifest before it is rewritten
    previous = ((yaml.safe_load((root / "manifest.yaml").read_text()) or {}).get("entries") or {}).get(name)
    entry: dict[str, Any] = {"kind": "ensemble", "description": description, "members": list(members),
                             "overrides": dict(overrides or {}),
                             "card": dict(card or {})}
    if held is not None:  # scores beside the command / note the card already has
        entry["card"]["held_out"] = {**dict(entry["card"].get("held_out") or {}), **held}
    _write_manifest(root, name, entry)
    try:
        ref = score_records(get_config(name, root=root), get(name, root=root), records)
    except BaseException:
        _write_manifest(root, name, previous)
        raise
    entry["card"]["seconds_per_tile"] = round(sum(r["seconds"] for r in ref) / len(ref), 2)
    entry["card"]["check"] = {"dataset": check_dataset, "images": [r["image"] for r in ref],
                              "AJI": [round(r["AJI"], 4) for r in ref], "PQ": [round(r["PQ"], 4) for r in ref],
                              "tolerance": 0.02}
    _write_manifest(root, name, entry, flagship)
    return entry
