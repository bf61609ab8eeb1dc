"""nuclei-d2: published nuclei instance-segmentation methods for H&E histopathology on Detectron2.

``import nuclei_d2`` registers every dataset, meta-architecture, head and backbone the package defines.
"""

from . import data, modeling  # noqa: F401  (importing them registers datasets and models)
from .config import add_nuclei_config  # noqa: F401
from .version import __version__  # noqa: F401
