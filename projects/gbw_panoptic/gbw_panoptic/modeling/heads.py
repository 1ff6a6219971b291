"""DAFormer context-aware fusion decoders: the semantic head and the center/offset instance head.

Both heads share the decoder of DAFormer (Hoyer et al., CVPR 2022) that EDAPS uses for each task:

    res2..res5 --1x1 embed (EMBED_DIM)--> upsample to stride 4 --concat--> depthwise-separable ASPP
    (dilation 1: 1x1 conv; 6/12/18: 3x3 depthwise + 1x1, each with norm + ReLU, no image pooling)
    --> 3x3 conv bottleneck (norm + ReLU) --> dropout --> 1x1 predictor(s)

The heads only predict; the meta-architecture computes the (GBW-weighted) losses. The semantic head
is registered in ``SEM_SEG_HEADS_REGISTRY``, the instance head in Panoptic-DeepLab's
``INS_EMBED_BRANCHES_REGISTRY``.
"""
from typing import Callable, Dict, List, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import Conv2d, DepthwiseSeparableConv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.projects.panoptic_deeplab.panoptic_seg import INS_EMBED_BRANCHES_REGISTRY
from torch import nn

__all__ = ["DAFormerDecoder", "DAFormerSemSegHead", "DAFormerInstanceHead", "build_ins_embed_head"]


class DAFormerDecoder(nn.Module):
    """Multi-level fusion decoder; returns fused features at the resolution of the first input level."""

    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        in_features: List[str],
        embed_dim: int,
        fusion_dilations: List[int],
        norm: Union[str, Callable],
        fusion_bottleneck: bool = True,
    ):
        """
        Args:
            input_shape: backbone output shapes.
            in_features: backbone levels to fuse, finest first (e.g. res2 ... res5).
            embed_dim: channels of the per-level embeddings and of the fused output.
            fusion_dilations: dilations of the ASPP branches (1 = a 1x1 convolution).
            norm: Detectron2 norm name ("BN", "SyncBN", "GN", ...) or a callable.
            fusion_bottleneck: follow the branches with the 3x3 bottleneck; False returns the single
                branch of ``fusion_dilations`` directly (``[1]``: one 1x1 convolution, the fusion of
                HRDA's scale-attention decoder).
        """
        super().__init__()
        missing = [name for name in in_features if name not in input_shape]
        if missing:
            raise ValueError(f"head IN_FEATURES {missing} not produced by the backbone ({sorted(input_shape)})")
        self.in_features = list(in_features)
        self.embed = nn.ModuleDict(
            {name: Conv2d(input_shape[name].channels, embed_dim, kernel_size=1) for name in self.in_features}
        )
        fused_channels = embed_dim * len(self.in_features)
        branches = []
        for dilation in fusion_dilations:
            if dilation == 1:
                branches.append(
                    Conv2d(
                        fused_channels,
                        embed_dim,
                        kernel_size=1,
                        bias=not norm,
                        norm=get_norm(norm, embed_dim),
                        activation=F.relu,
                    )
                )
            else:
                branches.append(
                    DepthwiseSeparableConv2d(
                        fused_channels,
                        embed_dim,
                        kernel_size=3,
                        padding=dilation,
                        dilation=dilation,
                        norm1=norm,
                        activation1=F.relu,
                        norm2=norm,
                        activation2=F.relu,
                    )
                )
        self.aspp = nn.ModuleList(branches)
        if not fusion_bottleneck and len(branches) != 1:
            raise ValueError(f"a decoder without bottleneck needs one fusion branch, got dilations {fusion_dilations}")
        self.bottleneck = nn.Identity() if not fusion_bottleneck else Conv2d(
            embed_dim * len(branches),
            embed_dim,
            kernel_size=3,
            padding=1,
            bias=not norm,
            norm=get_norm(norm, embed_dim),
            activation=F.relu,
        )
        for module in [*self.embed.values(), *branches, self.bottleneck]:
            if isinstance(module, Conv2d):
                weight_init.c2_msra_fill(module)

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """features: {name: B x C_i x H_i x W_i} -> B x EMBED_DIM x H_0 x W_0 (first level's size)."""
        output_size = features[self.in_features[0]].shape[-2:]
        embedded = [
            F.interpolate(self.embed[name](features[name]), size=output_size, mode="bilinear", align_corners=False)
            for name in self.in_features
        ]
        fused = torch.cat(embedded, dim=1)
        return self.bottleneck(torch.cat([branch(fused) for branch in self.aspp], dim=1))


