"""``BRPNet``: the BRP-Net meta-architecture (Chen et al., "Boundary-assisted Region Proposal Networks for Nucleus
Segmentation", MICCAI 2020; arXiv:2006.02695).

Two stages trained in two runs of ``tools/train_net.py`` (``MODEL.BRPNET.TRAIN_STAGE``):

1. **TAFE** (:mod:`.tafe`) predicts nucleus (``semantic``) and ``boundary`` probabilities; targets are the mapper's
   ``foreground`` and ``boundary`` (``INPUT.TARGETS``). Loss per output and deep-supervision branch: smooth
   truncated loss + ``DICE_WEIGHT`` x soft Dice.
2. **Proposal-wise segmentation** (:mod:`.refine`): TAFE comes from stage 1 through the sub-model spec
   ``MODEL.BRPNET.STAGE1`` (:mod:`nuclei_d2.modeling.submodel`: loaded strictly, frozen unless ``FROZEN False``);
   in each training forward it makes proposals on the training crops (:func:`.proposals.extract_proposals`), each is
   matched to the ground truth (``label_map``) with IoU > ``MATCH_IOU`` and the two refinement networks learn the
   matched mask with a focal loss.

Inference (:meth:`BRPNet.inference`): TAFE probabilities (tiled like every dense model), proposals, and — with
``MODEL.BRPNET.INFERENCE: refine`` — the refined patches pasted back; ``proposals`` returns TAFE + post-processing
alone. Output: the project's contract ``{"instances", "label_map", "probs"}`` (:class:`DenseSegmentor`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ..dense_base import DenseSegmentor, dense_base_kwargs
from ..networks import NetworkIO
from ..submodel import SubModel, freeze, setup_submodel
from .densenet import DenseNetEncoder
from .proposals import assign_proposal_labels, extract_proposals, proposal_boxes
from .refine import RefineNet, assemble_refined, build_patches, sigmoid_focal_loss
from .tafe import TAFE, TASKS, smooth_truncated_loss, soft_dice_loss

__all__ = ["BRPNet", "RefineNetwork", "TAFENetwork"]

logger = logging.getLogger(__name__)

INFERENCE_MODES = ("refine", "proposals")


STAGE1 = "MODEL.BRPNET.STAGE1"


class TAFENetwork(nn.Module):
    """TAFE as a tensor-in / tensor-out module ("tafe"): normalised image (sides multiples of the backbone's stride;
    :meth:`BRPNet.dense_probs` pads) -> ``B x 2 x H x W`` semantic and boundary probabilities (sigmoid)."""

    def __init__(self, tafe: TAFE):
        super().__init__()
        self.tafe = tafe
        self.io = NetworkIO(inputs=("image",), outputs=("probs",), channels=(tafe.backbone.in_channels,),
                            out_channels=(len(TASKS),), size_multiple=tafe.size_divisibility, pad_mode="reflect",
                            meaning="nucleus (semantic) and boundary probabilities (sigmoid)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tafe(x)
        return torch.sigmoid(torch.cat([out[t] for t in TASKS], dim=1))


class RefineNetwork(nn.Module):
    """A refinement network as a tensor-in / tensor-out module ("refine_small", "refine_large"): ``B x (C + 2) x S x
    S`` patches (normalised image, semantic and boundary probabilities, zeroed outside the dilated proposal) -> ``B x
    1 x S x S`` nucleus probabilities (sigmoid)."""

    def __init__(self, net: RefineNet, size: int):
        super().__init__()
        self.net = net
        self.io = NetworkIO(inputs=("patches",), outputs=("probs",), channels=(net.in_channels,), out_channels=(1,),
                            fixed_size=(int(size), int(size)),
                            meaning="refined nucleus probability of each proposal patch (sigmoid)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


@META_ARCH_REGISTRY.register()
class BRPNet(DenseSegmentor):
    """``MODEL.META_ARCHITECTURE: BRPNet`` — see the module docstring."""

    prob_names = TASKS
    postprocess_keys = tuple(f"MODEL.BRPNET.{k}" for k in (
        "INFERENCE", "PROPOSAL_THRESHOLD", "PROPOSAL_DILATION", "PROPOSAL_MIN_SIZE", "CONNECTIVITY", "PROPOSAL_SPLIT",
        "PROPOSAL_SPLIT_SIGMA_FACTOR", "PROPOSAL_SPLIT_MIN_DISTANCE", "MARGIN", "SMALL_SIZE", "LARGE_SIZE",
        "MASK_DILATION", "REFINE_THRESHOLD", "REFINE_BATCH", "MIN_SIZE"))

    @configurable
    def __init__(self, *, tafe: TAFE, refine_small: RefineNet, refine_large: RefineNet, train_stage: int = 1,
                 inference: str = "refine", dice_weight: float = 0.5, ds_weight: float = 1.0,
                 truncation: float = 0.3, proposal: dict[str, Any] | None = None, margin: int = 12,
                 small_size: int = 48, large_size: int = 176, mask_dilation: float = 2.0, match_iou: float = 0.5,
                 focal_gamma: float = 2.0, focal_alpha: float = -1.0, max_proposals: int = 64,
                 train_dilations: tuple[float, ...] = (), refine_threshold: float = 0.5, refine_batch: int = 64,
                 min_size: int = 0, stage1: SubModel | None = None, allow_pickle: bool = False, **kwargs: Any):
        """
        Args:
            tafe: the stage-1 network; refine_small / refine_large: the stage-2 networks (input C + 2 channels).
            train_stage: 1 (TAFE trains; refinement nets frozen) or 2 (refinement trains; TAFE from ``stage1``).
            inference: "refine" (full BRP-Net) or "proposals" (TAFE + post-processing).
            dice_weight, ds_weight, truncation: stage-1 loss = sum over outputs of smooth truncated loss (truncation
                gamma) + dice_weight x soft Dice; deep-supervision outputs weighted by ds_weight.
            proposal: keyword arguments of :func:`extract_proposals` (threshold, dilation, min_size, connectivity,
                split, split_sigma_factor, split_min_distance).
            margin, small_size, large_size, mask_dilation: patch geometry (:func:`proposal_boxes`,
                :func:`build_patches`).
            match_iou, focal_gamma, focal_alpha: stage-2 labels (IoU > tau) and focal loss.
            max_proposals: at most this many proposals per training image (random subset; CPU memory).
            train_dilations: proposal dilation radii drawn per training image in stage 2 (empty: proposal's).
            refine_threshold, refine_batch, min_size: paste-back threshold, patches per forward, smallest object.
            stage1: in stage 2, the sub-model spec of TAFE (``MODEL.BRPNET.STAGE1``: the ``tafe.*`` tensors of a
                stage-1 checkpoint, frozen unless ``FROZEN`` False;
                :func:`~nuclei_d2.modeling.submodel.setup_submodel`).
            allow_pickle: accept a ``.pkl`` stage-1 checkpoint (unpickling can run code).
        """
        kwargs.setdefault("size_divisibility", tafe.size_divisibility)
        super().__init__(**kwargs)
        if tafe.backbone.in_channels != self.in_channels:
            raise ValueError(f"TAFE takes {tafe.backbone.in_channels} channels but PIXEL_MEAN has {self.in_channels}")
        for name, net in (("small", refine_small), ("large", refine_large)):
            if net.in_channels != self.in_channels + 2:
                raise ValueError(f"the {name} refinement net must take {self.in_channels + 2} channels (image + 2 "
                                 f"probability maps), got {net.in_channels}")
        if small_size % refine_small.size_divisibility or large_size % refine_large.size_divisibility:
            raise ValueError(f"MODEL.BRPNET.SMALL_SIZE / LARGE_SIZE ({small_size}, {large_size}) must be multiples of "
                             f"{refine_small.size_divisibility} (the refinement nets' down-sampling)")
        if not small_size < large_size:
            raise ValueError(f"MODEL.BRPNET.SMALL_SIZE ({small_size}) must be smaller than LARGE_SIZE ({large_size})")
        if train_stage not in (1, 2):
            raise ValueError(f"MODEL.BRPNET.TRAIN_STAGE must be 1 or 2, got {train_stage}")
        if inference not in INFERENCE_MODES:
            raise ValueError(f"MODEL.BRPNET.INFERENCE must be one of {INFERENCE_MODES}, got {inference!r}")
        self.tafe, self.refine_small, self.refine_large = tafe, refine_small, refine_large
        self.train_stage, self.inference_mode = int(train_stage), inference
        self.dice_weight, self.ds_weight, self.truncation = float(dice_weight), float(ds_weight), float(truncation)
        self.proposal = dict(proposal or {})
        self.margin, self.small_size, self.large_size = int(margin), int(small_size), int(large_size)
        self.mask_dilation, self.match_iou = float(mask_dilation), float(match_iou)
        self.focal_gamma, self.focal_alpha = float(focal_gamma), float(focal_alpha)
        self.max_proposals = int(max_proposals)
        self.train_dilations = tuple(float(d) for d in train_dilations)
        self.refine_threshold, self.refine_batch, self.min_size = (
            float(refine_threshold), int(refine_batch), int(min_size))
        self._rng = np.random.default_rng(0)
        #: seconds spent in the last inference call: stage1, proposals, stage2 (for benchmarks).
        self.timings: dict[str, float] = {}
        if self.train_stage == 2:
            setup_submodel(self, "tafe", stage1 if stage1 is not None else SubModel(STAGE1, what="stage-1 TAFE"),
                           source_prefix="tafe.", allow_pickle=allow_pickle)
        else:  # stage 1 does not train the refinement networks: no gradient, no optimizer state, eval mode
            freeze(self.refine_small)
            freeze(self.refine_large)

    @classmethod
    def from_config(cls, cfg: Any) -> dict[str, Any]:
        b = cfg.MODEL.BRPNET
        in_ch = 3 + len(cfg.INPUT.EXTRA_CHANNELS)
        d = b.DENSENET
        backbone = DenseNetEncoder(in_ch, int(d.GROWTH_RATE), tuple(int(n) for n in d.BLOCK_CONFIG),
                                   int(d.NUM_INIT_FEATURES), int(d.BN_SIZE), stem_stride=1, stem_pool=False)
        if b.DENSENET_WEIGHTS:
            backbone.load_torchvision_weights(b.DENSENET_WEIGHTS, allow_pickle=cfg.MODEL.CHECKPOINT.ALLOW_PICKLE)
        tafe = TAFE(backbone, int(b.WIDTH), bool(b.FUSION), bool(b.DEEP_SUPERVISION))
        growths = tuple(int(g) for g in b.REFINE_GROWTHS)
        kwargs = {
            **dense_base_kwargs(cfg),
            "tafe": tafe,
            "refine_small": RefineNet(in_ch + 2, growths, int(b.REFINE_LAYERS)),
            "refine_large": RefineNet(in_ch + 2, growths, int(b.REFINE_LAYERS)),
            "train_stage": int(b.TRAIN_STAGE),
            "inference": str(b.INFERENCE),
            "dice_weight": float(b.DICE_WEIGHT),
            "ds_weight": float(b.DS_WEIGHT),
            "truncation": float(b.TRUNCATION),
            "proposal": {"threshold": float(b.PROPOSAL_THRESHOLD), "dilation": float(b.PROPOSAL_DILATION),
                         "min_size": int(b.PROPOSAL_MIN_SIZE), "connectivity": int(b.CONNECTIVITY),
                         "split": bool(b.PROPOSAL_SPLIT), "split_sigma_factor": float(b.PROPOSAL_SPLIT_SIGMA_FACTOR),
                         "split_min_distance": int(b.PROPOSAL_SPLIT_MIN_DISTANCE)},
            "margin": int(b.MARGIN),
            "small_size": int(b.SMALL_SIZE),
            "large_size": int(b.LARGE_SIZE),
            "mask_dilation": float(b.MASK_DILATION),
            "match_iou": float(b.MATCH_IOU),
            "focal_gamma": float(b.FOCAL_GAMMA),
            "focal_alpha": float(b.FOCAL_ALPHA),
            "max_proposals": int(b.MAX_PROPOSALS_PER_IMAGE),
            "train_dilations": tuple(float(r) for r in b.TRAIN_DILATIONS),
            "refine_threshold": float(b.REFINE_THRESHOLD),
            "refine_batch": int(b.REFINE_BATCH),
            "min_size": int(b.MIN_SIZE),
            "stage1": SubModel.from_config(cfg, STAGE1, "stage-1 TAFE"),
            "allow_pickle": bool(cfg.MODEL.CHECKPOINT.ALLOW_PICKLE),
        }
        if int(b.TRAIN_STAGE) == 2 and not b.STAGE1.WEIGHTS and not cfg.MODEL.WEIGHTS \
                and cfg.INFERENCE.RUNTIME == "torch":  # (an exported runtime brings its own networks)
            logger.warning("MODEL.BRPNET.TRAIN_STAGE is 2 but neither MODEL.BRPNET.STAGE1.WEIGHTS nor MODEL.WEIGHTS is "
                           "set: proposals come from an untrained TAFE")
        return kwargs

    @classmethod
    def submodels(cls, cfg: Any) -> list[SubModel]:
        """The sub-models a config of this meta-architecture loads (stage 2: the stage-1 TAFE)."""
        b = cfg.MODEL.BRPNET
        return [SubModel.from_config(cfg, STAGE1, "stage-1 TAFE")] if int(b.TRAIN_STAGE) == 2 and b.STAGE1.WEIGHTS \
            else []

    @classmethod
    def required_targets_of(cls, cfg: Any) -> tuple[str, ...]:
        """The dense targets a config's training losses need (added to ``INPUT.TARGETS`` by setup)."""
        return ("foreground", "boundary") if int(cfg.MODEL.BRPNET.TRAIN_STAGE) == 1 else ()

    @property
    def required_targets(self) -> tuple[str, ...]:
        return ("foreground", "boundary") if self.train_stage == 1 else ()

    # ---- stage 1 ---------------------------------------------------------------------------------------------------
    def _tafe_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """TAFE outputs for any input size (reflect-padded to a multiple of the stride, cropped back)."""
        h, w = x.shape[-2:]
        d = self.tafe.size_divisibility
        ph, pw = (-h) % d, (-w) % d
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        out = self.tafe(x)
        return {k: v[..., :h, :w] for k, v in out.items()}

    def network_modules(self) -> dict[str, nn.Module]:
        """"tafe", and with ``INFERENCE "refine"`` the two refinement networks."""
        nets: dict[str, nn.Module] = {"tafe": TAFENetwork(self.tafe)}
        if self.inference_mode == "refine":
            nets["refine_small"] = RefineNetwork(self.refine_small, self.small_size)
            nets["refine_large"] = RefineNetwork(self.refine_large, self.large_size)
        return nets

    def dense_probs(self, x: torch.Tensor) -> torch.Tensor:
        """TAFE's probabilities for any input size (reflect-padded to a multiple of its stride, cropped back)."""
        h, w = x.shape[-2:]
        d = self.tafe.size_divisibility
        ph, pw = (-h) % d, (-w) % d
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
        return self.run_network("tafe", x)[..., :h, :w]

    def dense_losses(self, x: torch.Tensor, targets: dict[str, torch.Tensor], valid: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
        out = self._tafe_logits(x)
        names = {"semantic": "foreground", "boundary": "boundary"}
        losses: dict[str, torch.Tensor] = {}
        for task in TASKS:
            t = (targets[names[task]] > 0).float()
            total = x.new_zeros(())
            ds_total = x.new_zeros(())
            for key, logits in out.items():
                if key != task and not key.startswith(task + "_ds"):
                    continue
                lg = logits[:, 0]
                term = smooth_truncated_loss(lg, t, valid, self.truncation) + \
                    self.dice_weight * soft_dice_loss(lg, t, valid)
                if key == task:
                    total = total + term
                else:
                    ds_total = ds_total + self.ds_weight * term
            losses[f"loss_{task}"] = total
            if self.tafe.deep_supervision:
                losses[f"loss_{task}_ds"] = ds_total
        return losses

    # ---- stage 2 ---------------------------------------------------------------------------------------------------
    def forward(self, batched_inputs: list[dict[str, Any]]) -> Any:
        if self.training and self.train_stage == 2:
            return self.refine_losses(batched_inputs)
        return super().forward(batched_inputs)

    def _refine_net(self, group: str) -> RefineNet:
        return self.refine_small if group == "small" else self.refine_large

    def refine_losses(self, batched_inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Stage-2 training: proposals of the frozen TAFE on each crop, IoU-tau labels from ``label_map``, focal
        loss of the two refinement networks on the (at most ``max_proposals`` per image) proposal patches."""
        x, _, _ = self.prepare_training_batch(batched_inputs)
        with torch.no_grad():
            probs = self.dense_probs(x).float().cpu().numpy()  # float: bf16 under SOLVER.AMP
        inputs: dict[str, list[np.ndarray]] = {"small": [], "large": []}
        targets: dict[str, list[np.ndarray]] = {"small": [], "large": []}
        for i, inp in enumerate(batched_inputs):
            if "label_map" not in inp:
                raise ValueError(f"BRP-Net stage 2 trains on the ground-truth label map, but training input "
                                 f"{inp.get('file_name', i)} has none (the mapper sets 'label_map' when it has labels)")
            gt = inp["label_map"]
            gt = gt.numpy() if isinstance(gt, torch.Tensor) else np.asarray(gt)
            h, w = gt.shape
            sem, bnd = probs[i, 0, :h, :w], probs[i, 1, :h, :w]
            prop_kw = dict(self.proposal)
            if self.train_dilations:
                prop_kw["dilation"] = float(self._rng.choice(self.train_dilations))
            label, _ = extract_proposals(sem, bnd, **prop_kw)
            matches = assign_proposal_labels(label, gt, self.match_iou)
            boxes = proposal_boxes(label, self.margin)
            n = len(boxes)
            if n > self.max_proposals > 0:
                keep = np.zeros(n, bool)
                keep[self._rng.choice(n, self.max_proposals, replace=False)] = True
                boxes = np.where(keep[:, None], boxes, 0)
            img = x[i, :, :h, :w].cpu().numpy()
            patches = build_patches(img, sem, bnd, label, boxes, self.small_size, self.large_size,
                                    self.mask_dilation, gt=gt, matches=matches)
            for g, p in patches.items():
                inputs[g].append(p["input"])
                targets[g].append(p["target"])
        losses: dict[str, torch.Tensor] = {}
        for g in ("small", "large"):
            net = self._refine_net(g)
            if inputs[g]:
                inp_t = torch.from_numpy(np.concatenate(inputs[g])).to(self.device)
                tgt_t = torch.from_numpy(np.concatenate(targets[g])).to(self.device)
                logits = net(inp_t)[:, 0]
                losses[f"loss_refine_{g}"] = sigmoid_focal_loss(logits, tgt_t, self.focal_gamma, self.focal_alpha)
            else:  # keep every trainable parameter in the graph (DDP) with a zero loss
                losses[f"loss_refine_{g}"] = sum(p.sum() * 0.0 for p in net.parameters())
        return losses

    @torch.no_grad()
    def refine(self, image: torch.Tensor, semantic: np.ndarray, boundary: np.ndarray, proposals: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
        """Stage-2 inference on one image: ``C x H x W`` 0-255 image, the TAFE maps and the proposal label map ->
        (refined label map 1..N, scores)."""
        h, w = proposals.shape
        boxes = proposal_boxes(proposals, self.margin)
        img = self.normalize(image).cpu().numpy()
        patches = build_patches(img, semantic, boundary, proposals, boxes, self.small_size, self.large_size,
                                self.mask_dilation)
        refined: list[np.ndarray | None] = [None] * len(boxes)
        for g, p in patches.items():
            for s in range(0, len(p["index"]), max(self.refine_batch, 1)):
                batch = torch.from_numpy(p["input"][s:s + self.refine_batch]).to(self.device)
                out = self.run_network(f"refine_{g}", batch)[:, 0].float().cpu().numpy()
                for j, idx in enumerate(p["index"][s:s + self.refine_batch]):
                    refined[int(idx)] = out[j]
        keep = [i for i, r in enumerate(refined) if r is not None]
        return assemble_refined([refined[i] for i in keep], boxes[keep], (h, w), self.refine_threshold,
                                self.min_size)

    # ---- inference -------------------------------------------------------------------------------------------------
    def postprocess(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """TAFE + post-processing (the proposals) alone; :meth:`segment_probs` adds the refinement, which needs the
        image."""
        return extract_proposals(probs[0], probs[1], **self.proposal)

    @torch.no_grad()
    def segment_probs(self, probs: np.ndarray, image: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Proposals, then (``MODEL.BRPNET.INFERENCE`` "refine", given the ``C x H x W`` 0-255 image at the maps'
        size) the refinement networks: the last step of :meth:`inference` and of wrappers that average the
        probability maps (TTA, ensembles). Records the seconds of each part in ``timings``."""
        t0 = time.perf_counter()
        label, scores = self.postprocess(probs)
        t1 = time.perf_counter()
        if self.inference_mode == "refine" and image is not None and label.any():
            label, scores = self.refine(image, probs[0], probs[1], label)
        self.timings.update(proposals=t1 - t0, stage2=time.perf_counter() - t1)
        return label, scores

    @torch.no_grad()
    def output_probs(self, inp: dict[str, Any]) -> torch.Tensor:
        """The TAFE's maps (:meth:`DenseSegmentor.output_probs`), timed: starts a new ``timings`` record, which
        :meth:`segment_probs` completes. The inference loop itself is the dense base class's."""
        t0 = time.perf_counter()
        probs = super().output_probs(inp)
        self.timings = {"stage1": time.perf_counter() - t0}
        return probs
