"""``add_nuclei_config``: every configuration key nuclei-d2 adds to Detectron2's, with its default.

It only *adds* keys. Values that make Detectron2's existing keys suit nuclei (small anchors, thousands of
detections per image, input normalisation that trains from random init) live in
``configs/Base-Nuclei-RCNN-FPN.yaml``, where a user sees them next to the model they configure.

Call order (as in ``tools/train_net.py``): ``get_cfg()`` -> ``add_nuclei_config(cfg)`` -> ``merge_from_file`` ->
``merge_from_list`` -> ``freeze()``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Sequence
from typing import Any

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .errors import ConfigError

__all__ = ["add_nuclei_config", "build_cfg", "input_channel_names"]

RGB = ("red", "green", "blue")


def input_channel_names(cfg: Any) -> list[str]:
    """Names of the input channels a model built from ``cfg`` takes: RGB (or BGR) + ``INPUT.EXTRA_CHANNELS``."""
    rgb = list(RGB) if cfg.INPUT.FORMAT != "BGR" else list(reversed(RGB))
    return rgb + list(cfg.INPUT.EXTRA_CHANNELS)


def _all_keys(node: CN, prefix: str = "") -> Iterable[str]:
    for k, v in node.items():
        full = f"{prefix}{k}"
        yield full
        if isinstance(v, CN):
            yield from _all_keys(v, full + ".")


_UNKNOWN_KEY_MESSAGES = ("Non-existent config key:", "Non-existent key:")


def _is_unknown_key(err: Exception) -> bool:
    return any(m in str(err) for m in _UNKNOWN_KEY_MESSAGES)


def _unknown_key_error(cfg: CN, err: Exception, source: str) -> ConfigError:
    msg = str(err.args[0]) if err.args else str(err)
    key = msg.split(":", 1)[1].strip() if _is_unknown_key(err) else msg
    hint = difflib.get_close_matches(key, list(_all_keys(cfg)), n=3, cutoff=0.6)
    text = f"{source}: unknown config key {key!r}"
    if hint:
        text += f" (did you mean {', '.join(hint)}?)"
    return ConfigError(text)


def build_cfg(config_file: str | None = None, opts: Sequence[str] = ()) -> CN:
    """``get_cfg()`` -> ``add_nuclei_config`` -> ``merge_from_file`` -> ``merge_from_list``; not frozen.

    Raises:
        ConfigError: the file is missing, or it or ``opts`` name a key that does not exist or give a bad value.
    """
    cfg = get_cfg()
    add_nuclei_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"{config_file}: config file not found")
        try:
            cfg.merge_from_file(config_file)
        except (KeyError, ValueError, AssertionError) as e:
            if _is_unknown_key(e):
                raise _unknown_key_error(cfg, e, config_file) from e
            raise ConfigError(f"{config_file}: {e}") from e
    if opts:
        if len(opts) % 2:
            raise ConfigError(f"command-line overrides must be KEY VALUE pairs, got an odd list: {list(opts)}")
        try:
            cfg.merge_from_list(_floats_where_floats_are_expected(cfg, opts))
        except (KeyError, ValueError, AssertionError) as e:  # yacs asserts on unknown keys given as overrides
            if _is_unknown_key(e):
                raise _unknown_key_error(cfg, e, "command line") from e
            raise ConfigError(f"command line: {e}") from e
    return cfg


def _floats_where_floats_are_expected(cfg: CN, opts: Sequence[str]) -> list[str]:
    """Write integer values of float keys as floats: yacs refuses ``MODEL.NB.THRESHOLD 1`` (int against 0.5)."""
    from ast import literal_eval

    out = list(opts)
    for i in range(0, len(out), 2):
        node: object = cfg
        for part in str(out[i]).split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, float) and isinstance(out[i + 1], str):
            try:
                value = literal_eval(out[i + 1])
            except (ValueError, SyntaxError):
                continue  # yacs reports it
            if isinstance(value, int) and not isinstance(value, bool):
                out[i + 1] = repr(float(value))
    return out



def _submodel_node(parent: CN, name: str) -> CN:
    """A sub-model spec ``parent.<name>``: CONFIG, WEIGHTS, FROZEN (nuclei_d2/modeling/submodel.py)."""
    sub = parent[name] = CN()
    sub.CONFIG = ""
    sub.WEIGHTS = ""
    sub.FROZEN = True
    return sub


def add_nuclei_config(cfg: CN) -> CN:
    """Add nuclei-d2's keys (with defaults) to ``cfg`` in place and return it. Safe to call twice."""
    if "SYNTHETIC" in cfg.DATASETS:  # already added
        return cfg
    _add_data_config(cfg)
    _add_augment_and_target_config(cfg)
    _add_solver_config(cfg)
    _add_test_config(cfg)
    _add_panoptic_fusion_config(cfg)
    _add_unet_config(cfg)
    _add_maskrcnn_plus_config(cfg)
    _add_tta_config(cfg)
    _add_inference_config(cfg)
    _add_brpnet_config(cfg)
    _add_checkpoint_config(cfg)
    return cfg


def _add_checkpoint_config(cfg: CN) -> None:
    """How weights files are loaded (nuclei_d2/checkpoint.py, docs/checkpoints.md): every checkpoint (MODEL.WEIGHTS,
    MASKRCNN_PLUS.DISTANCE_NET.WEIGHTS, *.STAGE1.WEIGHTS, DENSENET_WEIGHTS, TEST.ENSEMBLE.WEIGHTS) is read with
    torch.load(weights_only=True), which loads tensors and plain containers and never runs code."""
    c = cfg.MODEL.CHECKPOINT = CN()
    # Also read .pkl checkpoints (Detectron2 model zoo / Caffe2 format). They are Python pickles: unpickling one can
    # run arbitrary code on this machine, so turn this on only for files from a source you trust.
    c.ALLOW_PICKLE = False
    # Load MODEL.WEIGHTS (and TEST.ENSEMBLE.WEIGHTS) even if it leaves more than 10% of the model's weight tensors (or
    # of their elements) missing or of another shape; those keep their random initialisation. For intentional partial
    # loading, e.g. fine-tuning from a backbone; otherwise such a file (another architecture or width) is refused
    # before anything runs.
    c.ALLOW_PARTIAL = False


