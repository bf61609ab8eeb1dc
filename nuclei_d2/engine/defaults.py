"""Config setup shared by the command-line tools, with errors a user can act on.

Detectron2 reports a mistyped key, a missing weights file or an unregistered dataset with a stack trace from deep
inside yacs, fvcore or the data loader, often minutes into a run. :func:`setup_cfg` checks these up front and raises
:class:`ConfigError` with a one-line explanation; the tools print it and exit with status 2.
"""

from __future__ import annotations

import difflib
import gc
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from detectron2.config import CfgNode

from ..config import build_cfg
from ..errors import CheckpointError, ConfigError  # re-exported: tools import them from here
from ..model_zoo.manifest import ZOO_PREFIX, resolve_zoo_config

#: Meta-architectures without weights (evaluated only).
UNTRAINABLE_ARCHITECTURES = frozenset({"ClassicalWatershed"})

#: Overrides that let any config build from random initialisation, without the checkpoints it names (a stage-2
#: config's stage-1 model, Mask R-CNN+'s distance network: every sub-model's WEIGHTS): for benchmarks that time
#: untrained models and for tests. Every key exists in every config, so they apply to all methods alike.
RANDOM_INIT_OPTS = ("MODEL.WEIGHTS", "", "MODEL.BRPNET.STAGE1.WEIGHTS", "", "MODEL.TWO_STAGE.STAGE1.WEIGHTS", "",
                    "MODEL.MASKRCNN_PLUS.DISTANCE_NET.WEIGHTS", "",
                    "MODEL.MASKRCNN_PLUS.ALLOW_UNTRAINED_DISTANCE", "True")

__all__ = ["RANDOM_INIT_OPTS", "UNTRAINABLE_ARCHITECTURES", "CheckpointError", "ConfigError",
           "check_config_weights", "check_datasets", "check_weights", "leave_process_group", "meta_architecture",
           "required_targets_of", "setup_cfg", "submodels_of", "weights_in_use", "write_override_config"]


def write_override_config(path: str | os.PathLike, base_config: str | os.PathLike, opts: Sequence[str],
                          comment: str = "") -> Path:
    """A config file inheriting from ``base_config`` that sets ``opts`` (``KEY VALUE ...``), written atomically.

    Values are written as the config holds them after the overrides (typed, checked against its keys).
    """
    import yaml

    from ..utils.io import atomic_write

    cfg = build_cfg(str(base_config), opts)
    nested: dict = {}
    for key in opts[::2]:
        node, parts = nested, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        value = cfg
        for part in parts:
            value = value[part]
        node[parts[-1]] = list(value) if isinstance(value, tuple) else value
    text = "".join(f"# {line}\n" for line in comment.splitlines())
    text += f'_BASE_: "{Path(base_config).resolve()}"\n' + yaml.safe_dump(nested, sort_keys=False)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


_REPO = Path(__file__).resolve().parents[2]


def _weights_missing(path: str, repo_relative: bool = False) -> bool:
    """A local weights file that does not exist (URLs are left to Detectron2: they need internet)."""
    if "://" in path:
        return False
    p = os.path.expanduser(path)
    if os.path.isfile(p):
        return False
    return not (repo_relative and not os.path.isabs(p) and (_REPO / p).is_file())


def check_weights(path: str, resume: bool = False, output_dir: str | None = None, *, key: str = "MODEL.WEIGHTS",
                  allow_pickle: bool = False, hint: Callable[[], str] | None = None,
                  repo_relative: bool = False) -> None:
    """Raise ConfigError if the weights file ``path`` (config key ``key``) does not exist, or CheckpointError if it
    is a ``.pkl`` the user did not allow (unpickling can run code).

    ``hint()`` says how to produce a missing file. With ``--resume`` and a checkpoint in ``output_dir``,
    ``MODEL.WEIGHTS`` is not used, so it is not checked. ``repo_relative``: the loader also tries the path from the
    repository (``DISTANCE_WEIGHTS`` does).
    """
    from ..checkpoint import check_pickle_allowed

    if not path:
        return
    if key == "MODEL.WEIGHTS" and resume and output_dir and os.path.isfile(os.path.join(output_dir, "last_checkpoint")):
        return
    check_pickle_allowed(path, allow_pickle, key)
    if _weights_missing(path, repo_relative):
        how = hint() if hint is not None else ""
        if not how and key == "MODEL.WEIGHTS":
            how = "give a local .pth file, or '' to train from random initialisation"
        raise ConfigError(f"{key}: weights file not found: {path!r}" + (f"; {how}" if how else ""))


