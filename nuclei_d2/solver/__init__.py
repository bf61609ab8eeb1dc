"""Learning-rate schedules the trainer builds by ``SOLVER.LR_SCHEDULER_NAME`` (as ``detectron2.solver``)."""

from .lr_scheduler import SCHEDULER_NAME, CosineWarmRestartsParamScheduler, build_brpnet_lr_scheduler  # noqa: F401
