"""Nuclei datasets in Detectron2's catalogs: :func:`register_nuclei_dataset` for any converted COCO JSON,
``cfg.DATASETS.REGISTER`` for config-only use, and built-in names for the standard protocols (registered here, at
import, without reading any file). See docs/data.md.
"""

from .builtin import BUILTIN_DATASETS, BuiltinDataset, builtin_json_path, datasets_root, register_all_builtin
from .protocols import KUMAR_SPLITS, KUMAR_TRAIN_ORGANS, MONUSEG2018_TILE_ORGAN, MONUSEG2018_TRAIN_ORGANS
from .register import (
    DatasetLoadError,
    NucleiMetadata,
    get_image_organs,
    load_nuclei_json,
    parse_register_entry,
    register_datasets_from_config,
    register_nuclei_dataset,
    unregister_nuclei_dataset,
)

__all__ = [
    "BUILTIN_DATASETS",
    "BuiltinDataset",
    "DatasetLoadError",
    "KUMAR_SPLITS",
    "KUMAR_TRAIN_ORGANS",
    "MONUSEG2018_TILE_ORGAN",
    "MONUSEG2018_TRAIN_ORGANS",
    "NucleiMetadata",
    "builtin_json_path",
    "datasets_root",
    "get_image_organs",
    "load_nuclei_json",
    "parse_register_entry",
    "register_all_builtin",
    "register_datasets_from_config",
    "register_nuclei_dataset",
    "unregister_nuclei_dataset",
]

register_all_builtin()
