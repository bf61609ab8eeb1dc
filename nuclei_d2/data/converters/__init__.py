"""Converters from the published nuclei dataset formats to one COCO instance-segmentation JSON, and back.

Every converter returns the COCO document and, given ``out``, writes it atomically; ``tools/convert_dataset.py`` is
the command line over these functions. Conventions: docs/data.md and :mod:`.common`.
"""

from .builtin import prepare_builtin
from .common import CocoBuilder, ConversionError, collapse_categories, select_split, subset_coco, write_coco
from .dsb2018 import convert_dsb2018, read_dsb2018_masks
from .label_maps import convert_label_maps, read_any_label
from .mat import convert_mat, read_mat_label
from .monuseg_xml import convert_monuseg_xml, parse_aperio_xml, rasterize_polygons, xml_to_label_map
from .pannuke import convert_pannuke, pannuke_label_map
from .to_labels import coco_to_label_maps, load_coco_json

__all__ = [
    "CocoBuilder",
    "ConversionError",
    "coco_to_label_maps",
    "collapse_categories",
    "convert_dsb2018",
    "convert_label_maps",
    "convert_mat",
    "convert_monuseg_xml",
    "convert_pannuke",
    "load_coco_json",
    "pannuke_label_map",
    "parse_aperio_xml",
    "prepare_builtin",
    "rasterize_polygons",
    "read_any_label",
    "read_dsb2018_masks",
    "read_mat_label",
    "select_split",
    "subset_coco",
    "write_coco",
    "xml_to_label_map",
]