def _config_value(config: Path, key: str, depth: int = 0) -> object:
    """A top-level key of a YAML config, following ``_BASE_`` (without building the config)."""
    import yaml

    try:
        data = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(data, dict):
        return None
    if key in data:
        return data[key]
    base = data.get("_BASE_")
    if isinstance(base, str) and depth < 10:
        return _config_value(config.parent / os.path.expanduser(base), key, depth + 1)
    return None


def _shown_path(path: Path) -> str:
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else str(path)


def _producing_command(key: str, path: str, config_file: str | None, producer_config: str = "") -> str:
    """The ``train_net`` command that writes the missing weights file ``path`` (or a hint when none is known).

    ``model_final.pth`` is written to a run's OUTPUT_DIR: the producer is a sub-model's CONFIG when it names one
    (``producer_config``), otherwise the config (in configs/ or beside ``config_file``) whose OUTPUT_DIR holds the
    file, e.g. a stage-1 config for a stage-2 config's STAGE1.WEIGHTS, the pre-training config for a fine-tuning one.
    """
    fallback = {
        "MODEL.BRPNET.STAGE1.WEIGHTS": "train stage 1 first (MODEL.BRPNET.TRAIN_STAGE 1, e.g. configs/brpnet.yaml) "
                                       "and give its model_final.pth",
        "MODEL.TWO_STAGE.STAGE1.WEIGHTS": "train stage 1 first (MODEL.TWO_STAGE.TRAIN_STAGE 1, e.g. "
                                          "configs/two_stage_unet.yaml) and give its model_final.pth",
        "MODEL.BRPNET.DENSENET_WEIGHTS": "give torchvision's densenet121 state dict (densenet121-a639ec97.pth; "
                                         "nothing is downloaded), or '' to start TAFE from random initialisation",
    }.get(key, "")
    target = os.path.abspath(os.path.expanduser(path))
    if "://" in path or os.path.basename(target) != "model_final.pth":
        return fallback
    out_dir = os.path.dirname(target)
    producer: str | None = None
    if producer_config:
        if os.path.isfile(producer_config):
            producer = producer_config
        elif (_REPO / producer_config).is_file():
            producer = _shown_path(_REPO / producer_config)
    else:
        folders = [_REPO / "configs"] + ([Path(config_file).resolve().parent] if config_file else [])
        for config in sorted({c.resolve() for folder in dict.fromkeys(folders) for c in folder.glob("*.yaml")}):
            written = _config_value(config, "OUTPUT_DIR")
            if isinstance(written, str) and os.path.abspath(os.path.expanduser(written)) == out_dir:
                producer = _shown_path(config)
                break
    if producer is None:
        return fallback
    command = f"python tools/train_net.py --config-file {producer}"
    written = _config_value(Path(producer), "OUTPUT_DIR")
    if not (isinstance(written, str) and os.path.abspath(os.path.expanduser(written)) == out_dir):
        command += f" OUTPUT_DIR {os.path.dirname(path) or '.'}"
    return f"produce it with: {command}"


def meta_architecture(cfg: CfgNode) -> type | None:
    """The registered class of ``MODEL.META_ARCHITECTURE`` (None when it is not registered)."""
    from detectron2.modeling import META_ARCH_REGISTRY

    from .. import modeling  # noqa: F401  (registers ours)

    try:
        return META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    except KeyError:
        return None


def submodels_of(cfg: CfgNode) -> list:
    """The sub-models (:class:`nuclei_d2.modeling.submodel.SubModel`) the config's model loads: its
    meta-architecture's ``submodels(cfg)`` (stage-1 networks, Mask R-CNN+'s distance network)."""
    cls = meta_architecture(cfg)
    fn = getattr(cls, "submodels", None)
    return list(fn(cfg)) if fn is not None else []


def required_targets_of(cfg: CfgNode) -> tuple[str, ...]:
    """The dense targets the config's model trains on: its meta-architecture's ``required_targets_of(cfg)``."""
    cls = meta_architecture(cfg)
    fn = getattr(cls, "required_targets_of", None)
    return tuple(fn(cfg)) if fn is not None else ()


def weights_in_use(cfg: CfgNode) -> list[tuple[str, str, str]]:
    """Every (config key, weights path, config that trains it) the model a config describes will load; empty
    paths included, the config "" when unknown.

    Sub-models count only when the model uses them (:func:`submodels_of`: e.g. Mask R-CNN+'s distance network only
    with a predicted distance channel), DENSENET_WEIGHTS only for BRP-Net: other configs inherit the keys without
    using them.
    """
    m = cfg.MODEL
    out = [("MODEL.WEIGHTS", m.WEIGHTS, "")]
    out += [(spec.weights_key, spec.weights, spec.config) for spec in submodels_of(cfg)]
    if m.META_ARCHITECTURE == "BRPNet":
        out.append(("MODEL.BRPNET.DENSENET_WEIGHTS", m.BRPNET.DENSENET_WEIGHTS, ""))
    out += [(f"TEST.ENSEMBLE.WEIGHTS[{i}]", w, "") for i, w in enumerate(cfg.TEST.ENSEMBLE.WEIGHTS)]
    return out


