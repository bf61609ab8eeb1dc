"""``TestTimeWrapper``: test-time augmentation and/or an ensemble around any nuclei-d2 model, merged per nucleus.

What Mask R-CNN+ does at inference (Bancher et al., MICCAI COMPAY 2021, after Hollandi et al. 2020): every model
of the ensemble predicts every test-time copy of the image, each prediction is mapped back to the original frame
(:mod:`nuclei_d2.inference.tta`), and the nuclei are merged -- grouped by mask IoU, groups seen by too few members
dropped, soft masks averaged and thresholded, scores averaged (:mod:`nuclei_d2.inference.merge`).

The wrapper is an ``nn.Module`` with the model contract (``[{"instances": Instances}]``), so Detectron2's
``inference_on_dataset`` and every evaluator use it unchanged. ``NucleiTrainer.test`` wraps the model with
:func:`build_test_time_wrapper` when ``TEST.AUG.ENABLED`` is set or ``TEST.ENSEMBLE.WEIGHTS`` lists models, so::

    python tools/train_net.py --config-file configs/maskrcnn_plus.yaml --eval-only MODEL.WEIGHTS fold0.pth \\
        TEST.AUG.ENABLED True TEST.ENSEMBLE.WEIGHTS "['fold1.pth', 'fold2.pth']"

Dense models (the U-Nets, BRP-Net: :class:`~nuclei_d2.modeling.dense_base.DenseSegmentor`) are merged earlier by
default (``TEST.MERGE.MODE`` "auto"): the copies' probability maps are mapped back, averaged, and post-processed once
by the main model (``segment_probs``), the usual TTA of U-Net pipelines: one post-processing run, and the
watershed or threshold sees maps in which each copy's noise is averaged out. ``"instances"`` (voting on each copy's
nuclei, as for R-CNNs) works for dense models too; which is better depends on the model and its post-processing
(measured in docs/time_to_accuracy.md). In "probs" mode members must all be dense with the same maps
(``prob_names``). ``"shared"`` averages maps across *methods*: each map of the first member is averaged with the maps
of the other members that estimate the same quantity (``DenseSegmentor.map_meanings``: e.g. the NB U-Net's "inside"
and the two-stage U-Net's eroded "foreground" are both the nucleus interior), its other maps are its own, and the
first member's post-processing runs on the result.

Each member's predictions are made by :meth:`TestTimeWrapper.member_copy` (nuclei of one copy) and
:meth:`TestTimeWrapper.member_probs_sum` (a dense member's maps summed over the copies); the merges only combine them,
so callers that evaluate many wrappers of the same members (``benchmarks/ensemble.py``, ``tools/tune_inference.py``)
share them through one :class:`~nuclei_d2.inference.prediction_cache.PredictionCache` and compute each once.

It works with any model returning ``Instances`` (nuclei-d2's ``pred_nuclei`` crops, or ``pred_masks``); its own
output is :class:`~nuclei_d2.structures.NucleiInstances` (full-size ``pred_masks`` only when read). For R-CNN models
(``GeneralizedRCNN`` and subclasses, e.g. Mask R-CNN+) the *soft* masks are merged (``TEST.MERGE.SOFT_MASKS``): the
mask head's probabilities are pasted into each box exactly as Detectron2 pastes them (``_do_paste_mask``), but kept as
probabilities and as crops, instead of full-size boolean masks.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.wrappers import unwrap_model
from ..structures import CropMasks, nuclei_of
from .ensemble import EnsembleMember, load_ensemble_members, select_channels
from .merge import merge_instances
from .prediction_cache import PredictionCache
from .tta import TTATransform, parse_tta_transforms, rescale_input, scaled_size, tta_input

__all__ = ["MERGE_MODES", "TestTimeWrapper", "build_test_time_wrapper", "dense_map_meanings", "dense_prob_names",
           "predict_crops", "rcnn_soft_crops"]

#: ``TEST.MERGE.MODE`` values: "probs" averages dense models' probability maps, "shared" averages the maps dense
#: models of different methods share by meaning, "instances" merges nuclei, "auto" takes "probs" when every member is
#: a dense model with the same maps, else "instances".
MERGE_MODES = ("auto", "probs", "shared", "instances")

logger = logging.getLogger(__name__)


def dense_prob_names(model: nn.Module) -> tuple[str, ...] | None:
    """The probability maps a dense model predicts (``prob_names``), or None for a model that only gives nuclei."""
    from ..modeling.dense_base import DenseSegmentor

    m = unwrap_model(model)
    return tuple(m.prob_names) if isinstance(m, DenseSegmentor) else None


def dense_map_meanings(model: nn.Module) -> tuple[str, ...] | None:
    """What each of a dense model's maps estimates (``DenseSegmentor.map_meaning_names``), or None if not dense."""
    from ..modeling.dense_base import DenseSegmentor

    m = unwrap_model(model)
    return tuple(m.map_meaning_names) if isinstance(m, DenseSegmentor) else None