def _add_augment_and_target_config(cfg: CN) -> None:
    """Augmentations, stain normalisation, extra input channels and dense targets (nuclei_d2/data/augment.py,
    nuclei_d2/stain, nuclei_d2/data/targets.py; docs/stain_and_targets.md). Everything random is off by default."""
    n = cfg.INPUT.NUCLEI
    # ---- crops and scale ------------------------------------------------------------------------------------------
    # Side in pixels of the (square) training crop; 0 = no crop. Images smaller than the crop keep their size along
    # that axis.
    n.CROP_SIZE = 0
    # Probability that a crop is placed around a randomly drawn nucleus pixel instead of uniformly (sparse tissue
    # otherwise yields many crops without nuclei).
    n.CROP_NUCLEUS_PROB = 0.5
    # Probability (drawn before CROP_NUCLEUS_PROB) that a crop is placed around a random pixel where two nuclei touch:
    # crowded regions, where instance models merge nuclei, shown more often. Needs CROP_SIZE (not INPUT.CROP).
    n.CROP_CONTACT_PROB = 0.0
    # Fixed magnification: every image is resized by this factor before anything else, in training (before the crop)
    # and at inference (predictions come back at the image's own size). 1.5 = the model sees a 40x tile as if
    # scanned at 60x (small nuclei span more feature-map cells); 2.0 at inference only lets a 40x model read 20x.
    n.SCALE = 1.0
    # Random rescale (magnification jitter) by a factor drawn uniformly from RANGE, applied with probability PROB
    # before the crop. Labels are resampled with nearest neighbour.
    n.RESCALE = CN()
    n.RESCALE.PROB = 0.0
    n.RESCALE.RANGE = (0.8, 1.25)
    # ---- elastic deformation (Simard et al. 2003) -----------------------------------------------------------------
    # uniform(-1, 1) displacement noise smoothed by a Gaussian of SIGMA px and scaled by ALPHA; rms displacement is
    # about ALPHA * 0.163 / SIGMA px (1.6 px for the defaults). Labels use nearest neighbour.
    n.ELASTIC = CN()
    n.ELASTIC.PROB = 0.0
    n.ELASTIC.ALPHA = 100.0
    n.ELASTIC.SIGMA = 10.0
    # ---- colour augmentations (image only) ------------------------------------------------------------------------
    # HED jitter (Tellez et al. 2018): per stain, concentration * U(1-ALPHA, 1+ALPHA) + U(-BETA, BETA) (OD units).
    # 0.05 is Tellez et al.'s "HED-light", 0.2 "HED-strong".
    n.HED_JITTER = CN()
    n.HED_JITTER.PROB = 0.0
    n.HED_JITTER.ALPHA = 0.05
    n.HED_JITTER.BETA = 0.05
    # Hue rotation by U(-DELTA, DELTA) of the colour circle (0.05 = +-18 degrees).
    n.HUE = CN()
    n.HUE.PROB = 0.0
    n.HUE.DELTA = 0.05
    # Brightness factor U(1-BRIGHTNESS, 1+BRIGHTNESS) and contrast factor U(1-CONTRAST, 1+CONTRAST).
    n.BRIGHTNESS_CONTRAST = CN()
    n.BRIGHTNESS_CONTRAST.PROB = 0.0
    n.BRIGHTNESS_CONTRAST.BRIGHTNESS = 0.1
    n.BRIGHTNESS_CONTRAST.CONTRAST = 0.1
    # Gaussian blur with sigma ~ U(SIGMA) pixels (out-of-focus scans).
    n.BLUR = CN()
    n.BLUR.PROB = 0.0
    n.BLUR.SIGMA = (0.1, 1.5)
    # Additive Gaussian noise with std ~ U(STD) grey levels (0-255 scale).
    n.NOISE = CN()
    n.NOISE.PROB = 0.0
    n.NOISE.STD = (1.0, 8.0)
    # ---- stain normalisation (train and test) ---------------------------------------------------------------------
    # "none", "macenko" or "vahadane". Applied to the whole image before any other augmentation; images whose stains
    # cannot be estimated (white, grey, tiny) pass through unchanged with a warning.
    n.STAIN_NORM = "none"
    # Reference for STAIN_NORM: an image file (fitted when the mapper is built) or a JSON written by
    # nuclei_d2.stain.StainNormalizer.save() (reused as is). Pick one with nuclei_d2.stain.choose_reference.
    n.STAIN_REFERENCE = ""
    # ---- test-time appearance shift (robustness measurements, docs/robustness.md) ---------------------------------
    # At inference only, one shift of nuclei_d2/data/shifts.py applied to every image before stain normalisation and
    # the extra channels, e.g. "blur:2", "jpeg:30", "hematoxylin:0.6", "scanner:aperio-like", "lowmag:2".
    # "" (or "none") = images as they are. benchmarks/robustness.py sets it per shift; never for real predictions.
    cfg.INPUT.TEST_SHIFT = ""
    # ---- extra input channels and dense targets -------------------------------------------------------------------
    # Channels stacked after RGB in the image tensor (C = 3 + len), computed after augmentation, scaled to 0-255 like
    # RGB (so PIXEL_MEAN / PIXEL_STD need 3 + len entries): "hematoxylin" (Ruifrok colour deconvolution of the
    # augmented RGB), "distance" (normalised per-nucleus distance map of the ground truth in training; zeros at
    # inference, where the model must predict it).
    cfg.INPUT.EXTRA_CHANNELS = []
    # Oracle for studies only: fill the "distance" channel from the ground truth at inference too (what a perfect
    # distance U-Net would give; use with MODEL.MASKRCNN_PLUS.DISTANCE_SOURCE "input"). Never for real predictions.
    cfg.INPUT.DISTANCE_FROM_GT_AT_TEST = False
    # Extra dense targets emitted under dataset_dict["targets"] (name -> tensor) whenever a label map is available:
    # any of "foreground", "ternary", "boundary", "distance", "distance_raw", "eroded", "edge_weight", "hv" (2 x H x W).
    # The targets the model's losses need are added by setup (its meta-architecture's required_targets_of(cfg)): list
    # only extras.
    cfg.INPUT.TARGETS = []
    # Boundary thickness in pixels of the "ternary"/"boundary" targets: nucleus pixels within this Euclidean
    # distance of another label are boundary (Cui et al. 2019 nucleus-boundary model).
    cfg.INPUT.BOUNDARY_WIDTH = 2
    # Erosion radius in pixels of the "eroded" target (two-stage U-Net stage 1, Mahbod et al. 2019), applied after
    # removing the pixels where nuclei touch.
    cfg.INPUT.ERODE_RADIUS = 1
    # Whether the image (crop) border counts as a nucleus contour for the boundary and distance targets. False: a
    # nucleus cut by the crop does not get an artificial boundary there.
    cfg.INPUT.BORDER_IS_CONTOUR = False


