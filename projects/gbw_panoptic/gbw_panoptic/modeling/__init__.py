"""The model: backbones, DAFormer heads, Panoptic-DeepLab post-processing and the meta-architecture.

Importing this package registers ``GBWPanopticSegmentor``, ``HRDASegmentor`` and
``GBWTopDownPanopticSegmentor`` (META_ARCH_REGISTRY), ``GBWStandardROIHeads`` (ROI_HEADS_REGISTRY),
``GBWMaskRCNNConvUpsampleHead`` (ROI_MASK_HEAD_REGISTRY),
``build_mit_backbone`` and ``build_resnet_deeplab_stem_backbone`` (BACKBONE_REGISTRY),
``DAFormerSemSegHead`` (SEM_SEG_HEADS_REGISTRY) and ``DAFormerInstanceHead`` (INS_EMBED_BRANCHES_REGISTRY).
"""
from .backbone import MixVisionTransformer, build_mit_backbone, build_resnet_deeplab_stem_backbone
from .heads import DAFormerDecoder, DAFormerInstanceHead, DAFormerSemSegHead, build_ins_embed_head
from .meta_arch import GBWPanopticSegmentor
from .hrda import HRDASegmentor
from .inference import inference_dense_predictions, load_inference_model
from .post_processing import find_instance_centers, panoptic_segmentation, panoptic_to_segments
from .roi_heads import GBWFastRCNNOutputLayers, GBWMaskRCNNConvUpsampleHead, GBWStandardROIHeads
from .top_down import GBWTopDownPanopticSegmentor

__all__ = [
    "GBWPanopticSegmentor",
    "HRDASegmentor",
    "GBWTopDownPanopticSegmentor",
    "GBWStandardROIHeads",
    "GBWFastRCNNOutputLayers",
    "GBWMaskRCNNConvUpsampleHead",
    "MixVisionTransformer",
    "build_mit_backbone",
    "build_resnet_deeplab_stem_backbone",
    "DAFormerDecoder",
    "DAFormerSemSegHead",
    "DAFormerInstanceHead",
    "build_ins_embed_head",
    "inference_dense_predictions",
    "load_inference_model",
    "find_instance_centers",
    "panoptic_segmentation",
    "panoptic_to_segments",
]