def _supports_soft_masks(model: nn.Module) -> bool:
    from detectron2.modeling import GeneralizedRCNN

    if not isinstance(model, GeneralizedRCNN) or not getattr(model.roi_heads, "mask_on", False):
        return False
    return "do_postprocess" in inspect.signature(model.inference).parameters


def rcnn_soft_crops(raw: Any, height: int, width: int) -> CropMasks:
    """Soft mask crops from raw R-CNN outputs (``inference(..., do_postprocess=False)``) at ``height x width``.

    The R-CNNs' own post-processing (:func:`~nuclei_d2.modeling.rcnn.crop_postprocess`: boxes rescaled, clipped and
    filtered like ``detector_postprocess``, each mask pasted into its box with Detectron2's ``_do_paste_mask``) with
    the probabilities kept in the pasted region.
    """
    from ..modeling.rcnn import crop_postprocess

    return crop_postprocess(raw, height, width, mask_threshold=None).pred_nuclei


@torch.no_grad()
def predict_crops(model: nn.Module, inp: dict[str, Any], soft_masks: bool = True) -> CropMasks:
    """Predictions of ``model`` on one mapped input as :class:`CropMasks`, at the input's ``height x width``.

    Soft masks for R-CNN models when ``soft_masks`` (see :func:`rcnn_soft_crops`), else the model's nuclei
    (:func:`nuclei_of`: a dense model's crops as they are, never full-size masks).
    """
    m = unwrap_model(model)
    h, w = inp["image"].shape[-2:]
    height, width = int(inp.get("height", h)), int(inp.get("width", w))
    if soft_masks and _supports_soft_masks(m):
        raw = m.inference([inp], do_postprocess=False)[0]
        return rcnn_soft_crops(raw, height, width)
    out = model([inp])[0]
    if "instances" not in out:
        raise KeyError(f"{inp.get('file_name', 'input')}: model output has no 'instances' (keys: {sorted(out)})")
    return nuclei_of(out["instances"].to("cpu"))