def _add_data_config(cfg: CN) -> None:
    # ---- datasets from converted COCO JSONs (nuclei_d2/data/datasets, docs/data.md) -------------------------------
    # Registered by register_datasets_from_config(cfg) before the loaders are built, so DATASETS.TRAIN/TEST can name
    # them: each entry "name:json_file" or "name:json_file:image_root" (or [name, json_file, image_root]).
    cfg.DATASETS.REGISTER = []
    # ---- the embedded synthetic H&E-like dataset (nuclei_d2/data/synthetic.py) ---------------------------------
    cfg.DATASETS.SYNTHETIC = CN()
    # Where generated tiles are cached; "" = $NUCLEI_D2_DATASETS/synthetic (default ./datasets/synthetic).
    cfg.DATASETS.SYNTHETIC.ROOT = ""
    cfg.DATASETS.SYNTHETIC.IMAGE_SIZE = 256
    cfg.DATASETS.SYNTHETIC.NUM_TRAIN = 8
    cfg.DATASETS.SYNTHETIC.NUM_TEST = 2
    cfg.DATASETS.SYNTHETIC.SEED = 0

    # ---- the nuclei dataset mapper (nuclei_d2/data/mapper.py) ---------------------------------------------------
    cfg.INPUT.NUCLEI = CN()
    # Random flips (horizontal and vertical) and 90-degree rotations: H&E has no preferred orientation.
    cfg.INPUT.NUCLEI.FLIP = True
    cfg.INPUT.NUCLEI.ROT90 = True
    # Drop training images whose crop holds no nucleus (Detectron2's R-CNN heads need at least one box).
    cfg.INPUT.NUCLEI.FILTER_EMPTY = True
    # Training keeps decoded tiles (image + painted label map) in memory, up to this many MB per data-loader
    # process, so each new crop skips the TIFF decode and the painting of ~1,000 annotations (~0.15 s per sample on
    # one core; docs/data.md). A Kumar tile is ~7 MB decoded. 0 disables it.
    cfg.INPUT.NUCLEI.DECODE_CACHE_MB = 512.0


def _add_solver_config(cfg: CN) -> None:
    # Model weights (hence convolution activations) stored channels-last (NHWC) for training and inference
    # (nuclei_d2/modeling/build.py): 1.12-1.21x faster training steps on CPU for the U-Nets and BRP-Net, 1.04x for
    # the ResNet-18 Mask R-CNN+ (benchmarks/bench_memory_format.py); on in those U-Net / BRP-Net CPU configs.
    cfg.MODEL.CHANNELS_LAST = False
    # ROIAlign of the R-CNN heads when training on the CPU (nuclei_d2/layers/roi_align.py): "sparse" pools every box
    # with one sparse matrix product (torchvision's numbers to float rounding; forward + backward ~3x faster, R-CNN
    # training steps ~1.2x: benchmarks/bench_roi_align.py); "torchvision" keeps torchvision's kernel. Inference
    # without gradients and CUDA always use torchvision's.
    cfg.MODEL.ROI_ALIGN_CPU = "sparse"
    # "SGD" (Detectron2's default), "Adam" or "AdamW".
    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.BETAS = (0.9, 0.999)
    # Mixed precision with SOLVER.AMP.ENABLED (Detectron2's key): the forward pass under torch.autocast in this dtype.
    # "auto" = bfloat16 on CPU (no loss scaling needed; oneDNN runs bf16 convolutions natively on CPUs with
    # AVX512-BF16 or AMX; on other CPUs, where it would be slower, "auto" trains in float32 with a warning) and float16
    # with Detectron2's AMPTrainer on CUDA. "bfloat16" / "float16" force one.
    cfg.SOLVER.AMP.PRECISION = "auto"
    # Exponential moving average of the weights (nuclei_d2/engine/ema.py): after every optimizer step
    # ema = DECAY * ema + (1 - DECAY) * weights, over the parameters and floating-point buffers (BatchNorm statistics).
    # Checkpoints carry it (--resume continues it); training also writes OUTPUT_DIR/model_ema_final.pth beside
    # model_final.pth (evaluate it with MODEL.WEIGHTS), and evaluation (TEST.EVAL_PERIOD and after training) runs on
    # both weights, the EMA's into OUTPUT_DIR/ema/.
    cfg.SOLVER.EMA = CN()
    cfg.SOLVER.EMA.ENABLED = False
    # In [0, 1): the average spans about 1 / (1 - DECAY) steps (1000 for 0.999).
    cfg.SOLVER.EMA.DECAY = 0.999
    # Update n (from 0) uses min(DECAY, (1 + n) / (10 + n)): the initial weights do not dominate a short run's average.
    cfg.SOLVER.EMA.WARMUP = True
    # torch.compile of the dense networks inside the training step (nuclei_d2/engine/compile.py): a dense method's
    # networks (U-Nets, BRP-Net's TAFE / refinement nets), an R-CNN's backbone + FPN; RPN and RoI heads (data-dependent
    # control flow) stay eager, and so do evaluation and inference. Checkpoints are unchanged (same state_dict keys).
    # The first steps pay the compilation (seconds to minutes on a CPU; inductor needs a C++ compiler); a failure
    # logs one warning and training continues eager. Works with SOLVER.AMP and MODEL.CHANNELS_LAST.
    cfg.SOLVER.COMPILE = CN()
    cfg.SOLVER.COMPILE.ENABLED = False
    # torch.compile's mode: "default", "reduce-overhead" or "max-autotune-no-cudagraphs" (longer compilation).
    cfg.SOLVER.COMPILE.MODE = "default"
    # Input shapes: "auto" (torch's default: static, recompiled as dynamic once a shape changes, e.g. BRP-Net stage 2's
    # proposal count), "static" (a recompilation per new shape) or "dynamic" (symbolic shapes from the start).
    cfg.SOLVER.COMPILE.DYNAMIC = "auto"
    # Train for minutes instead of iterations (nuclei_d2/engine/time_budget.py): > 0 runs the learning-rate schedule
    # (warm-up and decay) on a clock of training time (steps only, not checkpoints or evaluation) and ends training
    # when it reaches MINUTES, writing model_final.pth as at MAX_ITER. SOLVER.MAX_ITER is then an upper bound, and
    # warm-up lasts WARMUP_ITERS / MAX_ITER of the budget, so set MAX_ITER near the iterations the budget holds.
    # Checkpoints carry the clock (--resume continues it). 0 = off (MAX_ITER iterations).
    cfg.SOLVER.TIME_BUDGET = CN()
    cfg.SOLVER.TIME_BUDGET.MINUTES = 0.0
    # False: only the stop; the schedule still runs over MAX_ITER iterations (how runs were budgeted before).
    cfg.SOLVER.TIME_BUDGET.LR_ON_CLOCK = True