def _decoder_config(head_cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Dict:
    """Constructor arguments shared by both heads, from ``MODEL.SEM_SEG_HEAD`` or ``MODEL.INS_EMBED_HEAD``."""
    return {
        "input_shape": input_shape,
        "in_features": list(head_cfg.IN_FEATURES),
        "embed_dim": head_cfg.EMBED_DIM,
        "fusion_dilations": list(head_cfg.FUSION_DILATIONS),
        "norm": head_cfg.NORM,
        "dropout": head_cfg.DROPOUT,
    }


class _DAFormerHead(nn.Module):
    """Decoder + dropout + one 1x1 predictor with ``out_channels`` outputs."""

    def __init__(self, input_shape: Dict[str, ShapeSpec], *, dropout: float, out_channels: int, **decoder_kwargs):
        """
        Args:
            input_shape: backbone output shapes.
            dropout: dropout probability before the predictor.
            out_channels: predictor outputs.
            decoder_kwargs: :class:`DAFormerDecoder` arguments (in_features, embed_dim,
                fusion_dilations, norm).
        """
        super().__init__()
        self.decoder = DAFormerDecoder(input_shape, **decoder_kwargs)
        embed_dim = decoder_kwargs["embed_dim"]
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.predictor = Conv2d(embed_dim, out_channels, kernel_size=1)
        nn.init.normal_(self.predictor.weight, 0, 0.001)
        nn.init.constant_(self.predictor.bias, 0)
        self.common_stride = input_shape[decoder_kwargs["in_features"][0]].stride

    def predict(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """-> B x out_channels x H/common_stride x W/common_stride."""
        return self.predictor(self.dropout(self.decoder(features)))


@SEM_SEG_HEADS_REGISTRY.register()
class DAFormerSemSegHead(_DAFormerHead):
    """Semantic head: class logits at stride ``common_stride`` (4 for res2)."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, num_classes: int, ignore_value: int = 255, **kwargs):
        """
        Args:
            num_classes: number of semantic classes C.
            ignore_value: label of ignored pixels (used by the model's loss).
            kwargs: decoder arguments (in_features, embed_dim, fusion_dilations, norm, dropout).
        """
        super().__init__(input_shape, out_channels=num_classes, **kwargs)
        self.num_classes = num_classes
        self.ignore_value = ignore_value

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Dict:
        return {
            **_decoder_config(cfg.MODEL.SEM_SEG_HEAD, input_shape),
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        }

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """features -> B x C x H/4 x W/4 logits."""
        return self.predict(features)


@INS_EMBED_BRANCHES_REGISTRY.register()
class DAFormerInstanceHead(_DAFormerHead):
    """Instance head: center heatmap (1 channel) and offsets (dy, dx; 2 channels) at stride 4.

    Offsets are returned in input-image pixels (the raw prediction times ``common_stride``), so
    that upsampling them to the input resolution needs no rescaling.
    """

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], **kwargs):
        """kwargs: decoder arguments (in_features, embed_dim, fusion_dilations, norm, dropout)."""
        super().__init__(input_shape, out_channels=3, **kwargs)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Dict:
        return _decoder_config(cfg.MODEL.INS_EMBED_HEAD, input_shape)

    def forward(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """features -> (center_heatmap B x 1 x H/4 x W/4, offsets B x 2 x H/4 x W/4 in pixels)."""
        prediction = self.predict(features)
        return prediction[:, :1], prediction[:, 1:] * self.common_stride


def build_ins_embed_head(cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """The instance head named by ``MODEL.INS_EMBED_HEAD.NAME``."""
    return INS_EMBED_BRANCHES_REGISTRY.get(cfg.MODEL.INS_EMBED_HEAD.NAME)(cfg, input_shape)
