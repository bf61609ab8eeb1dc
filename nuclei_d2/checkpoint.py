"""The one loader every checkpoint nuclei-d2 reads goes through: it cannot run code, and it refuses misfits.

A ``.pth`` is a zip of tensors plus a pickle; ``torch.load(..., weights_only=False)`` (what Detectron2's and
fvcore's checkpointers and our own loaders used to call) unpickles *any* object in it, so a crafted file runs code
on load. A ``.pkl`` (Detectron2's model zoo format) is a plain pickle and has the same risk by construction.

* :func:`load_checkpoint_file` reads ``.pth``/``.pt`` (and anything else not ``.pkl``) with
  ``torch.load(..., map_location="cpu", weights_only=True)``: tensors, numbers, strings and containers only. A file
  holding any other object is refused, as are missing, truncated, random-bytes and not-a-state-dict files, each
  with a one-line :class:`~nuclei_d2.errors.CheckpointError` naming the file. ``.pkl`` files are refused unless the
  caller opts in (``allow_pickle``; ``MODEL.CHECKPOINT.ALLOW_PICKLE``).
* :class:`NucleiCheckpointer` is Detectron2's ``DetectionCheckpointer`` reading through that loader, with a fit
  check: a checkpoint that would leave more than :data:`FIT_THRESHOLD` of the model's weight tensors, or of its
  weight elements, missing or shape-mismatched is refused before anything is loaded into the model (Detectron2
  only warns, and the run goes on with a mostly random model). ``allow_partial`` (``MODEL.CHECKPOINT.ALLOW_PARTIAL``)
  keeps Detectron2's warnings for intentional partial loading, e.g. fine-tuning from a backbone.

Resuming needs nothing more: train_net checkpoints hold the model, optimizer and scheduler state as tensors, numbers
and lists (``{"model", "trainer": {"iteration", "hooks", "_trainer"}, "iteration"}``), all allowed by
``weights_only=True``. See docs/checkpoints.md.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .errors import CheckpointError

__all__ = ["FIT_THRESHOLD", "CheckpointError", "CheckpointFit", "NucleiCheckpointer", "check_pickle_allowed",
           "checkpoint_fit", "is_pickle_file", "load_checkpoint_file", "model_state_of"]

logger = logging.getLogger(__name__)

#: Refuse a checkpoint that leaves more than this share of the model's state-dict tensors, or of their elements,
#: missing or shape-mismatched (either measure). A different architecture or width misses nearly all of both; a
#: head with another number of classes (the usual fine-tuning case) is well under it.
FIT_THRESHOLD = 0.10

#: Files read with ``pickle`` (only when the user opts in): Detectron2's model zoo and Caffe2 formats.
PICKLE_SUFFIXES = (".pkl", ".pickle")

#: Model buffers Detectron2 fills from the config whatever the checkpoint says (it drops them from its warnings too).
_CONFIG_BUFFERS = ("pixel_mean", "pixel_std")

_PICKLE_HINT = ("set MODEL.CHECKPOINT.ALLOW_PICKLE True (--allow-pickle in tools/train_net.py and tools/predict.py) "
                "only if you trust where the file comes from")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _prefix(what: str, path: str) -> str:
    return f"{what}: {path}" if what else str(path)


def is_pickle_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is read with ``pickle`` (``.pkl``): loading it can run code."""
    return str(path).lower().endswith(PICKLE_SUFFIXES)


def check_pickle_allowed(path: str | os.PathLike, allow_pickle: bool, what: str = "") -> None:
    """Raise CheckpointError for a ``.pkl`` file unless the user opted in (``MODEL.CHECKPOINT.ALLOW_PICKLE``)."""
    if is_pickle_file(path) and not allow_pickle:
        raise CheckpointError(f"{_prefix(what, os.fspath(path))}: refusing to load a .pkl checkpoint: it is a Python "
                              f"pickle and unpickling one can run arbitrary code; {_PICKLE_HINT}")


def _has_tensors(obj: Any) -> bool:
    import numpy as np

    return isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor | np.ndarray) for v in obj.values())