def _add_test_config(cfg: CN) -> None:
    # Evaluators for datasets whose metadata says evaluator_type == "nuclei": any of "nuclei" (AJI, PQ, Dice, ...)
    # and "coco" (segm/bbox AP).
    cfg.TEST.EVALUATORS = ["nuclei", "coco"]
    # NucleiEvaluator (nuclei_d2/evaluation, docs/metrics.md).
    cfg.TEST.NUCLEI_EVAL = CN()
    # IoU a predicted nucleus needs with a true one to count as detected (F1, precision, recall; PQ always uses >0.5).
    cfg.TEST.NUCLEI_EVAL.IOU_THRESHOLD = 0.5
    # Object-level Hausdorff distance (Cell R-CNN / panoptic-fusion papers); the slowest metric, ~50 ms a tile.
    cfg.TEST.NUCLEI_EVAL.HAUSDORFF = True
    # Predictions scoring below this are dropped before they are painted into the label map.
    cfg.TEST.NUCLEI_EVAL.SCORE_THRESHOLD = 0.0
    # Predicted nuclei that overlap (R-CNNs, merged test-time copies and ensembles): where two cover a pixel the
    # better-scored one takes it (nuclei_d2.structures.OVERLAP_RULE). A nucleus left with less than this fraction of
    # its own pixels is dropped from the output: mostly an R-CNN's second detection of a nucleus, a sliver beside the
    # first in the label map and a false nucleus for PQ / F1. 0 keeps every nucleus (Detectron2's behaviour).
    cfg.TEST.MIN_VISIBLE_FRACTION = 0.0
    # An R-CNN's mask probabilities are binarised at this value where they are pasted into their boxes (Detectron2:
    # 0.5). Merged test-time copies and ensembles average the soft masks first and use TEST.MERGE.MASK_THRESHOLD.
    cfg.TEST.MASK_THRESHOLD = 0.5


