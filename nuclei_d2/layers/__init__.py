"""Array and tensor operations shared by models, targets and inference: the sliding-window tiling loop, its vote
weight and morphology kernels.

The bottom layer of the package (docs/architecture.md): it imports nothing from ``nuclei_d2`` above ``utils``.
"""

from .morphology import disk, keep_largest_pieces  # noqa: F401
from .tiling import TilingParams, edge_weight_map, patch_weight, tile_positions, tile_predict, tile_windows  # noqa: F401
from .wrappers import unwrap_model  # noqa: F401
