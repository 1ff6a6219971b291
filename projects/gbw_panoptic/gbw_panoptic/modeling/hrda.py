"""HRDA (Hoyer et al., ECCV 2022): multi-resolution training with a learned scale attention.

``HRDASegmentor`` wraps the model of :class:`GBWPanopticSegmentor` (same encoder, same heads for both
resolutions)::

    training crop (H x W, e.g. 1024 x 1024)
      |-- resize x CONTEXT_SCALE (0.5) --> context crop --> encoder --> heads --> context outputs
      |                                                           \-> attention heads --> sigmoid = a
      |-- resize x DETAIL_SCALE (1.0), random DETAIL_CROP_SIZE box (512 x 512, corners multiples of
          CROP_COORD_DIVISIBLE) --> detail crop --> encoder --> heads --> detail outputs

    fused = up(a) * detail (inserted at the box, 0 elsewhere) + up((1 - a) * context)

with ``a`` set to 0 outside the box (the context alone predicts there) and ``up`` the bilinear
upsampling by DETAIL_SCALE / CONTEXT_SCALE to the detail grid (stride 4 of the detail image). The class
logits have a class-wise attention (``ATTENTION_CLASSWISE``); with the instance head, the center heatmap
and the offsets (converted to input pixels first) are fused alike with a second attention head (one map
for the center, one for both offset components).

Losses: each loss of :class:`GBWPanopticSegmentor` (``loss_sem_seg`` and, with the instance head,
``loss_center``, ``loss_offset``) on the fused outputs over the whole crop, times
``1 - DETAIL_LOSS_WEIGHT``, and its detail counterpart (``loss_sem_seg_detail``, ...) on the detail
outputs and the box's targets, times ``DETAIL_LOSS_WEIGHT`` (0.1). The detail losses are copies of the
fused ones (``MODEL.GBW.*``) and compute their own class weights (logged as ``gbw/<pass>/sem_seg_detail/...``).

Inference (:meth:`HRDASegmentor.predict_dense`, also the EMA teacher's pseudo-label prediction under
DACS): the context is the whole input at CONTEXT_SCALE, the detail branch covers the whole input with
sliding DETAIL_CROP_SIZE windows (stride half a window with DETAIL_SLIDE_OVERLAP) whose outputs are
averaged, and the attention is not masked. At test time the model runs on sliding
``TEST_WINDOW_SIZE`` windows of the image (stride ``TEST_WINDOW_STRIDE``), averaged likewise.

The feature distance of DACS compares the context features (:meth:`HRDASegmentor.extract_features`),
as HRDA's ``feature_scale=0.5``.
"""
import copy
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ..utils.padding import pad_to
from .heads import _DAFormerHead, _decoder_config
from .meta_arch import DENSE_OUTPUTS, GBWPanopticSegmentor

__all__ = [
    "CropBox",
    "random_crop_box",
    "scale_box",
    "crop",
    "sliding_windows",
    "average_windows",
    "fuse_scales",
    "ScaleAttentionHead",
    "HRDASegmentor",
]


class CropBox(NamedTuple):
    """A rectangle of pixels ``[top, bottom) x [left, right)``."""

    top: int
    bottom: int
    left: int
    right: int