def _add_unet_config(cfg: CN) -> None:
    """The U-Net family (nuclei_d2/modeling/unet.py, dense.py, nb_unet.py, two_stage_unet.py; nuclei_d2/postprocess.py;
    nuclei_d2/layers/tiling.py; docs/unet_family.md)."""
    # ---- the configurable U-Net (one implementation for every dense method) -------------------------------------
    u = cfg.MODEL.UNET = CN()
    # Number of 2x2 max-poolings (= transposed convolutions); the net has DEPTH + 1 levels. Mahbod et al.: 4.
    u.DEPTH = 4
    # Width of the first level; level i has BASE_CHANNELS * 2**i channels unless CHANNELS lists them.
    u.BASE_CHANNELS = 32
    # Explicit widths of the DEPTH + 1 levels (overrides BASE_CHANNELS when not empty).
    u.CHANNELS = []
    # Convolutions per level (2 in the original U-Net) and their (odd) kernel size; "same" padding.
    u.CONVS_PER_BLOCK = 2
    u.KERNEL_SIZE = 3
    # "relu", "selu", "elu", "leaky_relu" or "gelu" (Cui et al.'s NB model: "selu").
    u.ACTIVATION = "relu"
    # "" (none; the NB model), "BN", "SyncBN", "GN" (gcd(32, width) groups) or "IN".
    u.NORM = ""
    # Dropout probability, its kind ("standard" or "alpha" = AlphaDropout for SELU) and place ("conv": after every
    # convolution, as in the NB model; "block": once per level between its two convolutions).
    u.DROPOUT = 0.0
    u.DROPOUT_TYPE = "standard"
    u.DROPOUT_AT = "conv"
    # Weight init: "default" (PyTorch's), "glorot_uniform" (the NB model), "he_normal" or "lecun_normal".
    u.INIT = "he_normal"
    # Decoder upsampling: "transpose" (2x2 stride-2 transposed conv) or "bilinear" (+ 1x1 conv).
    u.UPSAMPLE = "transpose"
    # Padding of inputs to a multiple of 2**DEPTH (cropped back after): "reflect", "replicate" or "constant".
    u.PAD_MODE = "reflect"

    # ---- overlapped-tile inference for dense models (nuclei_d2/layers/tiling.py) --------------------------------
    t = cfg.MODEL.TILING = CN()
    # Run inference tile by tile when the image is larger than PATCH_SIZE on either side (memory then depends on the
    # patch batch, not on the image). Smaller images run whole.
    t.ENABLED = True
    # Square patch side and stride in pixels (stride < patch: overlapping patches; every pixel's prediction is the
    # weighted vote of all patches covering it).
    t.PATCH_SIZE = 256
    t.STRIDE = 128
    # Vote weight inside a patch: "edge" (Cui et al.'s W = alpha * De / (Dc + De): pixels near a patch border count
    # less) or "uniform" (plain average).
    t.WEIGHT = "edge"
    # Patches per forward pass.
    t.BATCH_SIZE = 4
    # Show a tqdm progress bar over the patches of each image.
    t.PROGRESS = False

    # ---- dense meta-architectures (nuclei_d2/modeling/dense.py) ------------------------------------------------------
    d = cfg.MODEL.DENSE = CN()
    # Return the probability maps (C x H x W, at the input's height/width) under "probs" next to "instances".
    d.RETURN_PROBS = True
    # Predictions are crops (nuclei_d2.structures.CropMasks), never N x H x W masks: the former MAX_MASK_GB guard is
    # gone. Config files saved before (a run's config.yaml) still load: the key is ignored with a warning.
    cfg.register_deprecated_key("MODEL.DENSE.MAX_MASK_GB")

    # ---- the classical floor: deconvolution + Otsu + distance watershed (nuclei_d2/modeling/classical_watershed.py) --
    c = cfg.MODEL.CLASSICAL = CN()
    # Foreground = smoothed haematoxylin > THRESHOLD_SCALE x its per-image Otsu threshold (tuned).
    c.THRESHOLD_SCALE = 1.0
    # Smoothing of the distance transform seeding the watershed, as a fraction of the mean nucleus radius (tuned).
    c.SIGMA_FACTOR = 0.5
    # Objects smaller than this (px) are removed (tuned).
    c.MIN_SIZE = 30
    # Gaussian sigma (px) applied to the haematoxylin channel before thresholding.
    c.SMOOTHING = 1.0
    # Minimum distance (px) between watershed markers; 0 = half the mean nucleus radius.
    c.MIN_DISTANCE = 0
    # 1 = 4-neighbour, 2 = 8-neighbour connectivity for components and the watershed.
    c.CONNECTIVITY = 1

    # ---- nucleus-boundary model, Cui et al. 2019 (nuclei_d2/modeling/nb_unet.py) -----------------------------------
    nb = cfg.MODEL.NB = CN()
    # Per-pixel loss weight: "edge" (W = alpha * De / (Dc + De) of the training patch, the paper's) or "none".
    nb.LOSS_WEIGHTING = "edge"
    # Cross-entropy weights of background, boundary, inside.
    nb.CLASS_WEIGHTS = [1.0, 1.0, 1.0]
    # Post-processing: inside probability > THRESHOLD -> connected components (CONNECTIVITY 1 = 4-, 2 = 8-neighbours)
    # -> each grown back by DILATION px (negative = INPUT.BOUNDARY_WIDTH, what the paper does).
    nb.THRESHOLD = 0.5
    nb.CONNECTIVITY = 1
    nb.DILATION = -1.0
    # Drop components smaller than MIN_SIZE px before dilation (0 = keep all: the paper's post-processing is
    # parameter-free).
    nb.MIN_SIZE = 0
    # Restrict the dilation to pixels the model calls nucleus or boundary (argmax != background). Not in the paper.
    nb.RESTRICT_TO_FOREGROUND = False
    # HoVer-Net-style head (Graham et al. 2019; not in the NB paper; docs/unet_family.md): 2 more U-Net outputs (tanh),
    # each nucleus pixel's horizontal / vertical offset from its nucleus' centre of mass scaled into [-1, 1] per nucleus
    # (target "hv", added to INPUT.TARGETS by setup). Changes the checkpoint's last layer (5 outputs instead of 3).
    nb.HV_HEAD = False
    # Their losses: HV_MSE_WEIGHT * mean squared error of the maps (valid pixels) + HV_MSGE_WEIGHT * mean squared error
    # of their Sobel derivatives along their own axis (nucleus pixels); HoVer-Net weights the gradient term 2:1.
    nb.HV_MSE_WEIGHT = 1.0
    nb.HV_MSGE_WEIGHT = 2.0
    # Instances from the maps: "ternary" (the paper's: inside > THRESHOLD, components, grown back) or "hv" (needs
    # HV_HEAD; nuclei_d2.postprocess.hv_watershed): foreground = 1 - p(background) > HV_THRESHOLD; energy =
    # max(0, -d horizontal / dx, -d vertical / dy) by Sobel filters of size HV_SOBEL_SIZE (3/5/7) in map units per px
    # (an ideal edge between touching nuclei gives 1.0 at size 3, a nucleus' outer contour 0.5); markers =
    # foreground with energy < HV_ENERGY_THRESHOLD, components of >= HV_MARKER_MIN_SIZE px (a marker-less foreground
    # component gets one at its lowest energy); watershed of the energy smoothed by HV_SIGMA px inside the foreground;
    # objects under HV_MIN_SIZE px removed, holes filled. CONNECTIVITY applies too. Defaults chosen on the ideal maps of
    # kumar_train (mean AJI 0.987; Sobel 5 or energy 0.3: 0.957): tune on a trained model's maps.
    nb.POSTPROCESS = "ternary"
    nb.HV_THRESHOLD = 0.5
    nb.HV_ENERGY_THRESHOLD = 0.2
    nb.HV_SOBEL_SIZE = 3
    nb.HV_SIGMA = 1.0
    nb.HV_MARKER_MIN_SIZE = 4
    nb.HV_MIN_SIZE = 10

    # ---- two-stage U-Net, Mahbod et al. 2019 (nuclei_d2/modeling/two_stage_unet.py) ---------------------------------
    ts = cfg.MODEL.TWO_STAGE = CN()
    # Which U-Net trains: 1 = the segmentation U-Net on the modified ("eroded") ground truth, 2 = the distance U-Net
    # (the segmentation U-Net comes from STAGE1), 0 = both at once (not in the paper).
    ts.TRAIN_STAGE = 1
    # Stage 2's segmentation U-Net: the seg_net.* tensors of stage 1's model_final.pth (WEIGHTS), trained with CONFIG
    # (named in the error when the file is missing), frozen unless FROZEN False (nuclei_d2/modeling/submodel.py).
    _submodel_node(ts, "STAGE1")
    # Instances at inference: "watershed" (the paper: distance-map markers, watershed in the stage-1 foreground),
    # "components" (connected components of the stage-1 foreground alone: what a stage-1-only model can do) or
    # "distance" (foreground = distance > THRESHOLD, no segmentation U-Net: the distance network alone, e.g. the one
    # Mask R-CNN+ uses).
    ts.INFERENCE = "watershed"
    # Stage-1 loss: BCE_WEIGHT * binary cross-entropy + DICE_WEIGHT * (1 - soft Dice). The paper: 0.5 and 1.
    ts.BCE_WEIGHT = 0.5
    ts.DICE_WEIGHT = 1.0
    # Stage-2 loss: DISTANCE_WEIGHT * mean squared error to the normalised distance map; the distance U-Net's output
    # is "linear" (the paper) or "sigmoid".
    ts.DISTANCE_WEIGHT = 1.0
    ts.DISTANCE_ACTIVATION = "linear"
    # Foreground: stage-1 probability > THRESHOLD; CONNECTIVITY of its components (1 = 4-, 2 = 8-neighbours).
    ts.THRESHOLD = 0.5
    ts.CONNECTIVITY = 1
    # Gaussian smoothing of the distance map: SIGMA px if > 0, else SIGMA_FACTOR * the equivalent radius
    # sqrt(mean area / pi) of the stage-1 foreground components of the image (the paper sets sigma from the mean
    # nucleus size).
    ts.SIGMA = 0.0
    ts.SIGMA_FACTOR = 0.5
    # Markers: local maxima of the smoothed distance at least MIN_DISTANCE px apart (0 = half the equivalent radius)
    # and above PEAK_THRESHOLD; a foreground component without any gets one at its maximum.
    ts.MIN_DISTANCE = 0
    ts.PEAK_THRESHOLD = 0.1
    # Remove objects smaller than MIN_SIZE px (the paper: 20), fill holes.
    ts.MIN_SIZE = 20
    ts.FILL_HOLES = True
    # Grow every object by DILATE px after the watershed (0 = the paper; e.g. INPUT.ERODE_RADIUS + 1 undoes the
    # erosion of the stage-1 target).
    ts.DILATE = 0.0