def model_state_of(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The model's state dict inside a checkpoint: its ``"model"`` entry (train_net's format) or the dict itself."""
    state = checkpoint.get("model", checkpoint)
    return state if isinstance(state, Mapping) else {}


def load_checkpoint_file(path: str | os.PathLike, *, allow_pickle: bool = False, what: str = "") -> dict[str, Any]:
    """Read a checkpoint file without running code from it; return its top-level dict.

    Args:
        path: a local ``.pth``/``.pt`` file (``torch.save``), or a ``.pkl`` pickle (only with ``allow_pickle``).
        allow_pickle: read ``.pkl`` files with ``pickle`` (unpickling can run arbitrary code: trusted files only).
        what: the config key the path came from, put at the start of error messages.

    Raises:
        CheckpointError: one line naming the file: missing or unreadable, a refused ``.pkl``, objects other than
            tensors and plain containers, truncated or random bytes, or no model weights in it.
    """
    path = os.fspath(path)
    name = _prefix(what, path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{name}: checkpoint file not found" if not os.path.exists(path)
                              else f"{name}: not a file")
    if is_pickle_file(path):
        check_pickle_allowed(path, allow_pickle, what)
        logger.warning("%s: unpickling a .pkl checkpoint (MODEL.CHECKPOINT.ALLOW_PICKLE): this can run code", name)
        try:
            with open(path, "rb") as f:
                data = pickle.load(f, encoding="latin1")
        except OSError as e:
            raise CheckpointError(f"{name}: cannot read the checkpoint: {e.strerror or _first_line(e)}") from e
        except Exception as e:  # any unpickling failure is a bad file to the user
            raise CheckpointError(f"{name}: not a readable pickle (truncated or corrupt?): {_first_line(e)}") from e
        if not isinstance(data, dict):
            raise CheckpointError(f"{name}: holds a {type(data).__name__}, not a dict of model weights")
        return data
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read the checkpoint: {e.strerror or _first_line(e)}") from e
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(e))
        if unsafe:
            raise CheckpointError(f"{name}: refusing to load: the checkpoint holds Python objects other than tensors "
                                  f"(e.g. {unsafe.group(1)}), and loading them could run code; save only the "
                                  "state dict (torch.save({'model': model.state_dict()}, path))") from e
        raise CheckpointError(f"{name}: not a PyTorch checkpoint (corrupt, or not written by torch.save): "
                              f"{_first_line(e).split('. In PyTorch')[0]}") from e
    except Exception as e:  # zip/EOF/runtime errors of a damaged file
        raise CheckpointError(f"{name}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{_first_line(e)[:200]}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{name}: holds a {type(data).__name__}, not a state dict or a train_net checkpoint")
    if "model" in data and not _has_tensors(data["model"]):
        raise CheckpointError(f"{name}: its 'model' entry holds no tensors")
    if not (_has_tensors(data) or any(_has_tensors(v) for v in data.values())):
        raise CheckpointError(f"{name}: holds no tensors (keys {sorted(map(str, data))[:5]}); expected a state dict "
                              "or a train_net checkpoint")
    return data


@dataclass
class CheckpointFit:
    """How a checkpoint's state dict covers a model's: counts over the model's state-dict tensors."""

    tensors: int = 0
    elements: int = 0
    missing: list[str] = field(default_factory=list)
    #: (key, shape in the file, shape in the model)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    unloaded_elements: int = 0

    @property
    def tensor_share(self) -> float:
        """Share of the model's tensors the checkpoint would leave unloaded."""
        return (len(self.missing) + len(self.mismatched)) / max(self.tensors, 1)

    @property
    def element_share(self) -> float:
        """Share of the model's weight elements the checkpoint would leave unloaded."""
        return self.unloaded_elements / max(self.elements, 1)

    def fits(self, threshold: float = FIT_THRESHOLD) -> bool:
        return self.tensor_share <= threshold and self.element_share <= threshold

    def examples(self, n: int = 3) -> str:
        shown = [f"{k} (file {'x'.join(map(str, a)) or 'scalar'}, model {'x'.join(map(str, b)) or 'scalar'})"
                 for k, a, b in self.mismatched[:n]]
        shown += [f"{k} (not in the file)" for k in self.missing[:max(n - len(shown), 0)]]
        return ", ".join(shown)


def checkpoint_fit(model_state: Mapping[str, Any], checkpoint_state: Mapping[str, Any],
                   kept_prefixes: Iterable[str] = ()) -> CheckpointFit:
    """Compare a checkpoint's state dict with a model's (keys and shapes); keys under ``kept_prefixes`` (and
    ``pixel_mean``/``pixel_std``) are left out: loading does not replace them."""
    kept = tuple(kept_prefixes) + _CONFIG_BUFFERS
    keys = list(checkpoint_state)
    if keys and all(k.startswith("module.") for k in keys):  # saved from a DDP-wrapped model
        checkpoint_state = {k[len("module."):]: v for k, v in checkpoint_state.items()}
    fit = CheckpointFit(unexpected=sorted(set(checkpoint_state) - set(model_state)))
    for k, v in model_state.items():
        if k.startswith(kept) or isinstance(v, torch.nn.parameter.UninitializedParameter):
            continue
        n = int(v.numel())
        fit.tensors += 1
        fit.elements += n
        if k not in checkpoint_state:
            fit.missing.append(k)
            fit.unloaded_elements += n
            continue
        shape = tuple(getattr(checkpoint_state[k], "shape", ()))
        if shape != tuple(v.shape):
            fit.mismatched.append((k, shape, tuple(v.shape)))
            fit.unloaded_elements += n
    return fit


class NucleiCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that reads through :func:`load_checkpoint_file` and refuses misfitting weights.

    Args:
        model, save_dir, checkpointables: as ``DetectionCheckpointer`` (saving is unchanged).
        allow_pickle: accept ``.pkl`` files (unpickling can run code).
        allow_partial: load a checkpoint that leaves more than :data:`FIT_THRESHOLD` of the model unloaded (with
            Detectron2's warnings) instead of raising.
        config_file: the config the model was built from, named in the misfit error.

    A model may define ``checkpoint_kept_prefixes()`` returning state-dict key prefixes that loading does not
    replace (Mask R-CNN+'s distance U-Net loaded from its own file); the fit check leaves them out.
    """

    def __init__(self, model: torch.nn.Module, save_dir: str = "", *, allow_pickle: bool = False,
                 allow_partial: bool = False, config_file: str | None = None, **checkpointables: Any):
        super().__init__(model, save_dir, **checkpointables)
        self.allow_pickle = bool(allow_pickle)
        self.allow_partial = bool(allow_partial)
        self.config_file = config_file
        self._file = ""

    @classmethod
    def from_config(cls, model: torch.nn.Module, cfg: Any, save_dir: str = "", *, config_file: str | None = None,
                    **checkpointables: Any) -> NucleiCheckpointer:
        """A checkpointer with ``cfg.MODEL.CHECKPOINT.ALLOW_PICKLE`` / ``ALLOW_PARTIAL``."""
        ck = cfg.MODEL.get("CHECKPOINT", None)
        return cls(model, save_dir, allow_pickle=bool(ck and ck.ALLOW_PICKLE),
                   allow_partial=bool(ck and ck.ALLOW_PARTIAL), config_file=config_file, **checkpointables)

    def load(self, path: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # fvcore asserts (a traceback) on a missing local file: say it in one line instead
        if path and "://" not in path and not os.path.isfile(path.split("?", 1)[0]):
            raise CheckpointError(f"{path}: checkpoint file not found")
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str) -> dict[str, Any]:
        """Detectron2's formats (train_net ``.pth``, model zoo / Caffe2 ``.pkl``, pycls ``.pyth``), read safely."""
        self._file = filename
        data = load_checkpoint_file(filename, allow_pickle=self.allow_pickle)
        if is_pickle_file(filename):  # as DetectionCheckpointer._load_file
            if "model" in data and "__author__" in data:
                return data
            if "blobs" in data:
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth") and "model_state" in data:
            state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        if "model" not in data:
            data = {"model": data}
        parsed = self._parsed_url_during_load
        if parsed is not None:
            queries = parse_qs(parsed.query)
            if queries.pop("matching_heuristics", "False") == ["True"]:
                data["matching_heuristics"] = True
            if queries:
                raise CheckpointError(f"{parsed.geturl()}: unsupported query {queries}")
        return data

    def _load_model(self, checkpoint: dict[str, Any]) -> Any:
        if checkpoint.get("matching_heuristics", False):
            # Detectron2's name matching first, so the fit check sees the names that will be loaded
            from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

            self._convert_ndarray_to_tensor(checkpoint["model"])
            checkpoint["model"] = align_and_update_state_dicts(
                self.model.state_dict(), checkpoint["model"], c2_conversion=checkpoint.get("__author__") == "Caffe2")
            checkpoint["matching_heuristics"] = False
        self.check_fit(checkpoint["model"])
        return super()._load_model(checkpoint)

    def check_fit(self, state: Mapping[str, Any]) -> CheckpointFit:
        """Raise CheckpointError if ``state`` leaves too much of the model unloaded (unless ``allow_partial``)."""
        kept = getattr(self.model, "checkpoint_kept_prefixes", None)
        fit = checkpoint_fit(self.model.state_dict(), state, kept() if callable(kept) else ())
        if fit.fits():
            return fit
        arch = type(self.model).__name__
        where = f"the {arch} of {self.config_file}" if self.config_file else f"this config's {arch}"
        text = (f"{self._file}: does not fit {where}: {len(fit.missing)} of {fit.tensors} weight tensors missing and "
                f"{len(fit.mismatched)} of another shape ({fit.element_share:.0%} of the weights would stay random)")
        if fit.unexpected:
            text += f", {len(fit.unexpected)} tensors in the file that the model lacks"
        text += f"; e.g. {fit.examples()}"
        if self.allow_partial:
            logger.warning("%s; loading it anyway (MODEL.CHECKPOINT.ALLOW_PARTIAL)", text)
            return fit
        raise CheckpointError(f"{text}. Use the config the checkpoint was trained with, or set "
                              "MODEL.CHECKPOINT.ALLOW_PARTIAL True to load the part that fits on purpose (e.g. "
                              "fine-tuning from a backbone)")
