"""Detectron2's Mask R-CNN RoI heads with optional GBW class weights on two of their losses.

- :class:`GBWStandardROIHeads` (``MODEL.ROI_HEADS.NAME``): Detectron2's ``StandardROIHeads`` whose box
  predictor is :class:`GBWFastRCNNOutputLayers`.
- :class:`GBWFastRCNNOutputLayers`: ``FastRCNNOutputLayers`` whose classification cross-entropy over the
  K thing classes + background (samples: the sampled proposals of the batch) is weighted by GBW
  (``MODEL.GBW.BOX_CLS``); the box regression loss is Detectron2's.
- :class:`GBWMaskRCNNConvUpsampleHead` (``MODEL.ROI_MASK_HEAD.NAME``): Detectron2's FCN mask head whose
  per-pixel binary cross-entropy is weighted by GBW with the mask pixels grouped by the class of their
  proposal (``MODEL.GBW.MASK``).

With GBW off each loss is exactly Detectron2's.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.roi_heads import (
    ROI_HEADS_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
    FastRCNNOutputLayers,
    MaskRCNNConvUpsampleHead,
    StandardROIHeads,
)
from detectron2.modeling.roi_heads.mask_head import mask_rcnn_inference
from detectron2.structures import Instances

from ..gbw import GBWCrossEntropyLoss, GBWRegressionLoss
from .meta_arch import _gbw_loss_kwargs

__all__ = [
    "GBWFastRCNNOutputLayers",
    "GBWMaskRCNNConvUpsampleHead",
    "GBWStandardROIHeads",
    "class_weighted_mask_loss",
]


class GBWFastRCNNOutputLayers(FastRCNNOutputLayers):
    """Detectron2's box predictor with a GBW-weighted classification loss."""

    @configurable
    def __init__(self, *, cls_loss: GBWCrossEntropyLoss, **kwargs):
        """
        Args:
            cls_loss: cross-entropy over ``num_classes + 1`` classes (background last, Detectron2's
                order); with GBW off it equals Detectron2's ``loss_cls``.
            kwargs: arguments of ``FastRCNNOutputLayers``.
        """
        super().__init__(**kwargs)
        if cls_loss.num_classes != self.num_classes + 1:
            raise ValueError(
                f"the box classifier has {self.num_classes} classes + background but its GBW loss has "
                f"{cls_loss.num_classes} classes"
            )
        self.cls_loss = cls_loss

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: ShapeSpec) -> Dict:
        ret = super().from_config(cfg, input_shape)
        node = cfg.MODEL.GBW.BOX_CLS
        ret["cls_loss"] = GBWCrossEntropyLoss(
            cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1, mode=node.MODE, **_gbw_loss_kwargs(node)
        )
        return ret

    def losses(self, predictions: Tuple[torch.Tensor, torch.Tensor], proposals: List[Instances]) -> Dict:
        """Detectron2's ``loss_cls`` and ``loss_box_reg``; with GBW on, ``loss_cls`` is the GBW-weighted
        mean cross-entropy of the N sampled proposals (scores N x (K + 1), ``gt_classes`` N)."""
        losses = super().losses(predictions, proposals)
        if not self.cls_loss.enabled:
            return losses
        scores = predictions[0]
        gt_classes = cat([p.gt_classes for p in proposals], dim=0) if proposals else scores.new_zeros(0).long()
        # The proposals as the pixels of a [1, K + 1, N, 1] "image": the dense loss's mean over pixels is
        # Detectron2's mean over proposals.
        loss = self.cls_loss(scores.t().unsqueeze(0).unsqueeze(-1), gt_classes.view(1, -1, 1))
        losses["loss_cls"] = loss * self.loss_weight.get("loss_cls", 1.0)
        return losses


