"""Data layer: readers, converters, dataset registration, the nuclei mapper and its targets."""

from ..utils.io import read_image_rgb, read_label_map  # noqa: F401
from .datasets import register_datasets_from_config, register_nuclei_dataset  # noqa: F401  (+ built-in names)
from .mapper import NucleiDatasetMapper  # noqa: F401
from .synthetic import make_synthetic_tile, register_synthetic_datasets  # noqa: F401

register_synthetic_datasets()
