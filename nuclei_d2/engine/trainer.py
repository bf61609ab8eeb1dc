"""``NucleiTrainer``: Detectron2's ``DefaultTrainer`` with the nuclei mapper, evaluators, optimizers and CPU DDP."""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from typing import Any

import torch
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, TrainerBase, create_ddp_model
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, DatasetEvaluators
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from detectron2.utils.logger import setup_logger

from ..checkpoint import NucleiCheckpointer
from ..data.mapper import NucleiDatasetMapper
from .autocast import build_train_loop
from .time_budget import TimeBudgetHook, TrainingClock, build_time_budget

__all__ = ["NucleiTrainer", "build_nuclei_evaluators", "build_optimizer", "write_config"]

logger = logging.getLogger(__name__)


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD (Detectron2's), Adam or AdamW per ``SOLVER.OPTIMIZER``, with Detectron2's per-parameter lr/wd rules."""
    name = cfg.SOLVER.OPTIMIZER.lower()
    if name == "sgd":
        return DefaultTrainer.build_optimizer(cfg, model)
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    optim_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(name)
    if optim_cls is None:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of SGD, Adam, AdamW; got {cfg.SOLVER.OPTIMIZER!r}")
    return maybe_add_gradient_clipping(cfg, optim_cls)(params, lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS))


def build_nuclei_evaluators(cfg, dataset_name: str, output_folder: str | None = None) -> DatasetEvaluator:
    """The evaluators ``TEST.EVALUATORS`` asks for: "nuclei" (AJI, PQ, Dice, ...) and/or "coco" (segm AP)."""
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    evaluators: list[DatasetEvaluator] = []
    for name in cfg.TEST.EVALUATORS:
        if name == "nuclei":
            from ..evaluation import NucleiEvaluator

            ev = cfg.TEST.NUCLEI_EVAL
            evaluators.append(NucleiEvaluator(dataset_name, output_dir=output_folder, iou_threshold=ev.IOU_THRESHOLD,
                                              hausdorff=ev.HAUSDORFF, score_threshold=ev.SCORE_THRESHOLD))
        elif name == "coco":
            evaluators.append(COCOEvaluator(dataset_name, tasks=("segm",), output_dir=output_folder,
                                            max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE))
        else:
            raise ValueError(f"TEST.EVALUATORS: unknown evaluator {name!r}; use 'nuclei' and/or 'coco'")
    if not evaluators:
        raise ValueError("TEST.EVALUATORS is empty: nothing to evaluate with")
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


def write_config(cfg, path: str | os.PathLike) -> str:
    """Write ``cfg`` as YAML to ``path`` atomically.

    ``OUTPUT_DIR/config.yaml`` beside the weights is what rebuilds the model they belong to
    (``--config-file OUTPUT_DIR/config.yaml MODEL.WEIGHTS OUTPUT_DIR/model_final.pth``).
    """
    from ..utils.io import atomic_write

    text = cfg.dump()
    return str(atomic_write(path, lambda tmp: tmp.write_text(text)))


class NucleiTrainer(DefaultTrainer):
    """``DefaultTrainer`` for nuclei: :class:`NucleiDatasetMapper` for train and test, nuclei evaluators, Adam(W).

    It also builds DistributedDataParallel without ``device_ids`` on CPU, so ``--num-gpus N`` runs N CPU processes
    on the gloo backend (Detectron2's own trainer passes a GPU id and fails there).
    """

    def __init__(self, cfg, config_file: str | None = None):  # noqa: D107  (DefaultTrainer.__init__ but for DDP)
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        if cfg.SOLVER.COMPILE.ENABLED:  # the dense networks, in place, for the training steps only (eval stays eager)
            from .compile import compile_for_training

            compile_for_training(model, cfg.SOLVER.COMPILE.MODE, cfg.SOLVER.COMPILE.DYNAMIC)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cpu = next(model.parameters()).device.type == "cpu"
        # SOLVER.STAGED freezes parameter groups after DDP is built: DDP must then tolerate parameters without grads.
        model = create_ddp_model(model, broadcast_buffers=False, find_unused_parameters=bool(cfg.SOLVER.STAGED.ENABLED),
                                 **({"device_ids": None} if on_cpu else {}))
        self._trainer = build_train_loop(cfg, model, data_loader, optimizer)  # SOLVER.AMP: bf16 autocast on CPU
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # SOLVER.TIME_BUDGET: the schedule runs on a training clock, and training ends when it is spent
        budget = build_time_budget(cfg, self.scheduler)
        self.training_clock: TrainingClock | None = None
        if budget is not None:
            self.training_clock, self.scheduler = budget
        # weights_only loading and the fit check (nuclei_d2/checkpoint.py); config_file is named in its errors
        self.checkpointer = NucleiCheckpointer.from_config(model, cfg, cfg.OUTPUT_DIR, config_file=config_file,
                                                           trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        if comm.is_main_process():  # every trained model gets its config beside it (train_net, the demo, ...)
            write_config(cfg, os.path.join(cfg.OUTPUT_DIR, "config.yaml"))
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg):
        """Detectron2's ``build_model`` with ``MODEL.CHANNELS_LAST`` applied (:func:`build_nuclei_model`)."""
        from ..modeling.build import build_nuclei_model

        model = build_nuclei_model(cfg)
        logging.getLogger(__name__).info("Model:\n%s", model)
        return model

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=NucleiDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name: str):
        return build_detection_test_loader(cfg, dataset_name, mapper=NucleiDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        """Detectron2's schedulers, plus BRP-Net's cosine annealing with warm restarts ("CosineWarmRestarts")."""
        from ..solver.lr_scheduler import SCHEDULER_NAME, build_brpnet_lr_scheduler

        if cfg.SOLVER.LR_SCHEDULER_NAME == SCHEDULER_NAME:
            return build_brpnet_lr_scheduler(cfg, optimizer)
        return super().build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_folder: str | None = None) -> DatasetEvaluator:
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "nuclei")
        if evaluator_type not in ("nuclei", "coco"):
            raise ValueError(f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; "
                             "NucleiTrainer evaluates nuclei datasets only")
        return build_nuclei_evaluators(cfg, dataset_name, output_folder)

    def build_hooks(self):
        # SOLVER.STAGED (Mask R-CNN+ four-stage schedule): switch trainable groups / lr multipliers by iteration.
        from .staged_schedule import build_staged_schedule_hook

        hooks = super().build_hooks()
        staged = build_staged_schedule_hook(self.cfg)
        if staged is not None:
            hooks.insert(1, staged)  # after the iteration timer, before LR scheduling, checkpoints and writers
        if self.training_clock is not None:  # times the step only; the next LR is set from it
            hooks.insert(1, TimeBudgetHook(self.training_clock))
        # SOLVER.EMA: average the weights after each step, before the checkpointer (which saves the average) and
        # evaluation (which then also runs on the average)
        from .ema import add_ema_hooks

        return add_ema_hooks(self, hooks)

    def train(self):
        """``DefaultTrainer.train``, with Detectron2's loop also ending when a hook lowers ``self.max_iter``.

        ``TrainerBase.train`` iterates over a fixed ``range``; :class:`TimeBudgetHook` (``SOLVER.TIME_BUDGET``) needs
        to end training early and still run the end-of-training hooks (final checkpoint and evaluation).
        """
        loop_logger = logging.getLogger("detectron2.engine.train_loop")  # the messages of Detectron2's loop, as there
        loop_logger.info("Starting training from iteration %d", self.start_iter)
        self.iter = self.start_iter
        with EventStorage(self.start_iter) as self.storage:
            try:
                self.before_train()
                while self.iter < self.max_iter:
                    self.before_step()
                    self.run_step()
                    self.after_step()
                    self.iter += 1  # == max_iter at the end, as Detectron2's loop leaves it
            except Exception:
                loop_logger.exception("Exception during training:")
                raise
            finally:
                self.after_train()
        if len(self.cfg.TEST.EXPECTED_RESULTS) and comm.is_main_process():
            from detectron2.evaluation import verify_results

            assert hasattr(self, "_last_eval_results"), "No evaluation results obtained during training!"
            verify_results(self.cfg, self._last_eval_results)
            return self._last_eval_results
        return None

    @classmethod
    def test(cls, cfg, model, evaluators=None) -> OrderedDict[str, Any]:
        from ..inference.test_time import build_test_time_wrapper

        model = build_test_time_wrapper(cfg, model)  # TEST.AUG / TEST.ENSEMBLE; the model itself when both are off
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process():
            from detectron2.utils.file_io import PathManager

            from ..utils.io import write_json_atomic

            PathManager.mkdirs(cfg.OUTPUT_DIR)
            write_json_atomic(os.path.join(cfg.OUTPUT_DIR, "metrics_final.json"), results, indent=2)
        return results