def _add_panoptic_fusion_config(cfg: CN) -> None:
    """Panoptic Mask R-CNN with semantic feature fusion and the dual-modal mask generator (Liu et al., IJCAI 2019;
    nuclei_d2/modeling/panoptic_fusion.py, gcn.py, dual_modal_mask_head.py; docs/panoptic_fusion.md)."""
    pf = cfg.MODEL.PANOPTIC_FUSION = CN()
    # Auxiliary GCN semantic branch on the shared FPN, trained with L_semseg1 (training only; inference skips it).
    pf.SEMANTIC_BRANCH = True
    # Semantic feature fusion in the instance branch: masks pasted over F_0 (from FUSION_IN_FEATURE), L_semseg2.
    # Needs MODEL.ROI_HEADS.NAME "PanopticFusionROIHeads".
    pf.FEATURE_FUSION = True
    # Backbone level F_0 is computed from (1x1 conv to 2 channels, bilinear upsampling to input size).
    pf.FUSION_IN_FEATURE = "p2"
    # Training order of the positive proposals' masks when pasting (later ones overwrite): "iou" (ascending IoU with
    # the matched nucleus: the best-aligned proposal is written last) or "sampled" (Detectron2's random order).
    pf.PASTE_ORDER = "iou"
    # Loss weights of L_semseg1 (semantic branch) and L_semseg2 (fused map); the paper sums all losses unweighted.
    pf.SEM_SEG1_WEIGHT = 1.0
    pf.SEM_SEG2_WEIGHT = 1.0
    # Target value of padded pixels (ignored by both semantic losses).
    pf.IGNORE_VALUE = 255
    pf.GCN = CN()
    # FPN levels decoded by the GCN branch (finest first after sorting by stride).
    pf.GCN.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    # k of the k x k large-kernel GCN blocks (built from k x 1 and 1 x k convs); the paper uses 5.
    pf.GCN.KERNEL_SIZE = 5
    # Channels of the GCN score maps; 2 = straight to class scores as in Peng et al. 2017 (more adds a 1x1 predictor).
    pf.GCN.CHANNELS = 2
    dm = cfg.MODEL.ROI_MASK_HEAD.DUAL_MODAL = CN()
    # Dual-modal mask generator (MODEL.ROI_MASK_HEAD.NAME "DualModalMaskHead"); it also uses ROI_MASK_HEAD.CONV_DIM
    # (paper 256) for the trunk, conv1, conv3 and the pixel-shuffled map, and ROI_MASK_HEAD.NORM for its 3x3 convs.
    # 3x3 convs shared by both paths (paper: 3).
    dm.NUM_SHARED_CONV = 3
    # Channels of conv2, the FC layer's input (paper: 128).
    dm.FC_CONV_DIM = 128
    # Output side / RoI side = pixel-shuffle factor (paper: 2, 14x14 -> 28x28; conv4 has CONV_DIM * UPSCALE^2).
    dm.UPSCALE = 2


def _add_maskrcnn_plus_config(cfg: CN) -> None:
    """Mask R-CNN+ (Bancher et al., MICCAI COMPAY 2021): five-channel input, distance network, staged schedule
    (nuclei_d2/modeling/maskrcnn_plus.py, two_stage_unet.py, submodel.py; nuclei_d2/engine/staged_schedule.py;
    docs/maskrcnn_plus.md)."""
    mp = cfg.MODEL.MASKRCNN_PLUS = CN()
    # Learned 1x1 convolution from the 3 + len(INPUT.EXTRA_CHANNELS) normalised input channels to PROJECTION_CHANNELS
    # (3: a standard, pretrainable backbone). False: the backbone takes the channels directly (with no extra channels
    # this is the baseline Mask R-CNN).
    mp.INPUT_PROJECTION = True
    mp.PROJECTION_CHANNELS = 3
    # Initial 1x1 weights: "rgb" (identity on R, G, B and 0 for the extra channels: a pretrained backbone starts where
    # it was) or "random" (PyTorch's default).
    mp.PROJECTION_INIT = "rgb"
    # Where the "distance" input channel comes from at inference: "unet" (predicted by the distance network, the
    # paper) or "input" (used as the mapper/caller gives it).
    mp.DISTANCE_SOURCE = "unet"
    # In training, the "distance" channel is the ground truth's distance map (False, the paper) or the distance
    # network's prediction (True: the map the model sees at test time).
    mp.TRAIN_ON_PREDICTED_DISTANCE = False
    # The distance network (nuclei_d2/modeling/submodel.py): a TwoStageUNet config (CONFIG, e.g.
    # configs/distance_unet.yaml or a two-stage U-Net stage-2 config; relative paths are tried from the working
    # directory, then from the repository) and its trained weights (WEIGHTS: model_final.pth of a train_net run of
    # that config); always frozen. Empty WEIGHTS: the distance network must come from MODEL.WEIGHTS (a trained
    # Mask R-CNN+ checkpoint holds it); when set, they win over MODEL.WEIGHTS' distance_unet.* entries.
    _submodel_node(mp, "DISTANCE_NET")
    # Run inference even though no trained distance U-Net was loaded (tests and timing only: the channel is noise).
    mp.ALLOW_UNTRAINED_DISTANCE = False

    # ---- staged training (Hollandi et al. 2020 scheme; nuclei_d2/engine/staged_schedule.py) -------------------------
    st = cfg.SOLVER.STAGED = CN()
    # Switch trainable parameter groups and lr multipliers at stage boundaries (a trainer hook; resumable).
    st.ENABLED = False
    # Length of each stage in iterations; the last stage runs until SOLVER.MAX_ITER.
    st.STAGE_ITERS = [5000, 5000, 5000, 5000]
    # Per stage, what trains: group aliases ("all", "input", "backbone", "stem", "res2".."res5", "fpn", "rpn",
    # "roi_heads", "heads" = fpn + rpn + roi_heads) or regular expressions searched in parameter names. Defaults: the
    # paper's (1) input conv + heads, (2) everything, (3) last backbone stages + heads, (4) heads.
    st.TRAINABLE = [["input", "heads"], ["all"], ["res4", "res5", "heads"], ["heads"]]
    # Learning-rate multiplier of each stage, on top of SOLVER.BASE_LR and the LR scheduler (the paper: 2, 1, 0.5, 0.1
    # with Adam at 1e-4).
    st.LR_MULTIPLIERS = [2.0, 1.0, 0.5, 0.1]


