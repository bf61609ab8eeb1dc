"""Trained nuclei models that travel with nuclei-d2, in the spirit of ``detectron2.model_zoo``.

    from nuclei_d2 import model_zoo
    model_zoo.list_models()                      # the entries' names
    cfg = model_zoo.get_config("NAME")           # its config, MODEL.WEIGHTS pointing at the verified weights
    model = model_zoo.get("NAME")                # built, loaded, eval mode (an ensemble: its merging wrapper)
    predictor = model_zoo.get_predictor("NAME")  # tiled inference on an RGB array of any size

Every tool that takes a config file takes ``zoo:NAME`` instead (``tools/train_net.py --config-file zoo:NAME`` to
fine-tune or evaluate an entry, ``tools/predict.py --model NAME``). Each file is checked against the manifest's
sha256 before it is read, and weights are read with ``torch.load(weights_only=True)`` through
:mod:`nuclei_d2.checkpoint`, so a zoo file cannot run code. The manifest format is in :mod:`.manifest`, how entries
are built in :mod:`nuclei_d2.engine.zoo_entry` and docs/model_zoo.md.
"""

from __future__ import annotations

from typing import Any

from .manifest import (
    ZOO_ENV,
    ZOO_PREFIX,
    ZooEntry,
    file_sha256,
    flagship,
    get_entry,
    load_manifest,
    resolve_zoo_config,
    verify_entry,
    zoo_dir,
)

__all__ = ["ZOO_ENV", "ZOO_PREFIX", "ZooEntry", "file_sha256", "flagship", "format_table", "get", "get_config",
           "get_entry", "get_predictor", "list_models", "load_manifest", "resolve_zoo_config", "verify_entry",
           "zoo_dir"]


def list_models() -> list[str]:
    """Names of the zoo's entries (models and ensembles), in manifest order."""
    return list(load_manifest())


def _device(cfg: Any, device: str | None) -> None:
    import torch

    cfg.MODEL.DEVICE = device or cfg.MODEL.DEVICE
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"


def get_config(name: str, trained: bool = True, opts: list[str] | None = None, root: Any = None) -> Any:
    """The entry's config (a CfgNode, not frozen) after its files were verified against the manifest;
    ``trained=False`` leaves ``MODEL.WEIGHTS`` (and an ensemble's members) empty: the architecture only. ``opts``:
    further ``KEY VALUE`` overrides; ``root``: another zoo folder (default :func:`zoo_dir`). The device falls back to
    the CPU when CUDA is absent."""
    from ..config import build_cfg

    config_file, zoo_opts = resolve_zoo_config(ZOO_PREFIX + name, root)
    cfg = build_cfg(config_file, [*zoo_opts, *(opts or [])])
    _device(cfg, None)
    if not trained:
        cfg.MODEL.WEIGHTS = ""
        cfg.TEST.ENSEMBLE.WEIGHTS = []
        cfg.TEST.ENSEMBLE.CONFIGS = []
        cfg.TEST.ENSEMBLE.OPTS = []
    return cfg


def get(name: str, trained: bool = True, device: str | None = None, root: Any = None) -> Any:
    """The entry's model, built, loaded (weights verified first) and in eval mode; an ensemble entry (and an entry
    whose config turns on test-time augmentation) comes wrapped in its
    :class:`~nuclei_d2.inference.test_time.TestTimeWrapper`. ``device``: ``MODEL.DEVICE`` (default: the config's,
    the CPU when CUDA is absent)."""
    from ..checkpoint import NucleiCheckpointer
    from ..inference.test_time import build_test_time_wrapper
    from ..modeling.build import build_nuclei_model

    cfg = get_config(name, trained=trained, root=root)
    _device(cfg, device)
    model = build_nuclei_model(cfg)
    if cfg.MODEL.WEIGHTS:
        NucleiCheckpointer.from_config(model, cfg, config_file=ZOO_PREFIX + name).load(cfg.MODEL.WEIGHTS)
    return build_test_time_wrapper(cfg, model.eval()).eval()


def get_predictor(name: str, device: str | None = None, **kwargs: Any) -> Any:
    """A :class:`~nuclei_d2.inference.Predictor` of the entry (tiling, stitching, its test-time settings);
    ``kwargs`` as the Predictor's (tile_size, overlap, batch_size, progress, ...)."""
    from ..inference.predictor import Predictor

    cfg = get_config(name)
    _device(cfg, device)
    return Predictor(cfg, **kwargs)


def _score(card: dict, key: str) -> str:
    value = ((card.get("held_out") or {}).get("scores") or {}).get(key)
    return f"{value:.3f}" if isinstance(value, int | float) else "-"


def format_table(entries: dict[str, ZooEntry] | None = None) -> str:
    """The zoo as a plain-text table: name, kind, held-out AJI / PQ / Dice1 / F1 (``kumar_test``), seconds per
    1000x1000 tile on CPU, weights size, training data and description."""
    lead = flagship() if entries is None else None
    entries = load_manifest() if entries is None else entries
    if not entries:
        return f"the model zoo at {zoo_dir()} has no entries yet (docs/model_zoo.md says how to build one)"
    rows = [("name", "kind", "AJI", "PQ", "Dice1", "F1", "s/tile", "MB", "trained on", "description")]
    for e in entries.values():
        card = dict(e.card)
        if e.kind == "ensemble":
            size = sum(entries[m].weights_path.stat().st_size for m in e.members if entries[m].weights_path.is_file())
        else:
            size = e.weights_path.stat().st_size if e.weights_path.is_file() else 0
        spt = card.get("seconds_per_tile")
        trained_on = card.get("trained_on") or {}
        data = ", ".join(trained_on.get("datasets", [])) + (f" ({trained_on['tiles']} tiles)"
                                                           if trained_on.get("tiles") else "")
        if e.kind == "ensemble":
            data = "members: " + " + ".join(e.members)
        rows.append((e.name, e.kind, _score(card, "AJI"), _score(card, "PQ"), _score(card, "Dice1"),
                     _score(card, "F1"), f"{spt:.1f}" if isinstance(spt, int | float) else "-",
                     f"{size / 1e6:.1f}", data, e.description))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    if lead:
        lines.append(f"flagship (what scripts/demo.sh runs): {lead}")
    return "\n".join(lines) + ("\nAJI / PQ / Dice1 / F1: held out (the same recipe trained without the scored "
                              "images; kumar_train -> kumar_test for the shipped entries); s/tile: seconds per check "
                              "image (a 1000x1000 Kumar tile for the shipped entries) on the CPU that built the entry")