class TestTimeWrapper(nn.Module):
    """Run ``members x transforms`` predictions per image and merge them per nucleus (see the module docstring).

    Inference only: calling it in training mode raises.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, members: Sequence[nn.Module | EnsembleMember], transforms: Sequence[TTATransform] | None = None,
                 *, iou_threshold: float = 0.5, min_votes: int = 2, mask_threshold: float = 0.5,
                 soft_masks: bool = True, extra_channels: Sequence[str] = (), input_format: str = "RGB",
                 merge: str = "auto", min_visible: float = 0.0):
        """
        Args:
            members: models (or :class:`EnsembleMember` with their input channels); at least one.
            transforms: test-time copies (default: the identity only).
            iou_threshold, min_votes, mask_threshold: see :func:`nuclei_d2.inference.merge.merge_instances`.
            soft_masks: merge the mask probabilities of R-CNN models (else their boolean masks).
            extra_channels: ``INPUT.EXTRA_CHANNELS`` of the inputs (a colour copy recomputes ``hematoxylin``).
            input_format: "RGB" or "BGR" order of the first three channels.
            merge: "probs" (average dense models' probability maps, post-process once), "shared" (average the maps
                dense members share by meaning, post-process with the first member), "instances" (merge nuclei per IoU
                group) or "auto" ("probs" when every member is dense with the same maps).
            min_visible: "instances" merge: drop merged nuclei that keep less than this fraction of their pixels
                where better-scored ones overlap them (``TEST.MIN_VISIBLE_FRACTION``; 0 keeps all).

        Raises:
            ValueError: no member, a bad ``min_votes`` or ``merge``, "probs" or "shared" with a member that is not
                dense, "probs" with different maps, or "shared" with a member sharing no map with the first.
        """
        super().__init__()
        if not members:
            raise ValueError("TestTimeWrapper needs at least one model")
        wrapped = [m if isinstance(m, EnsembleMember) else EnsembleMember(m) for m in members]
        self.models = nn.ModuleList([m.model for m in wrapped])
        self.members = wrapped  # channels and resolution per member; the models are registered in self.models
        self.transforms = list(transforms) if transforms else parse_tta_transforms(["identity"])
        self.iou_threshold = float(iou_threshold)
        self.min_votes = int(min_votes)
        self.mask_threshold = float(mask_threshold)
        self.soft_masks = bool(soft_masks)
        self.extra_channels = tuple(extra_channels)
        self.input_format = input_format
        self.min_visible = float(min_visible)
        if not 0.0 <= self.min_visible <= 1.0:
            raise ValueError(f"TEST.MIN_VISIBLE_FRACTION must be in [0, 1], got {min_visible}")
        if self.min_votes < 1:
            raise ValueError(f"TEST.MERGE.MIN_VOTES must be >= 1, got {min_votes}")
        self.merge_mode = self._resolve_merge(merge)
        if self.merge_mode == "instances" and self.min_votes > self.num_predictions:
            logger.warning("TEST.MERGE.MIN_VOTES is %d but each image gets only %d predictions (%d model(s) x %d "
                           "transform(s)): every nucleus predicted by all of them is kept", self.min_votes,
                           self.num_predictions, len(self.models), len(self.transforms))

    def _resolve_merge(self, merge: str) -> str:
        if merge not in MERGE_MODES:
            raise ValueError(f"TEST.MERGE.MODE must be one of {list(MERGE_MODES)}, got {merge!r}")
        if merge == "instances":
            return merge
        if merge == "shared":
            return self._check_shared()
        names = [dense_prob_names(m) for m in self.models]
        if all(n is not None for n in names) and len(set(names)) == 1:
            return "probs"
        if merge == "probs":
            what = ", ".join(f"{type(unwrap_model(m)).__name__} ({'maps ' + str(list(n)) if n else 'not dense'})"
                             for m, n in zip(self.models, names))
            raise ValueError("TEST.MERGE.MODE 'probs' averages probability maps, so every member must be a dense "
                             f"model (U-Net, BRP-Net) predicting the same maps; the members are: {what}. Use "
                             "'instances' (or 'auto') to merge their nuclei instead")
        return "instances"

    def _check_shared(self) -> str:
        meanings = [dense_map_meanings(m) for m in self.models]
        described = [f"{type(unwrap_model(m)).__name__} ({'maps ' + str(list(n)) if n else 'not dense'})"
                     for m, n in zip(self.models, meanings)]
        if any(n is None for n in meanings):
            raise ValueError("TEST.MERGE.MODE 'shared' averages probability maps, so every member must be a dense "
                             f"model (U-Net, BRP-Net); the members are: {', '.join(described)}. Use 'instances' to "
                             "merge their nuclei instead")
        first = set(meanings[0])
        for i, n in enumerate(meanings[1:], start=1):
            if not first & set(n):
                raise ValueError(f"TEST.MERGE.MODE 'shared': member {i + 1}, {described[i]}, predicts no map the first "
                                 f"member, {described[0]}, has (maps by meaning, DenseSegmentor.map_meanings): it "
                                 "would change nothing. Use 'instances' to merge their nuclei instead")
        self.member_meanings = meanings
        return "shared"

    @property
    def num_predictions(self) -> int:
        """Predictions merged per image (members x transforms)."""
        return len(self.models) * len(self.transforms)

    @property
    def device(self) -> torch.device:
        return next(self.models[0].parameters()).device

    @staticmethod
    def _output_size(inp: dict[str, Any]) -> tuple[int, int]:
        h, w = inp["image"].shape[-2:]
        return int(inp.get("height", h)), int(inp.get("width", w))

    def member_input(self, index: int, copy: dict[str, Any], t: TTATransform | None = None) -> dict[str, Any]:
        """A (transformed) input as member ``index`` takes it: at its own resolution times the copy's scale
        (``t``: its ``scale:<factor>`` operations; one resize for both), with its own channels."""
        h, w = copy["image"].shape[-2:]
        size = self.members[index].input_size(*self._output_size(copy), (int(h), int(w)))
        if t is not None:
            size = scaled_size(size, t)
        copy = rescale_input(copy, size, self.extra_channels, self.input_format)
        return select_channels(copy, self.members[index].channels)

    #: Optional store of member predictions shared by several wrappers of the same models, so each copy (and each
    #: dense member's map sum) is predicted once: tools/tune_inference.py when its grid only changes which copies are
    #: made and how they are merged, benchmarks/ensemble.py for its rows. Keys: :meth:`prediction_key`.
    prediction_cache: PredictionCache | None = None

    def member_id(self, index: int) -> Hashable:
        """What identifies member ``index`` in :attr:`prediction_cache` keys: its index (a cache shared by wrappers
        of different member lists needs a name instead)."""
        return index

    def prediction_key(self, kind: str, index: int, transforms: Sequence[TTATransform], inp: dict[str, Any]) -> tuple:
        """The :attr:`prediction_cache` key of member ``index``'s prediction of ``inp``: ``kind`` "copy" (nuclei of
        one copy: soft or hard masks differ) or "sum" (a dense member's maps summed over ``transforms``)."""
        soft = (self.soft_masks,) if kind == "copy" else ()
        return (kind, self.member_id(index), tuple(t.ops for t in transforms), *soft,
                str(inp.get("file_name", inp.get("image_id"))))

    def cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()``, or its value from :attr:`prediction_cache` (set) under ``key``."""
        assert self.prediction_cache is not None
        return self.prediction_cache.get(key, compute)[0]

    def member_copy(self, index: int, t: TTATransform, inp: dict[str, Any]) -> CropMasks:
        """Member ``index``'s nuclei on the copy ``t`` of ``inp``, in the original frame."""
        if self.prediction_cache is None:
            return self._predict_copy(index, t, inp)
        return self.cached(self.prediction_key("copy", index, (t,), inp), lambda: self._predict_copy(index, t, inp))

    def _predict_copy(self, index: int, t: TTATransform, inp: dict[str, Any]) -> CropMasks:
        height, width = self._output_size(inp)
        copy = tta_input(inp, t, self.extra_channels, self.input_format)
        pred = predict_crops(self.models[index], self.member_input(index, copy, t), self.soft_masks)
        return t.invert(pred, height, width)

    def member_predictions(self, inp: dict[str, Any]) -> list[CropMasks]:
        """Every model's prediction of every transformed copy of ``inp``, in the original frame."""
        return [self.member_copy(i, t, inp) for i in range(len(self.models)) for t in self.transforms]

    @torch.no_grad()
    def member_map(self, index: int, t: TTATransform, inp: dict[str, Any]) -> torch.Tensor:
        """Dense member ``index``'s ``K x H x W`` probabilities on the copy ``t`` of ``inp``, in the original frame
        at its ``height x width``."""
        height, width = self._output_size(inp)
        copy = self.member_input(index, tta_input(inp, t, self.extra_channels, self.input_format), t)
        size = t.output_size(height, width)
        probs = unwrap_model(self.models[index]).predict_probs(copy["image"])
        if tuple(probs.shape[-2:]) != size:  # the mapper resized the image: maps back to the copy's size
            probs = F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]
        return t.invert_map(probs, height, width, getattr(unwrap_model(self.models[index]), "vector_channels", ()))

    def member_probs_sum(self, index: int, inp: dict[str, Any]) -> torch.Tensor:
        """Dense member ``index``'s probabilities summed over the copies of ``inp`` (callers must not change it: it
        may be a :attr:`prediction_cache` entry)."""
        if self.prediction_cache is None:
            return self._probs_sum(index, inp)
        return self.cached(self.prediction_key("sum", index, self.transforms, inp), lambda: self._probs_sum(index, inp))

    @torch.no_grad()
    def _probs_sum(self, index: int, inp: dict[str, Any]) -> torch.Tensor:
        total: torch.Tensor | None = None
        for t in self.transforms:
            probs = self.member_map(index, t, inp)
            total = probs.clone() if total is None else total.add_(probs)
        assert total is not None
        return total

    @torch.no_grad()
    def mean_probs(self, inp: dict[str, Any]) -> torch.Tensor:
        """Dense members only: the mean of every model's ``K x H x W`` probabilities on every copy of ``inp``, in
        the original frame at its ``height x width`` (merge mode "shared": the first member's maps, each averaged
        with the other members' maps of the same meaning)."""
        sums = [self.member_probs_sum(i, inp) for i in range(len(self.models))]
        if self.merge_mode == "shared":
            return self._shared_mean(sums)
        total = sums[0].clone()
        for s in sums[1:]:
            total.add_(s)
        return total / self.num_predictions

    def _shared_mean(self, sums: list[torch.Tensor]) -> torch.Tensor:
        first = self.member_meanings[0]
        out = torch.empty_like(sums[0])
        for c, meaning in enumerate(first):
            acc, n = sums[0][c].clone(), 1
            for s, names in zip(sums[1:], self.member_meanings[1:]):
                if meaning in names:
                    acc.add_(s[names.index(meaning)])
                    n += 1
            out[c] = acc / (n * len(self.transforms))
        return out

    # The DenseSegmentor interface of the averaged maps (merge mode "probs"): tools/tune_inference.py caches them.
    output_probs = mean_probs

    @property
    def dense_model(self) -> nn.Module:
        """The model whose post-processing turns the averaged maps into nuclei (the first member)."""
        return unwrap_model(self.models[0])

    def output_image(self, inp: dict[str, Any], size: tuple[int, int]) -> torch.Tensor:
        """The first member's input channels of ``inp`` at ``size``, for its post-processing."""
        return self.dense_model.output_image(select_channels(inp, self.members[0].channels), size)

    def output_from_probs(self, probs: torch.Tensor, inp: dict[str, Any]) -> dict[str, Any]:
        """``inp``'s output from its averaged maps (:meth:`mean_probs`), post-processed by the first member."""
        return self.dense_model.dense_output(probs, self.output_image(inp, probs.shape[-2:]))

    def _dense_result(self, inp: dict[str, Any]) -> dict[str, Any]:
        return self.output_from_probs(self.mean_probs(inp), inp)

    @torch.no_grad()
    def forward(self, batched_inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.training:
            raise RuntimeError("TestTimeWrapper is for inference only: call .eval() first")
        if self.merge_mode in ("probs", "shared"):
            return [self._dense_result(inp) for inp in batched_inputs]
        results = []
        for inp in batched_inputs:
            merged = merge_instances(self.member_predictions(inp), self.iou_threshold, self.min_votes,
                                     self.mask_threshold)
            merged = merged[~merged.hidden(self.min_visible, self.mask_threshold)]
            results.append({"instances": merged.to_instances(self.mask_threshold).to(self.device)})
        return results


def build_test_time_wrapper(cfg: Any, model: nn.Module) -> nn.Module:
    """``model`` wrapped in a :class:`TestTimeWrapper` per ``TEST.AUG`` / ``TEST.ENSEMBLE`` / ``TEST.MERGE``, or
    ``model`` itself when neither test-time augmentation nor an ensemble is configured."""
    tta_on = bool(cfg.TEST.AUG.ENABLED)
    weights = [w for w in cfg.TEST.ENSEMBLE.WEIGHTS if w]
    if not tta_on and not weights:
        return model
    main = os.path.realpath(os.path.expanduser(cfg.MODEL.WEIGHTS)) if cfg.MODEL.WEIGHTS else None
    configs, opts = list(cfg.TEST.ENSEMBLE.CONFIGS), [list(o) for o in cfg.TEST.ENSEMBLE.OPTS]
    keep = []
    for i, w in enumerate(cfg.TEST.ENSEMBLE.WEIGHTS):
        if not w:
            continue
        if main and "://" not in w and os.path.realpath(os.path.expanduser(w)) == main:
            logger.info("TEST.ENSEMBLE.WEIGHTS: %s is MODEL.WEIGHTS (the evaluated model): not loaded twice", w)
            continue
        keep.append(i)
    extra = [cfg.TEST.ENSEMBLE.WEIGHTS[i] for i in keep]
    # per-member lists stay aligned with the weights that remain (one shared config file stays shared)
    if len(configs) > 1 and len(configs) == len(cfg.TEST.ENSEMBLE.WEIGHTS):
        configs = [configs[i] for i in keep]
    if opts and len(opts) == len(cfg.TEST.ENSEMBLE.WEIGHTS):
        opts = [opts[i] for i in keep]
    members: list[nn.Module | EnsembleMember] = [EnsembleMember(unwrap_model(model), None, "main")]
    members += load_ensemble_members(cfg, extra, configs, opts)
    transforms = parse_tta_transforms(list(cfg.TEST.AUG.TRANSFORMS), float(cfg.TEST.AUG.HUE_DELTA)) if tta_on \
        else parse_tta_transforms(["identity"])
    m = cfg.TEST.MERGE
    wrapper = TestTimeWrapper(members, transforms, iou_threshold=m.IOU_THRESHOLD, min_votes=m.MIN_VOTES,
                              mask_threshold=m.MASK_THRESHOLD, soft_masks=m.SOFT_MASKS,
                              extra_channels=list(cfg.INPUT.EXTRA_CHANNELS), input_format=cfg.INPUT.FORMAT,
                              merge=m.MODE, min_visible=cfg.TEST.MIN_VISIBLE_FRACTION)
    if wrapper.merge_mode == "probs":
        how = "probability maps averaged, post-processed once"
    elif wrapper.merge_mode == "shared":
        how = "maps of one meaning averaged across members, post-processed once by the first"
    else:
        how = (f"nuclei merged at mask IoU >= {m.IOU_THRESHOLD:.2f} with >= "
               f"{min(m.MIN_VOTES, wrapper.num_predictions)} vote(s)")
    logger.info("Test-time wrapper: %d model(s) x %d transform(s) %s = %d predictions per image, %s", len(members),
                len(transforms), [t.name for t in transforms], wrapper.num_predictions, how)
    return wrapper
