"""``add_nuclei_config``: every configuration key nuclei-d2 adds to Detectron2's, with its default.

It only *adds* keys. Values that make Detectron2's existing keys suit nuclei (small anchors, thousands of
detections per image, input normalisation that trains from random init) live in
``configs/Base-Nuclei-RCNN-FPN.yaml``, where a user sees them next to the model they configure.

Call order (as in ``tools/train_net.py``): ``get_cfg()`` -> ``add_nuclei_config(cfg)`` -> ``merge_from_file`` ->
``merge_from_list`` -> ``freeze()``.
"""

from __future__ import annotations

from detectron2.config import CfgNode as CN


def add_nuclei_config(cfg: CN) -> CN:
    """Add nuclei-d2's keys (with defaults) to ``cfg`` in place and return it. Safe to call twice."""
    if "SYNTHETIC" in cfg.DATASETS:  # already added
        return cfg
    _add_data_config(cfg)
    _add_augment_and_target_config(cfg)
    _add_solver_config(cfg)
    _add_test_config(cfg)
    return cfg


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
    # ---- extra input channels and dense targets -------------------------------------------------------------------
    # Channels stacked after RGB in the image tensor (C = 3 + len), computed after augmentation, scaled to 0-255 like
    # RGB (so PIXEL_MEAN / PIXEL_STD need 3 + len entries): "hematoxylin" (Ruifrok colour deconvolution of the
    # augmented RGB), "distance" (normalised per-nucleus distance map of the ground truth in training; zeros at
    # inference, where the model must predict it).
    cfg.INPUT.EXTRA_CHANNELS = []
    # Dense targets emitted under dataset_dict["targets"] (name -> tensor) whenever a label map is available: any of
    # "foreground", "ternary", "boundary", "distance", "distance_raw", "eroded", "edge_weight".
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


def _add_solver_config(cfg: CN) -> None:
    # "SGD" (Detectron2's default), "Adam" or "AdamW".
    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.BETAS = (0.9, 0.999)


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
