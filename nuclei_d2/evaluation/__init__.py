"""Nucleus instance-segmentation evaluation: metrics, the Detectron2 evaluator, and offline scoring of folders.

See ``docs/metrics.md`` for every metric's definition, edge cases and references.
"""

from .evaluator import NucleiEvaluator, load_ground_truth
from .metrics import (
    COUNT_KEYS,
    HIGHER_IS_BETTER,
    METRIC_KEYS,
    ContingencyTable,
    aggregate_metrics,
    compute_metrics,
    contingency_table,
    match_max_iou,
    metrics_from_counts,
)
from .offline import (
    LabelMapSource,
    compare_predictions,
    open_label_source,
    score_sources,
)
from .report import flat_results, format_summary_table, summarize, write_records_csv, write_results_json

__all__ = [
    "COUNT_KEYS",
    "HIGHER_IS_BETTER",
    "METRIC_KEYS",
    "ContingencyTable",
    "LabelMapSource",
    "NucleiEvaluator",
    "aggregate_metrics",
    "compare_predictions",
    "compute_metrics",
    "contingency_table",
    "flat_results",
    "format_summary_table",
    "load_ground_truth",
    "match_max_iou",
    "metrics_from_counts",
    "open_label_source",
    "score_sources",
    "summarize",
    "write_records_csv",
    "write_results_json",
]