def _add_tta_config(cfg: CN) -> None:
    """Test-time augmentation, ensembles and their merging (nuclei_d2/inference/tta.py, ensemble.py,
    merge.py, test_time.py; docs/maskrcnn_plus.md). Used by NucleiTrainer.test (--eval-only) for any model."""
    # Detectron2 defines TEST.AUG.ENABLED (used here: run the transforms below) and MIN_SIZES / MAX_SIZE / FLIP (for
    # its own multi-scale TTA, not used by nuclei-d2).
    # Test-time copies: "identity", "hflip", "vflip", "rot90", "rot180", "rot270", "hue" (shift HUE_DELTA) or
    # "hue:<delta>", "scale:<factor>" (predict at factor x the model's own input size), composed with "+" (e.g.
    # "hflip+rot90", "hflip+scale:1.333"). The paper: original, flips and a hue-shifted copy.
    cfg.TEST.AUG.TRANSFORMS = ["identity", "hflip", "vflip", "hue"]
    # Hue shift of "hue", as a fraction of the colour circle (0.05 = 18 degrees; the amount is our choice).
    cfg.TEST.AUG.HUE_DELTA = 0.05
    e = cfg.TEST.ENSEMBLE = CN()
    # Further models evaluated with the main one (MODEL.WEIGHTS), e.g. organ-fold models: weights files, and their
    # config files (none: the main config; one: shared; else one per weights file). A member may take fewer input
    # channels than the main config provides (they are selected by name).
    e.WEIGHTS = []
    e.CONFIGS = []
    # Per-member KEY VALUE overrides applied after the member's config: none, or one list per weights file, e.g.
    # [["MODEL.TWO_STAGE.STAGE1.CONFIG", "stage1.yaml"], []] (a member whose sub-model needs its own config file).
    e.OPTS = []
    m = cfg.TEST.MERGE = CN()
    # How predictions are merged: "probs" averages the probability maps of dense models (U-Nets, BRP-Net) and
    # post-processes the mean once; "shared" averages, across dense models of different methods, the maps of one
    # meaning (DenseSegmentor.map_meanings, e.g. the NB U-Net's inside and the two-stage U-Net's eroded foreground) and
    # post-processes with the first model; "instances" merges nuclei (the keys below); "auto" takes "probs" when every
    # member is a dense model with the same maps, else "instances".
    m.MODE = "auto"
    # Two predictions of different members (model x copy) are the same nucleus when their mask IoU >= IOU_THRESHOLD.
    m.IOU_THRESHOLD = 0.5
    # Keep a nucleus only if at least MIN_VOTES members predicted it (2 drops singletons; clamped to the number of
    # members).
    m.MIN_VOTES = 2
    # The merged mask: mean of the members' soft masks >= MASK_THRESHOLD; the score is the members' mean score.
    m.MASK_THRESHOLD = 0.5
    # Merge the mask probabilities of R-CNN models (False: their binarised masks; other models always give binary).
    m.SOFT_MASKS = True


