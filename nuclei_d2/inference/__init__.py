"""Inference: the predictor and output writers."""

from .merge import merge_instances  # noqa: F401  (instance-level merging: TTA, ensembles)
from .outputs import CocoResultsWriter, CsvWriter, GeoJSONWriter, LabelMapWriter, OverlayWriter, load_geojson  # noqa: F401
from .predictor import NucleiPredictor, Predictor, TileResult  # noqa: F401
from .run import FileResult, RunOptions, RunSummary, collect_inputs, predict_file, run_batch  # noqa: F401
from .slide import ImageSource, NoTissueError, open_image, tissue_mask  # noqa: F401
from .stitching import TileGrid, owned_selection, stitch  # noqa: F401
from .test_time import TestTimeWrapper, build_test_time_wrapper  # noqa: F401
from .tta import TTATransform, parse_tta_transforms  # noqa: F401
from .visualize import draw_outlines, save_overlay  # noqa: F401
