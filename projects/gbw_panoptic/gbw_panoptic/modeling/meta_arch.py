"""``GBWPanopticSegmentor``: EDAPS-style bottom-up panoptic segmentation with GBW-weighted losses.

::

    image -> normalise -> backbone (MiT / ResNet) -> res2..res5
                             |-> DAFormerSemSegHead  -> class logits  --+
                             |-> DAFormerInstanceHead -> center, offset -+-> upsample to input size
    training:  GBW cross-entropy (x SEM_SEG_HEAD.LOSS_WEIGHT), GBW center MSE (x CENTER_LOSS_WEIGHT,
               / sum of center weights, 0 above CENTER_LOSS_ZERO_ABOVE), GBW offset L1
               (x OFFSET_LOSS_WEIGHT, / 2 x sum of offset weights as EDAPS, or / sum of them)
    inference: resize to (height, width) -> Panoptic-DeepLab post-processing -> sem_seg,
               panoptic_seg, instances

With ``MODEL.INS_EMBED_HEAD.ENABLED False`` the model is semantic-only (DAFormer): no instance
head, only ``loss_sem_seg`` and the ``sem_seg`` output.
"""
import logging
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, build_sem_seg_head
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks, ImageList, Instances
from torch import nn

from ..gbw import GBWCrossEntropyLoss, GBWRegressionLoss, median_frequency_weights
from ..utils.padding import stack_padded
from .heads import build_ins_embed_head
from .post_processing import panoptic_segmentation, panoptic_to_segments

__all__ = ["DENSE_OUTPUTS", "GBWPanopticSegmentor", "gbw_statistic_entries", "gbw_weight_entries"]

_VOID = -1
logger = logging.getLogger(__name__)

CENTER_PIXEL_CLASSES = ("semantic", "instance")
# The outputs of predict_dense, in order (the last two with the instance head only).
DENSE_OUTPUTS = ("sem_seg", "center", "offset")
# MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING: static class weights of the cross-entropy.
CLASS_WEIGHTINGS = ("none", "median_frequency")


def _gbw_loss_kwargs(node: CfgNode) -> Dict:
    """Keyword arguments of a GBW loss module from one ``MODEL.GBW.<LOSS>`` node."""
    return {
        "enabled": node.ENABLED,
        "lam": node.LAMBDA,
        "lam_mode": node.LAMBDA_MODE,
        "solver": node.SOLVER,
    }


def _fixed_class_weights(cfg: CfgNode) -> Optional[torch.Tensor]:
    """The static class weights of ``MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING`` (None for "none"): median
    frequency weights of the class pixel counts of the source training sets (DATASETS.TRAIN)."""
    if cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING == "none":
        return None
    from ..data.build import dataset_class_pixels

    pixels = dataset_class_pixels(
        cfg.DATASETS.TRAIN,
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
        "MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING 'median_frequency'",
    )
    weights = median_frequency_weights(pixels.sum(axis=0))
    logger.info(
        "Median frequency class weights of DATASETS.TRAIN %s: %s",
        tuple(cfg.DATASETS.TRAIN), ", ".join(f"{w:.3f}" for w in weights.tolist()),
    )
    return weights


def _dataset_classes(cfg: CfgNode) -> Tuple[List[str], List[int], int]:
    """(class names, contiguous thing ids, label divisor) from the ``MetadataCatalog`` entry of the first
    of DATASETS.TEST, DATASETS.TRAIN that is a registered panoptic dataset (``stuff_classes`` and
    ``thing_dataset_id_to_contiguous_id`` set, ``label_divisor`` 1000 when not)."""
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    names = [name for name in (*cfg.DATASETS.TEST, *cfg.DATASETS.TRAIN) if name in MetadataCatalog.list()]
    required = {"stuff_classes", "thing_dataset_id_to_contiguous_id"}
    panoptic = [(name, MetadataCatalog.get(name).as_dict()) for name in names]
    panoptic = [(name, meta) for name, meta in panoptic if required <= set(meta)]
    if not panoptic:
        raise ValueError(
            f"no registered panoptic dataset among DATASETS.TEST {tuple(cfg.DATASETS.TEST)} and DATASETS.TRAIN "
            f"{tuple(cfg.DATASETS.TRAIN)}: the model takes its class names, thing ids and label divisor from "
            "the MetadataCatalog entry of one of them (import gbw_panoptic.data to register the builtin "
            "datasets, or set stuff_classes and thing_dataset_id_to_contiguous_id on your own)"
        )
    source, meta = panoptic[0]
    if len(meta["stuff_classes"]) != num_classes:
        raise ValueError(
            f"dataset {source} has {len(meta['stuff_classes'])} classes (stuff_classes) but "
            f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {num_classes}"
        )
    thing_ids = sorted(meta["thing_dataset_id_to_contiguous_id"].values())
    return list(meta["stuff_classes"]), thing_ids, meta.get("label_divisor", 1000)


