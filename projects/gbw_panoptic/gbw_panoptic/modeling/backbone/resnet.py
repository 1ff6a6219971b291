"""ResNet-18 ... ResNet-152 with the DeepLab stem (three 3x3 convolutions), as a Detectron2 backbone.

Depths 50/101/152 are Detectron2's ``build_resnet_deeplab_backbone`` (DeepLab project); depths 18
and 34 (basic blocks, for small CPU configs) use the same stem and Detectron2's ``ResNet`` stages.
Outputs ``res2`` ... ``res5`` at strides 4/8/16/32 (unless ``RES4_DILATION`` / ``RES5_DILATION``
dilate them).
"""
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.resnet import BasicStem, ResNet
from detectron2.projects.deeplab.resnet import DeepLabStem, build_resnet_deeplab_backbone

__all__ = ["build_resnet_deeplab_stem_backbone"]

_BASIC_BLOCK_DEPTHS = (18, 34)


@BACKBONE_REGISTRY.register()
def build_resnet_deeplab_stem_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """ResNet of depth ``MODEL.RESNETS.DEPTH`` (18, 34, 50, 101, 152) with ``MODEL.RESNETS.STEM_TYPE``
    ("deeplab" or "basic") stem, ``MODEL.RESNETS.OUT_FEATURES`` outputs, frozen up to
    ``MODEL.BACKBONE.FREEZE_AT``."""
    depth = cfg.MODEL.RESNETS.DEPTH
    if depth not in _BASIC_BLOCK_DEPTHS:
        return build_resnet_deeplab_backbone(cfg, input_shape)
    norm = cfg.MODEL.RESNETS.NORM
    stem_channels = cfg.MODEL.RESNETS.STEM_OUT_CHANNELS
    if stem_channels != 64 or cfg.MODEL.RESNETS.RES2_OUT_CHANNELS != 64:
        raise ValueError(
            f"ResNet-{depth} needs MODEL.RESNETS.STEM_OUT_CHANNELS = RES2_OUT_CHANNELS = 64, got "
            f"{stem_channels} and {cfg.MODEL.RESNETS.RES2_OUT_CHANNELS}"
        )
    if cfg.MODEL.RESNETS.RES4_DILATION != 1 or cfg.MODEL.RESNETS.RES5_DILATION != 1:
        raise ValueError(f"ResNet-{depth} (basic blocks) supports no dilation; set RES4/RES5_DILATION to 1")
    stem_type = cfg.MODEL.RESNETS.STEM_TYPE
    stem_classes = {"deeplab": DeepLabStem, "basic": BasicStem}
    if stem_type not in stem_classes:
        raise ValueError(f"MODEL.RESNETS.STEM_TYPE must be one of {sorted(stem_classes)}, got {stem_type!r}")
    stem = stem_classes[stem_type](in_channels=input_shape.channels, out_channels=stem_channels, norm=norm)
    stages = ResNet.make_default_stages(depth, norm=norm)
    return ResNet(stem, stages, out_features=cfg.MODEL.RESNETS.OUT_FEATURES).freeze(
        cfg.MODEL.BACKBONE.FREEZE_AT
    )