def check_config_weights(cfg: CfgNode, config_file: str | None = None, resume: bool = False) -> None:
    """:func:`check_weights` for every weights file the config names, before anything starts: a missing one is one
    line naming the key, the path and the command that produces it (for a sub-model: its CONFIG)."""
    allow_pickle = bool(cfg.MODEL.CHECKPOINT.ALLOW_PICKLE)
    for key, path, producer in weights_in_use(cfg):
        check_weights(path, resume=resume, output_dir=cfg.OUTPUT_DIR, key=key, allow_pickle=allow_pickle,
                      hint=lambda k=key, p=path, c=producer: _producing_command(k.split("[")[0], p, config_file, c),
                      repo_relative=key != "MODEL.WEIGHTS" and key.endswith(".WEIGHTS"))


#: Display names of the families of Detectron2's built-in datasets (by the first word of their names).
_DETECTRON2_FAMILIES = {"coco": "COCO", "keypoints": "COCO", "lvis": "LVIS", "cityscapes": "Cityscapes", "voc": "VOC",
                        "ade20k": "ADE20K"}


def check_datasets(names: Iterable[str], what: str, *, prepared: bool = True) -> None:
    """Raise ConfigError naming any dataset in ``names`` that is not registered (listing ours and counting
    Detectron2's COCO/LVIS/... built-ins, which are of no use here), or, with ``prepared``, whose JSON does not exist
    yet (naming the file and the command that makes it)."""
    from ..data.datasets.register import dataset_names_by_origin, unprepared_dataset_message

    ours, detectron2s = dataset_names_by_origin()
    registered = set(ours) | set(detectron2s)
    for name in names:
        if name not in registered:
            close = difflib.get_close_matches(name, [*ours, *detectron2s], n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            families = dict.fromkeys(_DETECTRON2_FAMILIES.get(n.split("_")[0], n.split("_")[0]) for n in detectron2s)
            others = f", and {len(detectron2s)} Detectron2 built-ins ({', '.join(families)})" if detectron2s else ""
            raise ConfigError(
                f"{what}: dataset {name!r} is not registered.{hint} Registered: {', '.join(sorted(ours))}{others}. "
                "Register your own with DATASETS.REGISTER or nuclei_d2.data.register_nuclei_dataset "
                "(see datasets/README.md)."
            )
        problem = unprepared_dataset_message(name) if prepared else None
        if problem:
            raise ConfigError(f"{what}: {problem}")


def check_schedule(cfg: CfgNode) -> None:
    """Raise ConfigError for SOLVER.STEPS that fvcore would reject with a message naming neither key."""
    if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupMultiStepLR":
        return
    steps, max_iter = list(cfg.SOLVER.STEPS), cfg.SOLVER.MAX_ITER
    kept = [s for s in steps if s <= max_iter]  # Detectron2 drops later steps (with a warning)
    if any(b <= a for a, b in zip(kept, kept[1:], strict=False)):
        raise ConfigError(f"SOLVER.STEPS must increase, got {tuple(steps)}")
    if max_iter in kept:
        raise ConfigError(f"SOLVER.STEPS {tuple(steps)} contains SOLVER.MAX_ITER ({max_iter}): a step must come "
                          f"before the last iteration (e.g. SOLVER.STEPS \"({int(max_iter * 0.8)},)\")")


def _fall_back_to_cpu(cfg: CfgNode) -> None:
    """Detectron2 defaults to MODEL.DEVICE "cuda"; on a machine without CUDA run on the CPU, and say so."""
    import torch

    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger("nuclei_d2").warning("MODEL.DEVICE is %r but CUDA is not available: using the CPU",
                                               cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"


def leave_process_group() -> None:
    """End of a process started by Detectron2's ``launch``: wait for every rank, then close the process group.

    Ranks other than the main one finish evaluation first (only the main one computes and writes the metrics); one
    that exited while the others still held the gloo group open sometimes aborted them ("terminate called without an
    active exception"), failing a run that had done its work. ``destroy_process_group`` alone is not enough:
    Detectron2's ``comm`` keeps its own references to the groups (the local group, the cached global gloo group), so
    gloo's threads outlived it and were torn down with the interpreter, where they could still abort (rarely, more
    often under load). Dropping those references first joins the threads here. A no-op with one process.
    """
    import torch.distributed as dist
    from detectron2.utils import comm

    if comm.get_world_size() > 1:
        comm.synchronize()
        comm._LOCAL_PROCESS_GROUP = None
        comm.create_local_process_group.cache_clear()
        comm._get_global_gloo_group.cache_clear()
        dist.destroy_process_group()
        gc.collect()


def _check_crop_config(n) -> None:
    """The nucleus-aware crop's probabilities (``INPUT.NUCLEI``), before any process starts."""
    for key in ("CROP_NUCLEUS_PROB", "CROP_CONTACT_PROB"):
        if not 0.0 <= float(n[key]) <= 1.0:
            raise ConfigError(f"INPUT.NUCLEI.{key} must be a probability in [0, 1], got {n[key]}")
    if float(n.CROP_CONTACT_PROB) > 0 and not int(n.CROP_SIZE):
        raise ConfigError("INPUT.NUCLEI.CROP_CONTACT_PROB places the nucleus-aware crop: it needs "
                          "INPUT.NUCLEI.CROP_SIZE > 0 (INPUT.CROP is Detectron2's uniform crop)")


def setup_cfg(config_file: str | None, opts: Sequence[str] = (), *, resume: bool = False,
              eval_only: bool = False, freeze: bool = True, check_data: bool = False) -> CfgNode:
    """Build the config and register what it names (synthetic data, DATASETS.REGISTER); check weights/datasets.

    ``config_file`` may be ``zoo:NAME``: a model zoo entry's config, with ``MODEL.WEIGHTS`` (and an ensemble's
    members) pointing at its files once their sha256 matched the manifest (:mod:`nuclei_d2.model_zoo`); ``opts`` go
    after the entry's own overrides.

    ``check_data``: also check that the datasets the run reads (DATASETS.TRAIN unless ``eval_only``, DATASETS.TEST)
    were prepared (their JSON exists), so a missing one is one line before anything starts (train_net); off by
    default, for callers that only build a model from the config (predict) and need none of its datasets.
    """
    from ..data.synthetic import SyntheticSpec, register_synthetic_datasets

    if config_file and config_file.startswith(ZOO_PREFIX):  # a model zoo entry: its verified config and weights
        config_file, zoo_opts = resolve_zoo_config(config_file)
        opts = [*zoo_opts, *opts]
    cfg = build_cfg(config_file, opts)
    register_synthetic_datasets(SyntheticSpec.from_config(cfg))
    from ..data.datasets import register_datasets_from_config

    try:
        register_datasets_from_config(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"DATASETS.REGISTER: {e}") from e
    _fall_back_to_cpu(cfg)
    from ..export.runtime import check_runtime_config

    if check_runtime_config(cfg):  # an export folder's files are the weights: none is loaded or checked
        if cfg.MODEL.WEIGHTS:
            logging.getLogger("nuclei_d2").info("INFERENCE.RUNTIME %s: MODEL.WEIGHTS (%s) is not used, the networks "
                                                "come from %s", cfg.INFERENCE.RUNTIME, cfg.MODEL.WEIGHTS,
                                                cfg.INFERENCE.EXPORTED)
        cfg.merge_from_list([*RANDOM_INIT_OPTS, "MODEL.BRPNET.DENSENET_WEIGHTS", ""])
    # INPUT.TARGETS lists extras; the targets the model trains on follow from it (no hand-kept list in YAML)
    cfg.INPUT.TARGETS = list(dict.fromkeys([*required_targets_of(cfg), *cfg.INPUT.TARGETS]))
    if not float(cfg.INPUT.NUCLEI.SCALE) > 0:
        raise ConfigError(f"INPUT.NUCLEI.SCALE must be > 0 (a magnification factor, 1 = as scanned), got "
                          f"{cfg.INPUT.NUCLEI.SCALE}")
    check_config_weights(cfg, config_file, resume=resume)
    if not eval_only:
        if cfg.MODEL.META_ARCHITECTURE in UNTRAINABLE_ARCHITECTURES:
            raise ConfigError(f"{cfg.MODEL.META_ARCHITECTURE} has nothing to train: run it with --eval-only "
                              "(and tune its parameters with tools/tune_classical.py)")
        check_datasets(cfg.DATASETS.TRAIN, "DATASETS.TRAIN", prepared=check_data)
        check_schedule(cfg)
        _check_crop_config(cfg.INPUT.NUCLEI)
        from .ema import check_ema_config

        check_ema_config(cfg)  # SOLVER.EMA.DECAY, before any process starts
        from .compile import check_compile_config

        check_compile_config(cfg)  # SOLVER.COMPILE.MODE / DYNAMIC
    check_datasets(cfg.DATASETS.TEST, "DATASETS.TEST", prepared=check_data)
    if freeze:
        cfg.freeze()
    return cfg