def gbw_weight_entries(losses: Iterable[Tuple[str, nn.Module, Sequence[str]]]) -> Dict[str, torch.Tensor]:
    """The last class weights of GBW losses as ``{"<loss>/<class name>": weight}``.

    Args:
        losses: ``(log name, GBW loss module, names of its C classes)``; a loss without weights
            (``last_weights`` None: GBW off) is left out.
    Returns:
        one 0-dim float32 tensor per class that shares the loss's simplex (``active_classes``), in class
        order: views of ``last_weights`` on its device, so that nothing is read back.
    """
    return {
        f"{loss_name}/{class_names[c]}": module.last_weights[c]
        for loss_name, module, class_names in losses
        if module.last_weights is not None
        for c in module.active_classes
    }


def gbw_statistic_entries(losses: Iterable[Tuple[str, nn.Module, Sequence[str]]]) -> Dict[str, torch.Tensor]:
    """The per-class statistics that the GBW cross-entropy losses solved their last weights from
    (``last_class_statistics``: ``sq_norm``, ``pixels``, ``ce``) as ``{"<loss>/<class name>/<statistic>":
    value}``, for the classes of :func:`gbw_weight_entries`; 0-dim float32 views on the device."""
    return {
        f"{loss_name}/{class_names[c]}/{statistic}": values[c]
        for loss_name, module, class_names in losses
        if module.last_class_statistics is not None
        for c in module.active_classes
        for statistic, values in module.last_class_statistics.items()
    }


