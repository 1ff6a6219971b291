"""``GBWTopDownPanopticSegmentor``: EDAPS's released (top-down) panoptic model with GBW-weighted losses.

::

    image -> normalise -> pad -> encoder (MiT / ResNet) -> res2..res5
                                   |-> DAFormerSemSegHead -> class logits -> upsample to input size
                                   '-> FPN neck (p2..p6) -> RPN -> StandardROIHeads (2-fc box head,
                                                                   FCN mask head, K thing classes)
    training:  loss_sem_seg = GBW cross-entropy x SEM_SEG_HEAD.LOSS_WEIGHT (every image);
               Detectron2's RPN and RoI losses (images with "instances" only; GBW optional on the
               box classifier and the mask loss)
    inference: sem_seg (resized to height x width); Mask R-CNN detections (Detectron2's
               detector_postprocess); panoptic fusion as EDAPS: masks with score >= MASK_SCORE_THRESHOLD
               painted class by class into a class-agnostic instance map, merged with the semantic map
               (instance class = semantic majority over its thing pixels, small stuff -> void)

The neck, RPN and RoI heads are Detectron2's own classes built from ``MODEL.FPN``, ``MODEL.RPN``,
``MODEL.ANCHOR_GENERATOR``, ``MODEL.ROI_HEADS``, ``MODEL.ROI_BOX_HEAD`` and ``MODEL.ROI_MASK_HEAD``;
the instance classes are the dataset's thing classes in train-id order (``gt_classes`` 0 .. K - 1).
UDA methods use the interface of :class:`~gbw_panoptic.modeling.GBWPanopticSegmentor`
(``preprocess_image``, ``extract_features``, ``predict_dense`` = semantic logits,
``losses_and_features``), so DACS trains the semantic branch on source and mixed images and the instance
branch on the source images, whose dicts alone carry ``instances``.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import (
    META_ARCH_REGISTRY,
    Backbone,
    build_backbone,
    build_proposal_generator,
    build_sem_seg_head,
)
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.postprocessing import detector_postprocess, sem_seg_postprocess
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import ImageList, Instances
from torch import nn

from ..gbw import GBWCrossEntropyLoss
from .meta_arch import (
    GBWPanopticSegmentor,
    _dataset_classes,
    _fixed_class_weights,
    _gbw_loss_kwargs,
    gbw_statistic_entries,
    gbw_weight_entries,
)
from .post_processing import merge_semantic_and_instances, panoptic_to_segments

__all__ = ["UDA_METHODS", "EncoderFeatures", "GBWTopDownPanopticSegmentor", "build_fpn_neck", "paint_instance_masks"]

_VOID = -1
# UDA.METHOD values the model trains with: methods whose passes use the dense outputs alone (AdvEnt, AdvSeg,
# MinEnt) call the dense-prediction losses of the bottom-up model, which this model does not have.
UDA_METHODS = ("source_only", "dacs")


class EncoderFeatures(Backbone):
    """The "bottom-up" of the FPN neck: returns the encoder features it is given, so that Detectron2's
    ``FPN`` runs on features the encoder has already computed (shared with the semantic head)."""

    def __init__(self, shapes: Dict[str, ShapeSpec]):
        """
        Args:
            shapes: the encoder's ``output_shape()`` (channels and stride of each feature).
        """
        super().__init__()
        self._out_features = list(shapes)
        self._out_feature_channels = {name: shape.channels for name, shape in shapes.items()}
        self._out_feature_strides = {name: shape.stride for name, shape in shapes.items()}

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``features``: {name: B x C_i x H/s_i x W/s_i}, returned unchanged."""
        return features


