"""Backbones registered in Detectron2's ``BACKBONE_REGISTRY``: MiT (SegFormer encoder) and ResNet."""
from .mit import MIT_VARIANTS, MixVisionTransformer, build_mit_backbone, convert_mit_state_dict, load_mit_weights
from .resnet import build_resnet_deeplab_stem_backbone

__all__ = [
    "MIT_VARIANTS",
    "MixVisionTransformer",
    "build_mit_backbone",
    "build_resnet_deeplab_stem_backbone",
    "convert_mit_state_dict",
    "load_mit_weights",
]