@META_ARCH_REGISTRY.register()
class GBWPanopticSegmentor(nn.Module):
    """Shared encoder + DAFormer semantic decoder + DAFormer center/offset decoder, GBW losses."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        ins_embed_head: Optional[nn.Module],
        sem_seg_loss: GBWCrossEntropyLoss,
        center_loss: Optional[GBWRegressionLoss],
        offset_loss: Optional[GBWRegressionLoss],
        sem_seg_loss_weight: float,
        center_loss_weight: float,
        offset_loss_weight: float,
        center_loss_zero_above: float = 0.0,
        center_pixel_class: str = "semantic",
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int,
        class_names: Sequence[str],
        thing_ids: Sequence[int],
        label_divisor: int,
        stuff_area: int,
        center_threshold: float,
        nms_kernel: int,
        top_k: int,
    ):
        """
        Args:
            backbone: Detectron2 backbone returning the features the heads read.
            sem_seg_head: returns B x C x h x w class logits.
            ins_embed_head: returns (center B x 1 x h x w, offsets B x 2 x h x w in pixels); None for
                a semantic-only model.
            sem_seg_loss, center_loss, offset_loss: GBW loss modules (the last two None when
                ``ins_embed_head`` is None).
            sem_seg_loss_weight, center_loss_weight, offset_loss_weight: loss multipliers.
            center_loss_zero_above: a center loss (after its multiplier) above this value is
                replaced by 0 for that call (EDAPS: 14.0); 0 disables it.
            center_pixel_class: class of each center-heatmap pixel for GBW: ``"semantic"`` (its
                semantic label) or ``"instance"`` (the class of the instance whose Gaussian covers
                it, ``"center_class"`` of the inputs; its semantic label elsewhere).
            pixel_mean, pixel_std: RGB normalisation, 0-255 scale.
            size_divisibility: images are padded to a multiple of it.
            class_names: C class names (:meth:`gbw_class_weights` names the weights after them).
            thing_ids: contiguous ids of the thing classes.
            label_divisor: panoptic label = class * label_divisor + instance.
            stuff_area, center_threshold, nms_kernel, top_k: Panoptic-DeepLab post-processing.
        """
        super().__init__()
        if (ins_embed_head is None) != (center_loss is None) or (center_loss is None) != (offset_loss is None):
            raise ValueError("ins_embed_head, center_loss and offset_loss must all be given or all be None")
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.ins_embed_head = ins_embed_head
        self.sem_seg_loss = sem_seg_loss
        self.center_loss = center_loss
        self.offset_loss = offset_loss
        self.sem_seg_loss_weight = sem_seg_loss_weight
        self.center_loss_weight = center_loss_weight
        self.offset_loss_weight = offset_loss_weight
        if center_loss_zero_above < 0:
            raise ValueError(f"center_loss_zero_above must be >= 0 (0 disables it), got {center_loss_zero_above}")
        self.center_loss_zero_above = center_loss_zero_above
        self.center_pixel_class = center_pixel_class
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.size_divisibility = size_divisibility
        self.class_names = list(class_names)
        self.thing_ids = list(thing_ids)
        self.label_divisor = label_divisor
        self.stuff_area = stuff_area
        self.center_threshold = center_threshold
        self.nms_kernel = nms_kernel
        self.top_k = top_k
        self.ignore_value = sem_seg_loss.ignore_index
        if len(self.class_names) != sem_seg_loss.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {sem_seg_loss.num_classes} classes")

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict:
        backbone = build_backbone(cfg)
        class_names, thing_ids, label_divisor = _dataset_classes(cfg)
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        ignore = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        instance_on = cfg.MODEL.INS_EMBED_HEAD.ENABLED
        gbw = cfg.MODEL.GBW
        sem_seg_loss = GBWCrossEntropyLoss(
            num_classes,
            ignore_index=ignore,
            mode=gbw.SEM_SEG.MODE,
            pixel_weights_in_norms=gbw.SEM_SEG.PIXEL_WEIGHTS_IN_NORMS,
            fixed_class_weights=_fixed_class_weights(cfg),
            **_gbw_loss_kwargs(gbw.SEM_SEG),
        )
        center_loss = offset_loss = None
        if instance_on:
            center_loss = GBWRegressionLoss(
                num_classes, kind="mse", ignore_index=ignore, **_gbw_loss_kwargs(gbw.CENTER)
            )
            offset_loss = GBWRegressionLoss(
                num_classes,
                kind="l1",
                ignore_index=ignore,
                # Offsets are only learnt on thing pixels: the thing classes share the simplex.
                active_classes=thing_ids,
                # EDAPS: the weights expanded over (dy, dx), L1 / (2 * sum of offset weights).
                normalizer="channel_weight_sum",
                **_gbw_loss_kwargs(gbw.OFFSET),
            )
        post = cfg.MODEL.POST_PROCESSING
        return {
            "backbone": backbone,
            "sem_seg_head": build_sem_seg_head(cfg, backbone.output_shape()),
            "ins_embed_head": build_ins_embed_head(cfg, backbone.output_shape()) if instance_on else None,
            "sem_seg_loss": sem_seg_loss,
            "center_loss": center_loss,
            "offset_loss": offset_loss,
            "sem_seg_loss_weight": cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT,
            "center_loss_weight": cfg.MODEL.INS_EMBED_HEAD.CENTER_LOSS_WEIGHT,
            "offset_loss_weight": cfg.MODEL.INS_EMBED_HEAD.OFFSET_LOSS_WEIGHT,
            "center_loss_zero_above": cfg.MODEL.INS_EMBED_HEAD.CENTER_LOSS_ZERO_ABOVE,
            "center_pixel_class": gbw.CENTER.PIXEL_CLASS,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": cfg.MODEL.SIZE_DIVISIBILITY,
            "class_names": class_names,
            "thing_ids": thing_ids,
            "label_divisor": label_divisor,
            "stuff_area": post.STUFF_AREA,
            "center_threshold": post.CENTER_THRESHOLD,
            "nms_kernel": post.NMS_KERNEL,
            "top_k": post.TOP_K_INSTANCE,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def num_classes(self) -> int:
        return self.sem_seg_loss.num_classes

    @property
    def instance_on(self) -> bool:
        return self.ins_embed_head is not None

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Move ``"image"`` (3 x H x W RGB, uint8 or float, 0-255) to the device, normalise, pad.

        Returns:
            ImageList with a B x 3 x H_pad x W_pad float tensor (H_pad, W_pad multiples of
            ``size_divisibility``; padding 0 = the mean colour) and the unpadded sizes.
        """
        images = [(x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    def extract_features(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Backbone features of normalised images B x 3 x H x W: {name: B x C_i x H/s_i x W/s_i}."""
        return self.backbone(images)

    @property
    def dense_outputs(self) -> Tuple[str, ...]:
        """Names of the outputs of :meth:`predict_dense`: ``"sem_seg"`` and, with the instance head,
        ``"center"`` and ``"offset"``."""
        return DENSE_OUTPUTS if self.instance_on else DENSE_OUTPUTS[:1]

    def _requested_outputs(self, outputs: Optional[Sequence[str]]) -> Tuple[str, ...]:
        """The names of ``outputs`` (None: all of :attr:`dense_outputs`) in the order of
        :attr:`dense_outputs`; an unknown or duplicate name or an empty request is a ValueError."""
        available = self.dense_outputs
        if outputs is None:
            return available
        requested = tuple(outputs)
        unknown = [name for name in requested if name not in available]
        if unknown or not requested or len(set(requested)) != len(requested):
            raise ValueError(
                f"outputs must name distinct outputs of this model, some of {available}; got {requested}"
            )
        return tuple(name for name in available if name in requested)

    def predict_dense(
        self, images: torch.Tensor, outputs: Optional[Sequence[str]] = None
    ) -> Dict[str, torch.Tensor]:
        """Dense predictions at input resolution for normalised images B x 3 x H x W.

        Args:
            outputs: the outputs to compute, some of :attr:`dense_outputs` (default: all). A head none
                of whose outputs is requested does not run (e.g. ``outputs=("sem_seg",)`` skips the
                instance head, whose batch-norm layers then see no batch either); the requested
                outputs are the same as in a prediction of all of them, the heads being independent.

        Returns:
            ``"sem_seg"``: B x C x H x W logits; with the instance head also ``"center"``:
            B x 1 x H x W heatmap and ``"offset"``: B x 2 x H x W (dy, dx) in input pixels; only the
            keys of ``outputs`` when given.
        """
        return self.decode_dense(self.extract_features(images), images.shape[-2:], outputs)

    def decode_dense(
        self, features: Dict[str, torch.Tensor], size: Tuple[int, int], outputs: Optional[Sequence[str]] = None
    ) -> Dict[str, torch.Tensor]:
        """The heads' predictions from backbone ``features``, upsampled to ``size`` (H, W); see
        :meth:`predict_dense`."""
        requested = self._requested_outputs(outputs)
        predictions = {}
        if "sem_seg" in requested:
            predictions["sem_seg"] = self.sem_seg_head(features)
        if "center" in requested or "offset" in requested:
            predictions["center"], predictions["offset"] = self.ins_embed_head(features)
        return {
            name: F.interpolate(predictions[name], size=size, mode="bilinear", align_corners=False)
            for name in requested
        }

    def losses_and_features(
        self, batched_inputs: List[Dict]
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Training losses (as :meth:`forward`) and the backbone features they were computed from
        (e.g. for a feature-distance loss), with a single backbone pass."""
        images = self.preprocess_image(batched_inputs).tensor
        features = self.extract_features(images)
        predictions = self.decode_dense(features, images.shape[-2:])
        return self.losses(predictions, batched_inputs), features

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: list of dicts with ``"image"`` and, in training, the targets
                ``"sem_seg"`` (H x W int64, 255 ignore), optional ``"sem_seg_weights"`` (H x W),
                ``"center"`` (1 x H x W), ``"center_weights"``, ``"offset"`` (2 x H x W),
                ``"offset_weights"`` (H x W), optional ``"center_class"`` (H x W int64, class of
                the instance whose Gaussian covers each pixel, 255 elsewhere; read with
                ``center_pixel_class="instance"``); at inference optional ``"height"``,
                ``"width"`` (output resolution).
        Returns:
            training: ``{"loss_sem_seg", "loss_center", "loss_offset"}`` (no instance losses in
            semantic-only mode; the GBW class weights they used: :meth:`gbw_class_weights`);
            inference: one dict per image with ``"sem_seg"`` (C x H x W logits), and with the
            instance head ``"panoptic_seg"`` ``(png, segments_info)`` and ``"instances"`` (see
            :meth:`postprocess`).
        """
        images = self.preprocess_image(batched_inputs)
        predictions = self.predict_dense(images.tensor)
        if self.training:
            return self.losses(predictions, batched_inputs)
        return self.postprocess(predictions, batched_inputs, images.image_sizes)

    def _batch_target(
        self, batched_inputs: List[Dict], key: str, size, pad_value: float = 0.0, channels: Tuple[int, ...] = (),
        default: float = 0.0,
    ) -> torch.Tensor:
        """Stack ``key`` of every input, padded with ``pad_value`` to ``size`` (H_pad, W_pad);
        inputs without ``key`` contribute ``channels`` x H x W filled with ``default``."""

        def target(x: Dict) -> torch.Tensor:
            if key in x:
                return x[key].to(self.device)
            return torch.full((*channels, *x["image"].shape[-2:]), default, device=self.device)

        return stack_padded([target(x) for x in batched_inputs], pad_value, size)

    def losses(self, predictions: Dict[str, torch.Tensor], batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        """Supervised losses of :meth:`predict_dense` outputs (for the padded batch of
        :meth:`preprocess_image`) against the targets of ``batched_inputs`` (padded likewise)."""
        size = predictions["sem_seg"].shape[-2:]
        if any("sem_seg" not in x for x in batched_inputs):
            raise ValueError("training inputs need a 'sem_seg' target (H x W int64) in every dict")
        labels = self._batch_target(batched_inputs, "sem_seg", size, self.ignore_value).long()
        sem_seg_weights = None
        if any("sem_seg_weights" in x for x in batched_inputs):
            sem_seg_weights = self._batch_target(batched_inputs, "sem_seg_weights", size, default=1.0).float()
        losses = {
            "loss_sem_seg": self.sem_seg_loss(predictions["sem_seg"], labels, sem_seg_weights)
            * self.sem_seg_loss_weight
        }
        if self.instance_on:
            center = self._batch_target(batched_inputs, "center", size, channels=(1,)).float()
            center_weights = self._batch_target(batched_inputs, "center_weights", size).float()
            offset = self._batch_target(batched_inputs, "offset", size, channels=(2,)).float()
            offset_weights = self._batch_target(batched_inputs, "offset_weights", size).float()
            center_class = self.center_pixel_classes(batched_inputs, size, labels)
            losses["loss_center"] = self.weighted_center_loss(
                self.center_loss, predictions["center"], center, center_class, center_weights
            )
            losses["loss_offset"] = (
                self.offset_loss(predictions["offset"], offset, labels, offset_weights) * self.offset_loss_weight
            )
        return losses

    def center_pixel_classes(self, batched_inputs: List[Dict], size, labels: torch.Tensor) -> torch.Tensor:
        """The class of each center-heatmap pixel for GBW (B x H x W, padded to ``size``): ``labels`` or,
        with ``center_pixel_class="instance"``, the ``"center_class"`` of the inputs where it is set."""
        if self.center_pixel_class != "instance":
            return labels
        # Inputs without "center_class" (e.g. mixed target images) keep the semantic labels.
        owner = self._batch_target(batched_inputs, "center_class", size, self.ignore_value, default=self.ignore_value)
        return torch.where(owner.long() == self.ignore_value, labels, owner.long())

    def weighted_center_loss(
        self,
        module: nn.Module,
        prediction: torch.Tensor,
        target: torch.Tensor,
        pixel_classes: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """``module``'s center loss x CENTER_LOSS_WEIGHT, replaced by 0 above ``center_loss_zero_above``."""
        loss = module(prediction, target, pixel_classes, weights) * self.center_loss_weight
        if self.center_loss_zero_above > 0:
            # EDAPS drops a diverging center loss; torch.where keeps it free of host syncs.
            loss = torch.where(loss > self.center_loss_zero_above, 0.0, loss)
        return loss

    def gbw_losses(self) -> Dict[str, nn.Module]:
        """The GBW loss modules by log name: ``sem_seg`` and, with the instance head, ``center``, ``offset``."""
        modules = {"sem_seg": self.sem_seg_loss}
        if self.instance_on:
            modules.update(center=self.center_loss, offset=self.offset_loss)
        return modules

    def gbw_class_weights(self) -> Dict[str, torch.Tensor]:
        """The class weights that the GBW losses of :meth:`gbw_losses` used in the last training pass, on
        the device: ``{"<loss>/<class name>": 0-dim float32 tensor}`` for each enabled loss and each
        class that shares its simplex (:func:`gbw_weight_entries`); empty with GBW off."""
        return gbw_weight_entries((name, module, self.class_names) for name, module in self.gbw_losses().items())

    def gbw_class_statistics(self) -> Dict[str, torch.Tensor]:
        """The per-class statistics of the last training pass's GBW cross-entropy, on the device
        (:func:`gbw_statistic_entries`); empty with GBW off."""
        return gbw_statistic_entries((name, module, self.class_names) for name, module in self.gbw_losses().items())

    def postprocess(
        self, predictions: Dict[str, torch.Tensor], batched_inputs: List[Dict], image_sizes: List[Tuple[int, int]]
    ) -> List[Dict]:
        """Per image: crop the padding, resize to ``height`` x ``width`` (offsets scaled by the resize
        factor) and, with the instance head, run the panoptic post-processing.

        Returns:
            one dict per image: ``"sem_seg"``: C x height x width logits; ``"panoptic_seg"``:
            ``(png, segments_info)`` with png height x width int32 (0 = void, else a segment id)
            and segments_info dicts ``id``, ``category_id`` (contiguous), ``isthing``, ``area``,
            ``panoptic_label``; ``"instances"``: Instances with ``pred_masks``, ``pred_classes``,
            ``scores`` (mean class probability x center score) and ``pred_boxes``.
        """
        results = []
        for index, (x, image_size) in enumerate(zip(batched_inputs, image_sizes)):
            height, width = x.get("height", image_size[0]), x.get("width", image_size[1])
            dense = self.resize_to_output(
                {name: value[index] for name, value in predictions.items()}, image_size, height, width
            )
            result = {"sem_seg": dense["sem_seg"]}
            if self.instance_on:
                panoptic = panoptic_segmentation(
                    dense["sem_seg"].argmax(dim=0),
                    dense["center"],
                    dense["offset"],
                    thing_ids=self.thing_ids,
                    label_divisor=self.label_divisor,
                    stuff_area=self.stuff_area,
                    void_label=_VOID,
                    threshold=self.center_threshold,
                    nms_kernel=self.nms_kernel,
                    top_k=self.top_k,
                )
                png, segments_info = panoptic_to_segments(panoptic, self.label_divisor, self.thing_ids, _VOID)
                result["panoptic_seg"] = (png, segments_info)
                result["instances"] = self._instances(png, segments_info, dense["sem_seg"], dense["center"][0])
            results.append(result)
        return results

    @staticmethod
    def resize_to_output(
        dense: Dict[str, torch.Tensor], image_size: Tuple[int, int], height: int, width: int
    ) -> Dict[str, torch.Tensor]:
        """Crop one image's dense predictions (K x H_pad x W_pad) to its ``image_size`` and resize
        them bilinearly to ``height`` x ``width``; ``"offset"`` (dy, dx in input pixels) is also
        multiplied by the resize factors ``height / image_size[0]`` and ``width / image_size[1]``."""
        resized = {name: sem_seg_postprocess(value, image_size, height, width) for name, value in dense.items()}
        if "offset" in resized:
            scale = torch.tensor([height / image_size[0], width / image_size[1]], device=resized["offset"].device)
            resized["offset"] = resized["offset"] * scale.to(resized["offset"].dtype).view(2, 1, 1)
        return resized

    def _instances(
        self, png: torch.Tensor, segments_info: List[Dict], sem_seg: torch.Tensor, center: torch.Tensor
    ) -> Instances:
        """Thing segments as Detectron2 Instances (Panoptic-DeepLab scoring)."""
        height, width = png.shape
        instances = Instances((height, width))
        things = [s for s in segments_info if s["isthing"]]
        masks = torch.zeros((len(things), height, width), dtype=torch.bool, device=png.device)
        for mask, segment in zip(masks, things):
            mask.copy_(png == segment["id"])
        classes = torch.tensor([s["category_id"] for s in things], dtype=torch.int64, device=png.device)
        probabilities = F.softmax(sem_seg, dim=0)
        scores = []
        for mask, class_id in zip(masks, classes.tolist()):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            center_score = center[int(ys.float().mean()), int(xs.float().mean())]
            scores.append(probabilities[class_id][mask].mean() * center_score)
        instances.pred_masks = masks
        instances.pred_classes = classes
        instances.scores = torch.stack(scores) if scores else torch.zeros(0, device=png.device)
        instances.pred_boxes = BitMasks(masks).get_bounding_boxes()
        return instances
