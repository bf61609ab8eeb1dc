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
    _add_solver_config(cfg)
    _add_test_config(cfg)
    return cfg


def _add_data_config(cfg: CN) -> None:
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
