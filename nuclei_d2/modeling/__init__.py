"""Meta-architectures, heads and backbones, registered in Detectron2's registries on import.

- ``rcnn``: ``NucleiRCNN``, the Mask R-CNN baseline; every R-CNN here hands over its nuclei as crops through it
- ``maskrcnn_plus``: Mask R-CNN+ (five-channel input; its distance network is the two-stage U-Net's, composed
  through ``submodel``)
- ``panoptic_fusion`` / ``gcn`` / ``dual_modal_mask_head``: panoptic semantic-fusion Mask R-CNN (Liu et al. 2019)
- ``brpnet``: BRP-Net (Chen et al. 2020)
- ``classical_watershed``: the no-training floor (deconvolution, Otsu, distance watershed)
- ``dense``: nucleus-boundary U-Net (Cui et al. 2019) and two-stage U-Net (Mahbod et al. 2019)
"""

from . import (  # noqa: F401  (importing registers)
    brpnet,
    classical_watershed,
    dual_modal_mask_head,
    gcn,
    maskrcnn_plus,
    panoptic_fusion,
    rcnn,
)
from .build import build_nuclei_model, to_memory_format  # noqa: F401
from .dense import NucleusBoundaryUNet, TwoStageUNet  # noqa: F401  (also registers build_unet_backbone)
