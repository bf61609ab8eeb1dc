"""Training and setup: the nuclei trainer and config checks used by the tools."""

from .defaults import RANDOM_INIT_OPTS, ConfigError, leave_process_group, setup_cfg  # noqa: F401
from .trainer import NucleiTrainer, build_nuclei_evaluators, build_optimizer  # noqa: F401