def build_fpn_neck(cfg: CfgNode, encoder_shapes: Dict[str, ShapeSpec]) -> FPN:
    """Detectron2's FPN over the encoder features ``MODEL.FPN.IN_FEATURES`` with ``MODEL.FPN.OUT_CHANNELS``
    channels, ``NORM``, ``FUSE_TYPE`` and a max-pooled extra level (EDAPS / mmdet ``num_outs=5``): p2..p6."""
    missing = [name for name in cfg.MODEL.FPN.IN_FEATURES if name not in encoder_shapes]
    if missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES {list(cfg.MODEL.FPN.IN_FEATURES)} names {missing}, which the encoder "
            f"does not output (it outputs {list(encoder_shapes)})"
        )
    return FPN(
        bottom_up=EncoderFeatures(encoder_shapes),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


def paint_instance_masks(
    masks: torch.Tensor, classes: torch.Tensor, scores: torch.Tensor, score_threshold: float
) -> torch.Tensor:
    """Class-agnostic instance map of detections, painted as EDAPS does: the masks whose score reaches
    ``score_threshold``, class by class in increasing class id and, within a class, in decreasing score,
    each overwriting the ones painted before (so where masks overlap, the later one wins).

    Args:
        masks: K x H x W bool masks.
        classes: K int64 class ids.
        scores: K float scores.
        score_threshold: masks with a lower score are left out.
    Returns:
        H x W int64: 0 = no instance, n = the n-th painted mask.
    """
    if masks.dim() != 3 or classes.shape != (masks.size(0),) or scores.shape != (masks.size(0),):
        raise ValueError(
            f"masks must be K x H x W with K classes and scores; got masks {tuple(masks.shape)}, classes "
            f"{tuple(classes.shape)}, scores {tuple(scores.shape)}"
        )
    by_score = torch.argsort(scores, descending=True, stable=True)
    order = by_score[torch.argsort(classes[by_score], stable=True)]
    order = order[scores[order] >= score_threshold]
    instance_ids = torch.zeros(masks.shape[1:], dtype=torch.int64, device=masks.device)
    for number, index in enumerate(order.tolist(), start=1):
        instance_ids[masks[index]] = number
    return instance_ids


@META_ARCH_REGISTRY.register()
class GBWTopDownPanopticSegmentor(nn.Module):
    """Shared encoder + DAFormer semantic decoder + Detectron2's Mask R-CNN (FPN, RPN, RoI heads)."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        neck: nn.Module,
        proposal_generator: nn.Module,
        roi_heads: nn.Module,
        sem_seg_loss: GBWCrossEntropyLoss,
        sem_seg_loss_weight: float,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int,
        class_names: Sequence[str],
        thing_ids: Sequence[int],
        label_divisor: int,
        stuff_area: int,
        mask_score_threshold: float,
        zero_instance_losses_if_empty: bool = True,
    ):
        """
        Args:
            backbone: the encoder, a Detectron2 backbone (``res2`` .. ``res5``).
            sem_seg_head: encoder features -> B x C x h x w class logits.
            neck: encoder features -> FPN features (:func:`build_fpn_neck`).
            proposal_generator: Detectron2 RPN over the neck features.
            roi_heads: Detectron2 RoI heads (box and mask) over the neck features, K thing classes.
            sem_seg_loss: GBW cross-entropy over the C semantic classes.
            sem_seg_loss_weight: multiplier of the semantic loss.
            pixel_mean, pixel_std: RGB normalisation, 0-255 scale.
            size_divisibility: images are padded to a multiple of it (32: the FPN's coarsest input).
            class_names: C class names (:meth:`gbw_class_weights` names the weights after them).
            thing_ids: the K contiguous ids of the thing classes, in increasing order: instance class
                k of the RoI heads is semantic class ``thing_ids[k]``.
            label_divisor: panoptic label = class * label_divisor + instance.
            stuff_area: stuff regions with fewer pixels become void in the panoptic output.
            mask_score_threshold: detections below this score are not pasted into the panoptic output.
            zero_instance_losses_if_empty: when an image with ``instances`` has none, the instance
                losses of the batch are 0 (EDAPS); False: Detectron2's losses (negatives only there).
        """
        super().__init__()
        num_things = getattr(roi_heads, "num_classes", None)
        if num_things != len(thing_ids):
            raise ValueError(
                f"MODEL.ROI_HEADS.NUM_CLASSES is {num_things} but the dataset has {len(thing_ids)} thing classes "
                f"({list(thing_ids)}); the RoI heads predict the thing classes"
            )
        if list(thing_ids) != sorted(thing_ids):
            raise ValueError(f"thing_ids must be increasing, got {list(thing_ids)}")
        if len(class_names) != sem_seg_loss.num_classes:
            raise ValueError(f"{len(class_names)} class names for {sem_seg_loss.num_classes} classes")
        if not 0.0 <= mask_score_threshold <= 1.0:
            raise ValueError(f"MODEL.TOP_DOWN.MASK_SCORE_THRESHOLD must be in [0, 1], got {mask_score_threshold}")
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.neck = neck
        self.proposal_generator = proposal_generator
        self.roi_heads = roi_heads
        self.sem_seg_loss = sem_seg_loss
        self.sem_seg_loss_weight = sem_seg_loss_weight
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("thing_id_table", torch.tensor(list(thing_ids), dtype=torch.int64), False)
        self.size_divisibility = size_divisibility
        self.class_names = list(class_names)
        self.thing_ids = list(thing_ids)
        self.label_divisor = label_divisor
        self.stuff_area = stuff_area
        self.mask_score_threshold = mask_score_threshold
        self.zero_instance_losses_if_empty = zero_instance_losses_if_empty
        self.ignore_value = sem_seg_loss.ignore_index
        # Whether the last training pass computed the instance losses (some input had "instances").
        self._last_pass_had_instances = False

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict:
        if not cfg.MODEL.MASK_ON:
            raise ValueError(
                "MODEL.MASK_ON is False: GBWTopDownPanopticSegmentor needs the mask head (and the mapper's "
                "instance masks, which MODEL.MASK_ON switches on)"
            )
        if cfg.MODEL.INS_EMBED_HEAD.ENABLED:
            raise ValueError(
                "MODEL.INS_EMBED_HEAD.ENABLED is True: the top-down model has no center/offset head; set it "
                "False (the data mapper would otherwise build center/offset targets)"
            )
        backbone = build_backbone(cfg)
        neck = build_fpn_neck(cfg, backbone.output_shape())
        class_names, thing_ids, label_divisor = _dataset_classes(cfg)
        gbw = cfg.MODEL.GBW
        sem_seg_loss = GBWCrossEntropyLoss(
            cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            ignore_index=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            mode=gbw.SEM_SEG.MODE,
            pixel_weights_in_norms=gbw.SEM_SEG.PIXEL_WEIGHTS_IN_NORMS,
            fixed_class_weights=_fixed_class_weights(cfg),
            **_gbw_loss_kwargs(gbw.SEM_SEG),
        )
        neck_shape = neck.output_shape()
        return {
            "backbone": backbone,
            "sem_seg_head": build_sem_seg_head(cfg, backbone.output_shape()),
            "neck": neck,
            "proposal_generator": build_proposal_generator(cfg, neck_shape),
            "roi_heads": build_roi_heads(cfg, neck_shape),
            "sem_seg_loss": sem_seg_loss,
            "sem_seg_loss_weight": cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": cfg.MODEL.SIZE_DIVISIBILITY,
            "class_names": class_names,
            "thing_ids": thing_ids,
            "label_divisor": label_divisor,
            "stuff_area": cfg.MODEL.POST_PROCESSING.STUFF_AREA,
            "mask_score_threshold": cfg.MODEL.TOP_DOWN.MASK_SCORE_THRESHOLD,
            "zero_instance_losses_if_empty": cfg.MODEL.TOP_DOWN.ZERO_INSTANCE_LOSSES_IF_EMPTY,
        }

    # The input side is the bottom-up model's (same attributes): the device and class count, the
    # normalisation and padding of preprocess_image (ImageList of B x 3 x H_pad x W_pad), and
    # extract_features (the encoder's {name: B x C_i x H/s_i x W/s_i}).
    device = GBWPanopticSegmentor.device
    num_classes = GBWPanopticSegmentor.num_classes
    preprocess_image = GBWPanopticSegmentor.preprocess_image
    extract_features = GBWPanopticSegmentor.extract_features

    def semantic_logits(self, features: Dict[str, torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
        """B x C x H x W class logits at ``size`` (bilinear) from encoder ``features``."""
        return F.interpolate(self.sem_seg_head(features), size=size, mode="bilinear", align_corners=False)

    @property
    def dense_outputs(self) -> Tuple[str, ...]:
        """Names of the outputs of :meth:`predict_dense`: the semantic logits only (the instances are
        no dense output)."""
        return ("sem_seg",)

    def predict_dense(self, images: torch.Tensor, outputs: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
        """``{"sem_seg": B x C x H x W logits}`` for normalised images B x 3 x H x W (the teacher's
        pseudo-labels in DACS); ``outputs``, when given, must be ``("sem_seg",)``."""
        if outputs is not None and tuple(outputs) != self.dense_outputs:
            raise ValueError(
                f"outputs must be {self.dense_outputs} (the only dense output of this model), got {tuple(outputs)}"
            )
        return {"sem_seg": self.semantic_logits(self.extract_features(images), images.shape[-2:])}

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: list of dicts with ``"image"`` and, in training, ``"sem_seg"`` (H x W int64,
                255 ignore), optional ``"sem_seg_weights"`` (H x W) and optional ``"instances"``
                (``gt_boxes``, ``gt_classes`` 0 .. K - 1, ``gt_masks``); at inference optional
                ``"height"``, ``"width"`` (output resolution).
        Returns:
            training: ``loss_sem_seg`` and, when some input has ``instances``, Detectron2's
            ``loss_rpn_cls``, ``loss_rpn_loc``, ``loss_cls``, ``loss_box_reg``, ``loss_mask`` (the GBW
            class weights they used: :meth:`gbw_class_weights`); inference: one dict per image (see :meth:`inference`).
        """
        images = self.preprocess_image(batched_inputs)
        features = self.extract_features(images.tensor)
        if self.training:
            return self.losses(images, features, batched_inputs)
        return self.inference(images, features, batched_inputs)

    def losses_and_features(
        self, batched_inputs: List[Dict]
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Training losses (as :meth:`forward`) and the encoder features they were computed from, with a
        single encoder pass."""
        images = self.preprocess_image(batched_inputs)
        features = self.extract_features(images.tensor)
        return self.losses(images, features, batched_inputs), features

    def losses(
        self, images: ImageList, features: Dict[str, torch.Tensor], batched_inputs: List[Dict]
    ) -> Dict[str, torch.Tensor]:
        """The semantic loss of every image and the Mask R-CNN losses of the images with ``instances``
        (none when no image has them: DACS's mixed images, whose graph still reaches the instance branch
        with a zero factor, so that DDP needs no unused-parameter search)."""
        if any("sem_seg" not in x for x in batched_inputs):
            raise ValueError("training inputs need a 'sem_seg' target (H x W int64) in every dict")
        logits = self.semantic_logits(features, images.tensor.shape[-2:])
        labels = ImageList.from_tensors(
            [x["sem_seg"].to(self.device) for x in batched_inputs], self.size_divisibility, self.ignore_value
        ).tensor.long()
        pixel_weights = None
        if any("sem_seg_weights" in x for x in batched_inputs):
            weights = [x.get("sem_seg_weights", torch.ones(x["sem_seg"].shape)) for x in batched_inputs]
            pixel_weights = ImageList.from_tensors(
                [w.to(self.device).float() for w in weights], self.size_divisibility, 0.0
            ).tensor
        losses = {"loss_sem_seg": self.sem_seg_loss(logits, labels, pixel_weights) * self.sem_seg_loss_weight}
        with_instances = [index for index, x in enumerate(batched_inputs) if "instances" in x]
        if with_instances:
            losses.update(self.instance_losses(images, features, batched_inputs, with_instances))
        else:
            # Every pass reaches every parameter, as DDP without its unused-parameter search requires: the
            # instance branch joins the graph with a factor 0 (its gradients are 0, the loss unchanged).
            unused = sum(p.sum() for m in (self.neck, self.proposal_generator, self.roi_heads) for p in m.parameters())
            losses["loss_sem_seg"] = losses["loss_sem_seg"] + 0.0 * unused
        self._last_pass_had_instances = bool(with_instances)
        return losses

    def instance_losses(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        batched_inputs: List[Dict],
        indices: List[int],
    ) -> Dict[str, torch.Tensor]:
        """Detectron2's RPN and RoI losses of the images ``indices`` of the batch (those with
        ``instances``); all 0 (still connected to the graph) when one of them has no instance and
        ``zero_instance_losses_if_empty``."""
        if len(indices) < len(batched_inputs):
            select = torch.as_tensor(indices, device=images.tensor.device)
            images = ImageList(images.tensor[select], [images.image_sizes[i] for i in indices])
            features = {name: value[select] for name, value in features.items()}
        gt_instances = [batched_inputs[i]["instances"].to(self.device) for i in indices]
        neck_features = self.neck(features)
        proposals, losses = self.proposal_generator(images, neck_features, gt_instances)
        _, roi_losses = self.roi_heads(images, neck_features, proposals, gt_instances)
        losses.update(roi_losses)
        if self.zero_instance_losses_if_empty and any(len(x) == 0 for x in gt_instances):
            losses = {name: value * 0.0 for name, value in losses.items()}
        return losses

    def gbw_losses(self) -> Dict[str, Tuple[nn.Module, List[str]]]:
        """The GBW loss modules by log name, each with the names of its classes: ``sem_seg`` (the C
        classes), ``box_cls`` (the thing classes and ``background``, when the box predictor has a GBW
        loss), ``mask`` (the thing classes, when the mask head has one)."""
        thing_names = [self.class_names[c] for c in self.thing_ids]
        modules = {"sem_seg": (self.sem_seg_loss, self.class_names)}
        box_loss = getattr(self.roi_heads.box_predictor, "cls_loss", None)
        if box_loss is not None:
            modules["box_cls"] = (box_loss, thing_names + ["background"])
        mask_loss = getattr(getattr(self.roi_heads, "mask_head", None), "class_weighting", None)
        if mask_loss is not None:
            modules["mask"] = (mask_loss, thing_names)
        return modules

    def gbw_class_weights(self) -> Dict[str, torch.Tensor]:
        """The class weights that the GBW losses of :meth:`gbw_losses` used in the last training pass, on
        the device, as ``{"<loss>/<class name>": 0-dim float32 tensor}`` (:func:`gbw_weight_entries`); the
        box and mask weights only when that pass computed the instance losses."""
        return gbw_weight_entries(self._last_pass_gbw_losses())

    def gbw_class_statistics(self) -> Dict[str, torch.Tensor]:
        """The per-class statistics of the last training pass's GBW cross-entropy losses, on the device
        (:func:`gbw_statistic_entries`), of the same losses as :meth:`gbw_class_weights`."""
        return gbw_statistic_entries(self._last_pass_gbw_losses())

    def _last_pass_gbw_losses(self) -> List[Tuple[str, nn.Module, List[str]]]:
        """``(log name, module, class names)`` of the GBW losses the last training pass computed: the
        semantic loss, and the box and mask losses when that pass computed the instance losses."""
        return [
            (name, module, names)
            for name, (module, names) in self.gbw_losses().items()
            if self._last_pass_had_instances or name == "sem_seg"
        ]

    def inference(
        self, images: ImageList, features: Dict[str, torch.Tensor], batched_inputs: List[Dict]
    ) -> List[Dict]:
        """Per image: semantic logits and detections resized to ``height`` x ``width``, and their panoptic
        fusion.

        Returns:
            one dict per image: ``"sem_seg"``: C x height x width logits; ``"instances"``: Detectron2's
            Mask R-CNN detections (``pred_boxes``, ``scores``, ``pred_classes`` as contiguous semantic
            ids, ``pred_masks`` bool height x width); ``"panoptic_seg"``: ``(png, segments_info)``, png
            height x width int32 (0 = void), segments_info dicts ``id``, ``category_id``, ``isthing``,
            ``area``, ``panoptic_label``.
        """
        logits = self.semantic_logits(features, images.tensor.shape[-2:])
        neck_features = self.neck(features)
        proposals, _ = self.proposal_generator(images, neck_features, None)
        detections, _ = self.roi_heads(images, neck_features, proposals, None)
        results = []
        for index, (x, image_size) in enumerate(zip(batched_inputs, images.image_sizes)):
            height, width = x.get("height", image_size[0]), x.get("width", image_size[1])
            sem_seg = sem_seg_postprocess(logits[index], image_size, height, width)
            instances = detector_postprocess(detections[index], height, width)
            instances.pred_classes = self.thing_id_table[instances.pred_classes]
            results.append(
                {
                    "sem_seg": sem_seg,
                    "panoptic_seg": self.panoptic_fusion(sem_seg.argmax(dim=0), instances),
                    "instances": instances,
                }
            )
        return results

    def panoptic_fusion(self, sem_seg: torch.Tensor, instances: Instances) -> Tuple[torch.Tensor, List[Dict]]:
        """EDAPS's fusion of one image's semantic map (H x W int64) and detections (``pred_masks`` K x H x W,
        ``pred_classes``, ``scores``): :func:`paint_instance_masks`, then
        :func:`~gbw_panoptic.modeling.post_processing.merge_semantic_and_instances`; returns
        ``(png, segments_info)``."""
        instance_ids = paint_instance_masks(
            instances.pred_masks, instances.pred_classes, instances.scores, self.mask_score_threshold
        )
        panoptic = merge_semantic_and_instances(
            sem_seg, instance_ids, self.thing_ids, self.label_divisor, self.stuff_area, _VOID
        )
        return panoptic_to_segments(panoptic, self.label_divisor, self.thing_ids, _VOID)