def random_crop_box(
    height: int, width: int, crop_size: Sequence[int], divisible: int = 1, generator: Optional[torch.Generator] = None
) -> CropBox:
    """A uniformly drawn ``crop_size`` (h, w) box inside a ``height`` x ``width`` image whose top and left
    are multiples of ``divisible`` (so that the box maps to whole cells of every coarser grid).

    Every position from 0 to the last multiple of ``divisible`` that keeps the box inside is drawn with the
    same probability. A crop larger than the image along an axis covers the whole axis.
    """
    crop_height, crop_width = (min(crop_size[0], height), min(crop_size[1], width))
    top = int(torch.randint(0, (height - crop_height) // divisible + 1, (1,), generator=generator)) * divisible
    left = int(torch.randint(0, (width - crop_width) // divisible + 1, (1,), generator=generator)) * divisible
    return CropBox(top, top + crop_height, left, left + crop_width)


def scale_box(box: CropBox, factor: int) -> CropBox:
    """``box`` in a grid ``factor`` times coarser; every coordinate must be a multiple of ``factor``."""
    if any(value % factor for value in box):
        raise ValueError(f"crop box {tuple(box)} does not map exactly to a grid {factor} times coarser")
    return CropBox(*(value // factor for value in box))


def crop(tensor: torch.Tensor, box: CropBox) -> torch.Tensor:
    """``tensor[..., top:bottom, left:right]``."""
    return tensor[..., box.top : box.bottom, box.left : box.right]


def sliding_windows(height: int, width: int, window: Sequence[int], stride: Sequence[int]) -> List[CropBox]:
    """Boxes of ``window`` (h, w) every ``stride`` (h, w) pixels covering a ``height`` x ``width`` image,
    row by row; the last row and column are shifted back inside the image, and a window larger than the
    image covers it whole (one box per axis)."""
    if min(window) <= 0 or min(stride) <= 0:
        raise ValueError(f"sliding window {list(window)} and stride {list(stride)} must be positive")
    rows = max(height - window[0] + stride[0] - 1, 0) // stride[0] + 1
    cols = max(width - window[1] + stride[1] - 1, 0) // stride[1] + 1
    boxes = []
    for row in range(rows):
        bottom = min(row * stride[0] + window[0], height)
        for col in range(cols):
            right = min(col * stride[1] + window[1], width)
            boxes.append(CropBox(max(bottom - window[0], 0), bottom, max(right - window[1], 0), right))
    return boxes


def average_windows(
    window_outputs: torch.Tensor, boxes: Sequence[CropBox], size: Tuple[int, int], downsample: int = 1
) -> torch.Tensor:
    """Average of overlapping window predictions.

    Args:
        window_outputs: ``(N * B) x C x h x w``, window-major (the B images of window 0 first), each
            window's prediction on a grid ``downsample`` times coarser than its box.
        boxes: the N windows' boxes in input pixels (multiples of ``downsample``).
        size: (H, W) of the output grid (input size / ``downsample``).
    Returns:
        ``B x C x H x W``, each cell the mean of the windows covering it.
    """
    batch = window_outputs.shape[0] // len(boxes)
    summed = window_outputs.new_zeros((batch, window_outputs.shape[1], *size))
    count = window_outputs.new_zeros((1, 1, *size))
    for index, box in enumerate(boxes):
        cell = scale_box(box, downsample)
        crop(summed, cell).add_(window_outputs[index * batch : (index + 1) * batch])
        crop(count, cell).add_(1)
    if (count == 0).any():
        raise ValueError(f"the windows {[tuple(b) for b in boxes]} do not cover the {size} output grid")
    return summed / count


def fuse_scales(
    context_logits: torch.Tensor,
    attention: torch.Tensor,
    detail_logits: torch.Tensor,
    upsample: int,
    detail_box: Optional[CropBox] = None,
) -> torch.Tensor:
    """HRDA's fusion of the context and detail predictions with the scale attention.

    Args:
        context_logits: ``B x C x h x w`` on the context grid.
        attention: ``B x C x h x w`` or ``B x 1 x h x w`` in [0, 1] (sigmoid of the attention head),
            the weight of the detail prediction.
        detail_logits: ``B x C x h_d x w_d`` on the detail grid, ``upsample`` times finer than the
            context grid: the whole grid (``detail_box`` None) or the box ``detail_box`` of it.
        upsample: detail grid / context grid resolution ratio (DETAIL_SCALE / CONTEXT_SCALE).
        detail_box: box of ``detail_logits`` in detail-grid cells (multiples of ``upsample``); the
            attention is zero outside it.
    Returns:
        ``B x C x (h * upsample) x (w * upsample)``:
        ``up(a) * detail (0 outside the box) + up((1 - a) * context)``, ``up`` bilinear.
    """
    if detail_box is not None:
        mask = torch.zeros_like(attention[:, :1])
        crop(mask, scale_box(detail_box, upsample)).fill_(1)
        attention = attention * mask
    size = (context_logits.shape[-2] * upsample, context_logits.shape[-1] * upsample)
    context_part = F.interpolate((1 - attention) * context_logits, size=size, mode="bilinear", align_corners=False)
    attention = F.interpolate(attention, size=size, mode="bilinear", align_corners=False)
    if detail_box is None:
        if detail_logits.shape[-2:] != size:
            raise ValueError(f"detail logits of size {tuple(detail_logits.shape[-2:])}, expected {size}")
        return attention * detail_logits + context_part
    inserted = torch.zeros_like(context_part)
    crop(inserted, detail_box).copy_(detail_logits)
    return attention * inserted + context_part


class ScaleAttentionHead(_DAFormerHead):
    """HRDA's scale attention: a DAFormer decoder whose fusion is one 1x1 convolution (norm + ReLU)
    instead of the ASPP, dropout, then a 1x1 predictor of one attention logit per class (or one for
    all classes); applied to the context features."""

    def __init__(self, input_shape: Dict[str, ShapeSpec], *, out_channels: int, **decoder_kwargs):
        """
        Args:
            input_shape: backbone output shapes.
            out_channels: C (class-wise attention) or 1.
            decoder_kwargs: in_features, embed_dim, norm, dropout.
        """
        super().__init__(
            input_shape, out_channels=out_channels, fusion_dilations=[1], fusion_bottleneck=False, **decoder_kwargs
        )

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """features -> attention in [0, 1], ``B x out_channels x H/4 x W/4``."""
        return torch.sigmoid(self.predict(features))


@META_ARCH_REGISTRY.register()
class HRDASegmentor(GBWPanopticSegmentor):
    """HRDA's context and detail crops, scale attention and detail losses around the model of
    :class:`GBWPanopticSegmentor` (see the module docstring); selected by ``MODEL.META_ARCHITECTURE
    "HRDASegmentor"``, configured by ``MODEL.HRDA.*``.

    With the instance head, the center heatmap and the offsets are fused like the class logits, with
    their own attention (one map for the center, one for both offset components) from a second attention
    head, and get detail losses too; offsets are converted to input pixels before the fusion.
    """

    @configurable
    def __init__(
        self,
        *,
        scale_attention: nn.Module,
        instance_attention: Optional[nn.Module],
        detail_losses: Dict[str, nn.Module],
        context_scale: float,
        detail_scale: float,
        detail_crop_size: Sequence[int],
        crop_coord_divisible: int,
        detail_loss_weight: float,
        detail_slide_inference: bool,
        detail_slide_overlap: bool,
        test_window_size: Sequence[int],
        test_window_stride: Sequence[int],
        **kwargs,
    ):
        """
        Args:
            scale_attention: context features -> attention of the class logits, ``B x (C or 1) x h x w``
                in [0, 1].
            instance_attention: context features -> attention ``B x 2 x h x w`` of the center and the
                offsets; None without instance head.
            detail_losses: GBW losses of the detail predictions by output (``"sem_seg"`` and, with the
                instance head, ``"center"``, ``"offset"``), each with its own class weights.
            context_scale, detail_scale: resize factors of the two crops (0.5, 1.0).
            detail_crop_size: (h, w) of the detail crop in detail-scale pixels.
            crop_coord_divisible: the detail box's corners are multiples of it (detail pixels); it must
                be a multiple of the output stride times ``detail_scale / context_scale``.
            detail_loss_weight: weight of the detail losses; the fused losses get ``1 - detail_loss_weight``.
            detail_slide_inference: at inference, cover the detail image with sliding detail crops
                (False: one pass over the whole detail image).
            detail_slide_overlap: stride of those windows half a crop (False: a whole crop).
            test_window_size, test_window_stride: (h, w) of the sliding windows of test-time inference
                in input pixels; empty: the whole image in one pass.
            kwargs: :class:`GBWPanopticSegmentor` arguments.
        """
        super().__init__(**kwargs)
        if self.instance_on != (instance_attention is not None):
            raise ValueError("instance_attention must be given exactly when the model has an instance head")
        if set(detail_losses) != set(super().gbw_losses()):
            raise ValueError(f"detail_losses must cover {sorted(super().gbw_losses())}, got {sorted(detail_losses)}")
        if not 0 < context_scale < detail_scale:
            raise ValueError(
                f"MODEL.HRDA.CONTEXT_SCALE={context_scale} must be > 0 and below DETAIL_SCALE={detail_scale}"
            )
        if self.instance_on and detail_scale != 1.0:
            raise ValueError(
                f"MODEL.HRDA.DETAIL_SCALE={detail_scale}: with the instance head the detail crop must be at the "
                "input resolution (1.0), where the center and offset targets are"
            )
        ratio = detail_scale / context_scale
        if ratio != int(ratio):
            raise ValueError(f"DETAIL_SCALE / CONTEXT_SCALE = {ratio} must be an integer")
        self.output_stride = self.sem_seg_head.common_stride
        if crop_coord_divisible % (self.output_stride * int(ratio)):
            raise ValueError(
                f"MODEL.HRDA.CROP_COORD_DIVISIBLE={crop_coord_divisible} must be a multiple of the output stride "
                f"{self.output_stride} x DETAIL_SCALE / CONTEXT_SCALE = {self.output_stride * int(ratio)}, so that "
                "the detail crop maps to whole cells of the context prediction"
            )
        if any(side % crop_coord_divisible for side in detail_crop_size):
            raise ValueError(
                f"MODEL.HRDA.DETAIL_CROP_SIZE={list(detail_crop_size)} must be multiples of CROP_COORD_DIVISIBLE="
                f"{crop_coord_divisible}"
            )
        if not 0.0 <= detail_loss_weight < 1.0:
            raise ValueError(f"MODEL.HRDA.DETAIL_LOSS_WEIGHT={detail_loss_weight} must lie in [0, 1)")
        if len(test_window_size) not in (0, 2) or len(test_window_stride) != len(test_window_size):
            raise ValueError(
                f"MODEL.HRDA.TEST_WINDOW_SIZE={list(test_window_size)} and TEST_WINDOW_STRIDE="
                f"{list(test_window_stride)} must both be (h, w), or both empty for whole-image inference"
            )
        self.scale_attention = scale_attention
        self.instance_attention = instance_attention
        self.detail_losses = nn.ModuleDict(detail_losses)
        self.context_scale = context_scale
        self.detail_scale = detail_scale
        self.upsample = int(ratio)
        self.detail_crop_size = tuple(detail_crop_size)
        self.crop_coord_divisible = crop_coord_divisible
        self.detail_loss_weight = detail_loss_weight
        self.detail_slide_inference = detail_slide_inference
        self.detail_slide_stride = tuple(s // 2 for s in detail_crop_size) if detail_slide_overlap else tuple(
            detail_crop_size
        )
        self.test_window_size = tuple(test_window_size)
        self.test_window_stride = tuple(test_window_stride)
        # Size multiple of the input so that both crops and every window map to whole output cells.
        self.size_divisibility = max(self.size_divisibility, int(crop_coord_divisible / detail_scale))

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict:
        ret = super().from_config(cfg)
        hrda = cfg.MODEL.HRDA
        head_cfg = cfg.MODEL.SEM_SEG_HEAD
        decoder = _decoder_config(head_cfg, ret["backbone"].output_shape())
        decoder.pop("fusion_dilations")
        decoder["embed_dim"] = hrda.ATTENTION_EMBED_DIM
        instance_on = cfg.MODEL.INS_EMBED_HEAD.ENABLED
        # Detail losses: copies of the fused losses as built from MODEL.GBW.* (own class weights).
        detail_losses = {"sem_seg": copy.deepcopy(ret["sem_seg_loss"])}
        if instance_on:
            detail_losses.update(center=copy.deepcopy(ret["center_loss"]), offset=copy.deepcopy(ret["offset_loss"]))
        ret.update(
            scale_attention=ScaleAttentionHead(
                out_channels=head_cfg.NUM_CLASSES if hrda.ATTENTION_CLASSWISE else 1, **decoder
            ),
            instance_attention=ScaleAttentionHead(out_channels=2, **decoder) if instance_on else None,
            detail_losses=detail_losses,
            context_scale=hrda.CONTEXT_SCALE,
            detail_scale=hrda.DETAIL_SCALE,
            detail_crop_size=list(hrda.DETAIL_CROP_SIZE),
            crop_coord_divisible=hrda.CROP_COORD_DIVISIBLE,
            detail_loss_weight=hrda.DETAIL_LOSS_WEIGHT,
            detail_slide_inference=hrda.DETAIL_SLIDE_INFERENCE,
            detail_slide_overlap=hrda.DETAIL_SLIDE_OVERLAP,
            test_window_size=list(hrda.TEST_WINDOW_SIZE),
            test_window_stride=list(hrda.TEST_WINDOW_STRIDE),
        )
        return ret

    # ------------------------------------------------------------------ the two branches
    @staticmethod
    def _resize(images: torch.Tensor, scale: float) -> torch.Tensor:
        if scale == 1.0:
            return images
        return F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)

    def extract_features(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Backbone features of the context crop (normalised ``images`` B x 3 x H x W resized by
        CONTEXT_SCALE): {name: B x C_i x H s / stride_i x W s / stride_i}; what the feature distance
        compares."""
        return self.backbone(self._resize(images, self.context_scale))

    def _heads(
        self, features: Dict[str, torch.Tensor], scale: float, outputs: Sequence[str] = DENSE_OUTPUTS
    ) -> Dict[str, torch.Tensor]:
        """The heads' outputs on their stride-``output_stride`` grid for the features of an input resized
        by ``scale``: ``"sem_seg"`` and, with the instance head, ``"center"`` and ``"offset"`` (converted
        to pixels of the unresized input); only those named in ``outputs``, the other heads not run."""
        heads = {}
        if "sem_seg" in outputs:
            heads["sem_seg"] = self.sem_seg_head(features)
        if self.instance_on and ("center" in outputs or "offset" in outputs):
            heads["center"], offset = self.ins_embed_head(features)
            heads["offset"] = offset / scale
        return {name: value for name, value in heads.items() if name in outputs}

    def _attention(
        self, features: Dict[str, torch.Tensor], outputs: Sequence[str] = DENSE_OUTPUTS
    ) -> Dict[str, torch.Tensor]:
        """The attention of each output (keys of :meth:`_heads`, those named in ``outputs``) from the
        context features."""
        attention = {}
        if "sem_seg" in outputs:
            attention["sem_seg"] = self.scale_attention(features)
        if self.instance_on and ("center" in outputs or "offset" in outputs):
            instance = self.instance_attention(features)
            attention["center"], attention["offset"] = instance[:, :1], instance[:, 1:]
        return {name: value for name, value in attention.items() if name in outputs}

    def _fuse(
        self,
        context: Dict[str, torch.Tensor],
        attention: Dict[str, torch.Tensor],
        detail: Dict[str, torch.Tensor],
        size: Tuple[int, int],
        detail_box: Optional[CropBox] = None,
    ) -> Dict[str, torch.Tensor]:
        """:func:`fuse_scales` of every output, upsampled to ``size`` (the input's)."""
        return {
            name: F.interpolate(
                fuse_scales(context[name], attention[name], detail[name], self.upsample, detail_box),
                size=size,
                mode="bilinear",
                align_corners=False,
            )
            for name in context
        }

    def _check_input_size(self, images: torch.Tensor) -> None:
        height, width = images.shape[-2:]
        step = self.crop_coord_divisible / self.detail_scale
        if height % step or width % step:
            raise ValueError(
                f"HRDA input of size {height}x{width} must be a multiple of {step:g} pixels (CROP_COORD_DIVISIBLE "
                "/ DETAIL_SCALE) so that both scales align"
            )

    def predict_dense(
        self, images: torch.Tensor, outputs: Optional[Sequence[str]] = None
    ) -> Dict[str, torch.Tensor]:
        """Fused predictions of normalised images B x 3 x H x W: the whole image as context, the detail
        branch over the whole image (sliding DETAIL_CROP_SIZE windows with DETAIL_SLIDE_INFERENCE),
        unmasked attention. Images of any size: they are padded (0, the mean colour) to a multiple of
        CROP_COORD_DIVISIBLE / DETAIL_SCALE and the outputs cropped back.

        Args:
            outputs: the outputs to compute (default: all), as
                :meth:`GBWPanopticSegmentor.predict_dense`; the heads and attention heads of the
                others do not run.

        Returns:
            ``"sem_seg"``: B x C x H x W logits; with the instance head also ``"center"``: B x 1 x H x W
            and ``"offset"``: B x 2 x H x W (dy, dx) in input pixels; only the keys of ``outputs`` when
            given.
        """
        outputs = self._requested_outputs(outputs)
        height, width = images.shape[-2:]
        step = int(self.crop_coord_divisible / self.detail_scale)
        if height % step or width % step:
            padded = pad_to(images, (height + -height % step, width + -width % step))
            return {
                name: value[..., :height, :width] for name, value in self.predict_dense(padded, outputs).items()
            }
        features = self.extract_features(images)
        context = self._heads(features, self.context_scale, outputs)
        detail_images = self._resize(images, self.detail_scale)
        if self.detail_slide_inference:
            boxes = sliding_windows(*detail_images.shape[-2:], self.detail_crop_size, self.detail_slide_stride)
            windows = torch.cat([crop(detail_images, box) for box in boxes])
            window_outputs = self._heads(self.backbone(windows), self.detail_scale, outputs)
            grid = tuple(side // self.output_stride for side in detail_images.shape[-2:])
            detail = {
                name: average_windows(value, boxes, grid, self.output_stride) for name, value in window_outputs.items()
            }
        else:
            detail = self._heads(self.backbone(detail_images), self.detail_scale, outputs)
        return self._fuse(context, self._attention(features, outputs), detail, tuple(images.shape[-2:]))

    def predict_windows(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Test-time prediction: :meth:`predict_dense` on sliding TEST_WINDOW_SIZE windows (all windows in
        one batch), averaged where they overlap; the whole image when TEST_WINDOW_SIZE is empty.

        Returns:
            as :meth:`predict_dense`.
        """
        if not self.test_window_size:
            return self.predict_dense(images)
        boxes = sliding_windows(*images.shape[-2:], self.test_window_size, self.test_window_stride)
        windows = self.predict_dense(torch.cat([crop(images, box) for box in boxes]))
        return {name: average_windows(value, boxes, tuple(images.shape[-2:])) for name, value in windows.items()}

    # ------------------------------------------------------------------ training
    def training_predictions(self, images: torch.Tensor) -> Dict:
        """One training pass of HRDA on normalised images B x 3 x H x W.

        Returns:
            ``"fused"``: the fused outputs at input size (as :meth:`predict_dense`, attention masked
            outside the detail crop); ``"detail"``: the detail outputs upsampled to the detail crop's
            size (``B x K x h x w``, offsets in input pixels); ``"detail_box"``: the detail crop's
            :class:`CropBox` in detail-scale input pixels; ``"features"``: the context features
            (:meth:`extract_features`).
        """
        self._check_input_size(images)
        features = self.extract_features(images)
        detail_images = self._resize(images, self.detail_scale)
        box = random_crop_box(*detail_images.shape[-2:], self.detail_crop_size, self.crop_coord_divisible)
        detail = self._heads(self.backbone(crop(detail_images, box)), self.detail_scale)
        fused = self._fuse(
            self._heads(features, self.context_scale),
            self._attention(features),
            detail,
            tuple(images.shape[-2:]),
            scale_box(box, self.output_stride),
        )
        box_size = (box.bottom - box.top, box.right - box.left)
        return {
            "fused": fused,
            "detail": {
                name: F.interpolate(value, size=box_size, mode="bilinear", align_corners=False)
                for name, value in detail.items()
            },
            "detail_box": box,
            "features": features,
        }

    def _detail_targets(self, batched_inputs: List[Dict], size: Tuple[int, int], box: CropBox) -> Dict:
        """The targets of the detail box, from the targets padded to ``size`` (the padded input size) and
        resized to DETAIL_SCALE (nearest): ``"sem_seg"``, ``"sem_seg_weights"`` (None when no input has
        weights) and, with the instance head, ``"center"``, ``"center_weights"``, ``"offset"``,
        ``"offset_weights"`` (zeros for inputs without them, as :meth:`losses`) and ``"center_class"``
        (:meth:`center_pixel_classes`)."""
        targets = {"sem_seg": self._batch_target(batched_inputs, "sem_seg", size, self.ignore_value).long()}
        targets["sem_seg_weights"] = None
        if any("sem_seg_weights" in x for x in batched_inputs):
            weights = self._batch_target(batched_inputs, "sem_seg_weights", size, default=1.0)
            targets["sem_seg_weights"] = weights.float()
        if self.instance_on:
            targets["center"] = self._batch_target(batched_inputs, "center", size, channels=(1,)).float()
            targets["center_weights"] = self._batch_target(batched_inputs, "center_weights", size).float()
            targets["offset"] = self._batch_target(batched_inputs, "offset", size, channels=(2,)).float()
            targets["offset_weights"] = self._batch_target(batched_inputs, "offset_weights", size).float()
            targets["center_class"] = self.center_pixel_classes(batched_inputs, size, targets["sem_seg"])
        if self.detail_scale != 1.0:  # semantic only (checked at construction)
            detail_size = tuple(int(side * self.detail_scale) for side in size)
            for name in ("sem_seg", "sem_seg_weights"):
                if targets[name] is not None:
                    resized = F.interpolate(targets[name][:, None].float(), size=detail_size, mode="nearest")[:, 0]
                    targets[name] = resized.to(targets[name].dtype)
        return {name: None if value is None else crop(value, box) for name, value in targets.items()}

    def hrda_losses(self, predictions: Dict, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        """The losses of :meth:`training_predictions` outputs: those of :meth:`losses` on the fused
        outputs over the whole crop, times ``1 - DETAIL_LOSS_WEIGHT``, and ``loss_<output>_detail`` on the
        detail crop (same loss weights) times ``DETAIL_LOSS_WEIGHT``."""
        size = predictions["fused"]["sem_seg"].shape[-2:]
        targets = self._detail_targets(batched_inputs, size, predictions["detail_box"])
        detail = predictions["detail"]
        labels = targets["sem_seg"]
        sem_seg_loss = self.detail_losses["sem_seg"](detail["sem_seg"], labels, targets["sem_seg_weights"])
        detail_losses = {"loss_sem_seg_detail": sem_seg_loss * self.sem_seg_loss_weight}
        if self.instance_on:
            detail_losses["loss_center_detail"] = self.weighted_center_loss(
                self.detail_losses["center"],
                detail["center"],
                targets["center"],
                targets["center_class"],
                targets["center_weights"],
            )
            offset_loss = self.detail_losses["offset"](
                detail["offset"], targets["offset"], labels, targets["offset_weights"]
            )
            detail_losses["loss_offset_detail"] = offset_loss * self.offset_loss_weight
        losses = self.losses(predictions["fused"], batched_inputs)
        losses = {name: value * (1.0 - self.detail_loss_weight) for name, value in losses.items()}
        losses.update({name: value * self.detail_loss_weight for name, value in detail_losses.items()})
        return losses

    def losses_and_features(
        self, batched_inputs: List[Dict]
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Training losses (:meth:`hrda_losses`) and the context features of the same pass."""
        predictions = self.training_predictions(self.preprocess_image(batched_inputs).tensor)
        return self.hrda_losses(predictions, batched_inputs), predictions["features"]

    def gbw_losses(self) -> Dict[str, nn.Module]:
        """The fused losses (as :class:`GBWPanopticSegmentor`) and the detail ones as ``<output>_detail``."""
        modules = super().gbw_losses()
        modules.update({f"{name}_detail": module for name, module in self.detail_losses.items()})
        return modules

    def forward(self, batched_inputs: List[Dict]):
        """As :meth:`GBWPanopticSegmentor.forward`; training returns the losses of :meth:`hrda_losses`,
        inference uses :meth:`predict_windows`."""
        if self.training:
            return self.losses_and_features(batched_inputs)[0]
        images = self.preprocess_image(batched_inputs)
        return self.postprocess(self.predict_windows(images.tensor), batched_inputs, images.image_sizes)