def _add_brpnet_config(cfg: CN) -> None:
    """BRP-Net (Chen et al., MICCAI 2020): TAFE, boundary-assisted proposals, proposal-wise refinement
    (nuclei_d2/modeling/brpnet; docs/brpnet.md)."""
    b = cfg.MODEL.BRPNET = CN()
    # Which part trains: 1 = TAFE (targets "foreground" + "boundary"), 2 = the two refinement networks (TAFE from
    # STAGE1).
    b.TRAIN_STAGE = 1
    # Inference output: "refine" (full BRP-Net) or "proposals" (TAFE + post-processing alone).
    b.INFERENCE = "refine"
    # Stage 2's TAFE: the tafe.* tensors of stage 1's model_final.pth (WEIGHTS), trained with CONFIG (named in the
    # error when the file is missing), frozen unless FROZEN False (nuclei_d2/modeling/submodel.py).
    _submodel_node(b, "STAGE1")
    # ---- TAFE ------------------------------------------------------------------------------------------------------
    d = b.DENSENET = CN()
    # DenseNet-121 (stride-1 stem, no max-pool): growth 32, layers per block 6/12/24/16 (torchvision's; the paper's
    # supplement text says 6/12/18/24, which gives other channel counts), 64 stem channels, bottleneck 4 x growth.
    d.GROWTH_RATE = 32
    d.BLOCK_CONFIG = [6, 12, 24, 16]
    d.NUM_INIT_FEATURES = 64
    d.BN_SIZE = 4
    # torchvision densenet121 state dict to start from (e.g. densenet121-a639ec97.pth; never downloaded); "" = random.
    b.DENSENET_WEIGHTS = ""
    # Channels of the lateral 1x1 convs, task-specific encoders and decoders (the paper: 256).
    b.WIDTH = 256
    # Feature fusion modules between the semantic and boundary encoders; deep supervision on every encoder level.
    b.FUSION = True
    b.DEEP_SUPERVISION = True
    # Stage-1 loss per output: smooth truncated loss (truncation gamma TRUNCATION) + DICE_WEIGHT x soft Dice;
    # deep-supervision outputs weighted by DS_WEIGHT.
    b.TRUNCATION = 0.3
    b.DICE_WEIGHT = 0.5
    b.DS_WEIGHT = 1.0
    # ---- proposals -------------------------------------------------------------------------------------------------
    # Seeds: semantic - boundary probability > PROPOSAL_THRESHOLD; components (CONNECTIVITY 1 = 4-, 2 = 8-neighbours)
    # under PROPOSAL_MIN_SIZE px dropped; each grown back by PROPOSAL_DILATION px (the paper's Fig. 5a varies it).
    b.PROPOSAL_THRESHOLD = 0.5
    b.PROPOSAL_DILATION = 2.0
    b.PROPOSAL_MIN_SIZE = 10
    b.CONNECTIVITY = 1
    # Not in the paper: split each seed component by a marker watershed of its distance transform (smoothed by
    # PROPOSAL_SPLIT_SIGMA_FACTOR x the mean seed radius, markers >= PROPOSAL_SPLIT_MIN_DISTANCE px apart, 0 = half
    # the mean seed radius) where a faint predicted boundary leaves touching nuclei in one seed.
    b.PROPOSAL_SPLIT = False
    b.PROPOSAL_SPLIT_SIGMA_FACTOR = 0.25
    b.PROPOSAL_SPLIT_MIN_DISTANCE = 0
    # ---- proposal-wise refinement (stage 2) --------------------------------------------------------------------------
    # Square crop around each proposal with MARGIN px; crops up to SMALL_SIZE px go to the small net at SMALL_SIZE^2,
    # larger ones to the large net at LARGE_SIZE^2 (the paper: 12, 48, 176). Inputs zeroed outside the proposal
    # dilated by MASK_DILATION px.
    b.MARGIN = 12
    b.SMALL_SIZE = 48
    b.LARGE_SIZE = 176
    b.MASK_DILATION = 2.0
    # Refinement nets (the paper's Fig. 4): dense blocks with these growth rates, REFINE_LAYERS 3x3 convs each.
    b.REFINE_GROWTHS = [16, 32, 64, 128]
    b.REFINE_LAYERS = 4
    # Training label: the ground-truth nucleus a proposal overlaps with IoU > MATCH_IOU, else all background.
    b.MATCH_IOU = 0.5
    # Focal loss (gamma; alpha < 0 = no class weighting).
    b.FOCAL_GAMMA = 2.0
    b.FOCAL_ALPHA = -1.0
    # Random subset of proposals per training image (bounds CPU memory; 0 = all).
    b.MAX_PROPOSALS_PER_IMAGE = 64
    # Proposal dilation radii drawn per training image in stage 2 (empty = PROPOSAL_DILATION). Not in the paper.
    b.TRAIN_DILATIONS = []
    # Inference: refined probability > REFINE_THRESHOLD (overlaps go to the higher probability), REFINE_BATCH
    # patches per forward, objects under MIN_SIZE px dropped.
    b.REFINE_THRESHOLD = 0.5
    b.REFINE_BATCH = 64
    b.MIN_SIZE = 10
    # ---- the paper's schedule (SOLVER.LR_SCHEDULER_NAME "CosineWarmRestarts"; nuclei_d2/solver/lr_scheduler.py)
    wr = cfg.SOLVER.WARM_RESTARTS = CN()
    # Cosine annealing with warm restarts: first period FIRST_PERIOD iterations, each next PERIOD_MULT times longer,
    # each restart at PEAK_DECAY x the previous peak (the paper: 40 epochs, 2, 0.5). Floor: SOLVER.BASE_LR_END.
    wr.FIRST_PERIOD = 1000
    wr.PERIOD_MULT = 2.0
    wr.PEAK_DECAY = 0.5


def _add_inference_config(cfg: CN) -> None:
    """Tiled prediction on images and whole slides (nuclei_d2/inference/predictor.py, stitching.py, run.py,
    tools/predict.py; docs/inference.md). Command-line flags of tools/predict.py override these."""
    i = cfg.INFERENCE = CN()
    # Square tile side in pixels (at the analysed level). Images larger than this are predicted tile by tile; memory
    # follows BATCH_SIZE tiles, not the image. Dense models also tile inside each tile by MODEL.TILING.
    i.TILE_SIZE = 1024
    # Pixels shared by neighbouring tiles. A nucleus is kept from the tile that owns its bounding-box centre and must
    # not touch that tile's inner edges; nuclei up to OVERLAP - 2 px across are then found once and whole.
    i.OVERLAP = 64
    # Tiles per forward pass.
    i.BATCH_SIZE = 2
    # Drop predictions scoring below this before writing.
    i.SCORE_THRESHOLD = 0.0
    # If > 0, also remove near-duplicates across tiles (mask IoU >= DEDUPE_IOU, lower score dropped); only in
    # Predictor.predict (in-memory results), not in the streaming writers.
    i.DEDUPE_IOU = 0.0
    # tqdm progress bar (tiles/s) per image.
    i.PROGRESS = True
    # Outputs written by default: any of "geojson" (QuPath), "coco" (COCO results JSON), "labels" (label map),
    # "csv" (per-nucleus measurements), "overlay" (PNG).
    i.OUTPUTS = ["geojson", "csv"]
    # What runs the model's networks (nuclei_d2/export, docs/export.md): "torch" (eager PyTorch, MODEL.WEIGHTS),
    # "onnxruntime" or "torchscript" (the files of an export folder, EXPORTED, made by tools/export_model.py; they
    # replace MODEL.WEIGHTS, which may then be ""). Tiling, test-time augmentation and post-processing are the same
    # code whatever runs the networks.
    i.RUNTIME = "torch"
    # The export folder (export.json beside one .onnx or .pt file per network) when RUNTIME is not "torch".
    i.EXPORTED = ""
    # Threads of an ONNX Runtime session (intra-op); 0 = torch.get_num_threads(), so both runtimes compare at equal
    # threads.
    i.RUNTIME_THREADS = 0
