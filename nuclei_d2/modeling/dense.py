"""The dense (U-Net family) meta-architectures; importing this module registers them in Detectron2's registries.

* ``NucleusBoundaryUNet`` — Cui et al. 2019 (:mod:`nuclei_d2.modeling.nb_unet`);
* ``TwoStageUNet`` — Mahbod et al. 2019 (:mod:`nuclei_d2.modeling.two_stage_unet`);
* ``build_unet_backbone`` — the configurable :class:`~nuclei_d2.modeling.unet.UNet` as a backbone;
* :class:`~nuclei_d2.modeling.dense_base.DenseSegmentor` — their shared base (batching, normalisation, tiled
  inference, post-processing to ``Instances``). See docs/unet_family.md.
"""

from .dense_base import DenseSegmentor, dense_base_kwargs
from .nb_unet import NucleusBoundaryUNet
from .two_stage_unet import TwoStageUNet
from .unet import UNet, UNetBackbone, build_unet, build_unet_backbone

__all__ = ["DenseSegmentor", "NucleusBoundaryUNet", "TwoStageUNet", "UNet", "UNetBackbone", "build_unet",
           "build_unet_backbone", "dense_base_kwargs"]
