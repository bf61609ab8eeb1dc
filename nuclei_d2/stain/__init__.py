"""Stain handling for H&E: Macenko / Vahadane normalisation, reference choice, colour deconvolution.

See ``docs/stain_and_targets.md`` for the choices made and measured timings.
"""

from .deconvolution import (  # noqa: F401
    HEMATOXYLIN_SCALE,
    RUIFROK_HE,
    color_deconvolution,
    complete_stain_matrix,
    hematoxylin_channel,
    od_to_rgb,
    rgb_to_od,
)
from .normalizer import (  # noqa: F401
    StainEstimate,
    StainEstimationError,
    StainNormalizationWarning,
    StainNormalizer,
    estimate_stains,
)
from .reference import ReferenceChoice, choose_reference, rgb_histograms  # noqa: F401
