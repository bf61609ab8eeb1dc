"""BRP-Net (Chen, Li, Wang, Heng, "Boundary-assisted Region Proposal Networks for Nucleus Segmentation",
MICCAI 2020): TAFE (stage 1), boundary-assisted proposals, proposal-wise refinement (stage 2). See docs/brpnet.md.

Importing this package registers the ``BRPNet`` meta-architecture.
"""

from .densenet import DenseNetEncoder
from .meta_arch import BRPNet
from .proposals import assign_proposal_labels, crop_resize, extract_proposals, paste_back, proposal_boxes
from .refine import RefineNet, assemble_refined, build_patches, sigmoid_focal_loss
from .tafe import TAFE, FeatureFusionModule, ShallowDecoder, TaskSpecificEncoder, smooth_truncated_loss, soft_dice_loss

__all__ = [
    "BRPNet", "DenseNetEncoder", "FeatureFusionModule", "RefineNet",
    "ShallowDecoder", "TAFE", "TaskSpecificEncoder", "assemble_refined", "assign_proposal_labels",
    "build_patches", "crop_resize", "extract_proposals",
    "paste_back", "proposal_boxes", "sigmoid_focal_loss", "smooth_truncated_loss", "soft_dice_loss",
]
