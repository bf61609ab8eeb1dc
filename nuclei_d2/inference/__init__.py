"""Inference: the predictor and output writers."""

from .predictor import NucleiPredictor  # noqa: F401
from .visualize import draw_outlines, save_overlay  # noqa: F401