@ROI_HEADS_REGISTRY.register()
class GBWStandardROIHeads(StandardROIHeads):
    """``StandardROIHeads`` with :class:`GBWFastRCNNOutputLayers` as its box predictor."""

    @classmethod
    def _init_box_head(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Dict:
        ret = super()._init_box_head(cfg, input_shape)
        # Detectron2 builds its FastRCNNOutputLayers there; the same layers with the GBW loss replace it.
        ret["box_predictor"] = GBWFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret


def class_weighted_mask_loss(
    pred_mask_logits: torch.Tensor, instances: List[Instances], class_weighting: GBWRegressionLoss
) -> torch.Tensor:
    """Detectron2's Mask R-CNN loss (binary cross-entropy of each positive proposal's mask of its ground
    truth class against the ground-truth mask cropped to the proposal, mean over all R x M x M mask
    pixels) with each pixel's term multiplied by the GBW weight of its proposal's class.

    The weights come from ``class_weighting`` (a GBW MSE loss over the K thing classes): the gradient of
    the binary cross-entropy with respect to a logit z is ``sigmoid(z) - t``, which is the gradient of
    ``(p - t / 2)^2`` with respect to p at ``p = sigmoid(z) / 2``; the GBW MSE norms of
    ``(sigmoid(z) / 2, t / 2)`` are therefore the BCE norms with respect to the logits, and the call sets
    ``class_weighting.last_weights`` (its MSE value is not used).

    Args:
        pred_mask_logits: R x K x M x M (class-specific) or R x 1 x M x M mask logits of the R positive
            proposals of the batch.
        instances: per image, the positive proposals with ``proposal_boxes``, ``gt_classes``, ``gt_masks``.
        class_weighting: ``GBWRegressionLoss`` over the K thing classes, ``kind="mse"``.
    Returns:
        scalar loss (0, connected to the logits, when there is no positive proposal).
    """
    side = pred_mask_logits.size(2)
    device = pred_mask_logits.device
    with_masks = [x for x in instances if len(x) > 0]
    gt_classes = cat([x.gt_classes.long() for x in with_masks]) if with_masks else torch.zeros(0, dtype=torch.long)
    gt_classes = gt_classes.to(device)
    gt_masks = (
        cat([x.gt_masks.crop_and_resize(x.proposal_boxes.tensor, side).to(device) for x in with_masks])
        if with_masks
        else torch.zeros((0, side, side), dtype=torch.bool, device=device)
    )
    if pred_mask_logits.size(1) == 1:
        logits = pred_mask_logits[:, 0]
    else:
        logits = pred_mask_logits[torch.arange(gt_classes.numel(), device=device), gt_classes]
    targets = gt_masks.float()
    pixel_class = gt_classes.view(-1, 1, 1).expand_as(targets).contiguous()
    # Every process makes this call, with or without positives, so that GBW's all-reduce matches.
    halves = logits.detach().float().sigmoid().unsqueeze(1) / 2
    class_weighting(halves, targets.unsqueeze(1) / 2, pixel_class, torch.ones_like(targets))
    if targets.numel() == 0:
        return pred_mask_logits.sum() * 0.0
    pixel_losses = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    return (pixel_losses * class_weighting.last_weights.take(pixel_class)).mean()


@ROI_MASK_HEAD_REGISTRY.register()
class GBWMaskRCNNConvUpsampleHead(MaskRCNNConvUpsampleHead):
    """Detectron2's FCN mask head; with GBW on, its loss is :func:`class_weighted_mask_loss`."""

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, class_weighting: GBWRegressionLoss, **kwargs):
        """
        Args:
            class_weighting: GBW loss over the K thing classes (``kind="mse"``) whose weights scale the
                mask loss (see :func:`class_weighted_mask_loss`); when disabled the loss is Detectron2's.
            input_shape, kwargs: arguments of ``MaskRCNNConvUpsampleHead``.
        """
        super().__init__(input_shape, **kwargs)
        self.class_weighting = class_weighting

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: ShapeSpec) -> Dict:
        ret = super().from_config(cfg, input_shape)
        ret["class_weighting"] = GBWRegressionLoss(
            cfg.MODEL.ROI_HEADS.NUM_CLASSES, kind="mse", normalizer="mean", **_gbw_loss_kwargs(cfg.MODEL.GBW.MASK)
        )
        return ret

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        """Detectron2's convolutions, deconvolution and predictor (the head is an ``nn.Sequential``, of
        which ``class_weighting`` is a member but no layer): R x C x S x S -> R x K x 2S x 2S logits."""
        for layer in self:
            if layer is not self.class_weighting:
                x = layer(x)
        return x

    def forward(self, x: torch.Tensor, instances: List[Instances]):
        """Training: ``{"loss_mask"}``; inference: ``instances`` with ``pred_masks`` (as Detectron2's)."""
        if not self.class_weighting.enabled:
            return super().forward(x, instances)
        x = self.layers(x)
        if self.training:
            return {"loss_mask": class_weighted_mask_loss(x, instances, self.class_weighting) * self.loss_weight}
        mask_rcnn_inference(x, instances)
        return instances
