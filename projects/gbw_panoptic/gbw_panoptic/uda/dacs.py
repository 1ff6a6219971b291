"""DACS self-training (Tranheden et al., WACV 2021, as in DAFormer/HRDA/EDAPS).

Per iteration: supervised source losses; the EMA teacher predicts pseudo-labels on the target crops;
ClassMix pastes half of the classes of the source batch onto each target image (image, semantic labels,
pixel weights and, with ``UDA.MIX_INSTANCES``, the instance targets of the pasted pixels); colour jitter
and blur; the student trains on the mixed batch through the model's normal forward (GBW weights logged
under ``gbw/mixed``). The defaults are those of the reference code (DAFormer/EDAPS ``dacs.py``); the
project's README compares every setting with it.
"""
import logging
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from detectron2.config import CfgNode, configurable

from .augment import class_mix_masks, mix, strong_augment
from .method import UDA_METHOD_REGISTRY, StepOutput, UDAMethod, gbw_weights, stack_field
from .runner import StudentRunner, common_size, stack_images
from .teacher import EMATeacher

__all__ = ["PseudoLabels", "pseudo_labels", "DACS"]

logger = logging.getLogger(__name__)

# Instance targets pasted with their source pixels (UDA.MIX_INSTANCES).
INSTANCE_FIELDS = ("center", "center_weights", "offset", "offset_weights")


class PseudoLabels(NamedTuple):
    """Teacher pseudo-labels of a target batch (see :func:`pseudo_labels`)."""

    labels: torch.Tensor  # int64 B x H x W
    weights: torch.Tensor  # float32 B x H x W, in [0, 1]
    confidence: torch.Tensor  # float32 B: the weight of each image (fraction of confident pixels)
    max_probs: torch.Tensor  # float32 B x H x W


def pseudo_labels(
    logits: torch.Tensor,
    threshold: float,
    ignore_top: int = 0,
    ignore_bottom: int = 0,
    valid: Optional[torch.Tensor] = None,
    ignore_value: int = 255,
) -> PseudoLabels:
    """Hard pseudo-labels and their per-pixel weights from teacher logits.

    The weight is the fraction of pixels whose maximum probability is at least ``threshold``, counted
    over the whole batch (one scalar for every image, as the reference code; with several processes
    over the batches of all of them, so that it equals the single-process value of the whole batch),
    set to 0 on the ``ignore_top`` first and the ``ignore_bottom`` last rows (absolute row counts,
    clipped to the image height).

    Args:
        logits: ``B x C x H x W`` (softmax computed in float32).
        valid: optional bool ``B x H x W``, False on padding: those pixels are labelled
            ``ignore_value`` (so that they enter no loss and no GBW class statistic), get weight 0 and
            do not count in the confident fraction.
    """
    probs = torch.softmax(logits.float(), dim=1)
    max_probs, labels = probs.max(dim=1)
    if valid is None:
        valid = torch.ones_like(labels, dtype=torch.bool)
    else:
        labels = labels.masked_fill(~valid, ignore_value)
    confident = (max_probs >= threshold) & valid
    counts = torch.stack([confident.sum(), valid.sum()]).float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    fraction = counts[0] / counts[1].clamp(min=1)
    confidence = fraction.expand(labels.shape[0]).float()
    weights = confidence[:, None, None] * valid
    height = weights.shape[1]
    weights[:, : min(ignore_top, height)] = 0
    weights[:, max(height - ignore_bottom, 0) :] = 0
    return PseudoLabels(labels, weights, confidence, max_probs)


@UDA_METHOD_REGISTRY.register()
class DACS(UDAMethod):
    """DACS with an EMA teacher (``UDA.EMA_ALPHA``), confidence-weighted pseudo-labels
    (``UDA.PSEUDO_THRESHOLD``, ``UDA.PSEUDO_WEIGHT_IGNORE_TOP/BOTTOM``), ClassMix and strong colour
    augmentation (``UDA.COLOR_JITTER_*``) with blur."""

    config_name = "dacs"

    @configurable
    def __init__(
        self,
        *,
        teacher: EMATeacher,
        pseudo_threshold: float,
        ignore_top: int,
        ignore_bottom: int,
        jitter_strength: float,
        jitter_probability: float,
        mix_instances: bool,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.teacher = teacher
        self.pseudo_threshold = pseudo_threshold
        self.ignore_top = ignore_top
        self.ignore_bottom = ignore_bottom
        self.jitter_strength = jitter_strength
        self.jitter_probability = jitter_probability
        self.mix_instances = mix_instances
        self._padding_logged = False

    @classmethod
    def from_config(cls, cfg: CfgNode, model: nn.Module) -> dict:
        ret = super().from_config(cfg, model)
        ret.update(
            teacher=EMATeacher(model, cfg.UDA.EMA_ALPHA),
            pseudo_threshold=cfg.UDA.PSEUDO_THRESHOLD,
            ignore_top=cfg.UDA.PSEUDO_WEIGHT_IGNORE_TOP,
            ignore_bottom=cfg.UDA.PSEUDO_WEIGHT_IGNORE_BOTTOM,
            jitter_strength=cfg.UDA.COLOR_JITTER_STRENGTH,
            jitter_probability=cfg.UDA.COLOR_JITTER_PROB,
            mix_instances=cfg.UDA.MIX_INSTANCES,
        )
        return ret

    def before_step(self, model: nn.Module, iteration: int) -> None:
        """Average the student into the teacher (from iteration 1 on; the teacher starts as a copy)."""
        if iteration > 0:
            self.teacher.update(model, iteration)

    def mixed_batch(
        self, source_batch: List[dict], target_images: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
    ) -> Tuple[List[dict], torch.Tensor]:
        """ClassMix of the source batch onto the target images, then strong augmentation.

        Source crops smaller than the target batch's size are padded (void labels, zero weights).

        Args:
            target_images: float ``B x 3 x H x W``, 0-255.
            labels, weights: pseudo-labels and their weights, ``B x H x W``.
        Returns:
            the mixed training dicts (``image``, ``sem_seg``, ``sem_seg_weights``, ``height``, ``width``
            and, with ``mix_instances``, the source instance targets with weights restricted to the
            pasted pixels) and the bool ClassMix masks ``B x H x W``.
        """
        device, size = target_images.device, tuple(target_images.shape[-2:])
        source_images, _ = stack_images(source_batch, device, size)
        source_labels = stack_field(source_batch, "sem_seg", device, self.ignore_value, size)
        source_weights = stack_field(source_batch, "sem_seg_weights", device, 0.0, size).float()
        masks = class_mix_masks(source_labels)
        images = strong_augment(mix(masks, source_images, target_images), self.jitter_strength, self.jitter_probability)
        mixed_labels = mix(masks, source_labels, labels)
        mixed_weights = mix(masks, source_weights, weights)
        mixed = [
            {"image": image, "sem_seg": label, "sem_seg_weights": weight, "height": size[0], "width": size[1]}
            for image, label, weight in zip(images, mixed_labels, mixed_weights)
        ]
        if self.mix_instances and all(field in x for x in source_batch for field in INSTANCE_FIELDS):
            pasted = masks.float()
            center = stack_field(source_batch, "center", device, 0.0, size)
            offset = stack_field(source_batch, "offset", device, 0.0, size)
            center_weights = stack_field(source_batch, "center_weights", device, 0.0, size) * pasted
            offset_weights = stack_field(source_batch, "offset_weights", device, 0.0, size) * pasted
            for index, record in enumerate(mixed):
                record.update(
                    center=center[index],
                    offset=offset[index],
                    center_weights=center_weights[index],
                    offset_weights=offset_weights[index],
                )
        return mixed, masks

    def _log_padding(self, teacher_logits: torch.Tensor, valid: torch.Tensor, iteration: int) -> None:
        """Log, once per run, the share of padded pixels in the target batch and the classes of the
        teacher's argmax there: what they would be as pseudo-labels (they are ignored instead)."""
        padding = ~valid
        counts = torch.bincount(teacher_logits.argmax(dim=1)[padding], minlength=teacher_logits.shape[1])
        share = {c: n for c, n in enumerate(counts.tolist()) if n > 0}
        logger.info(
            "Iteration %d: %.1f %% of the target batch is padding (ignored in the pseudo-labels and GBW's "
            "class statistics); the teacher's argmax there, class: pixels: %s",
            iteration, 100.0 * float(padding.float().mean()), share,
        )
        self._padding_logged = True

    def run_step(
        self, runner: StudentRunner, source_batch: List[dict], target_batch: List[dict], iteration: int
    ) -> StepOutput:
        source = self.source_step(runner, source_batch)
        losses = source.losses
        device = runner.model.device
        size = common_size(source_batch + target_batch)
        target_images, target_valid = stack_images(target_batch, device, size)
        with torch.no_grad(), runner.autocast():
            teacher_logits = self.teacher.predict_sem_seg(runner.normalize(target_images))
        pseudo = pseudo_labels(
            teacher_logits,
            self.pseudo_threshold,
            self.ignore_top,
            self.ignore_bottom,
            valid=target_valid,
            ignore_value=self.ignore_value,
        )
        if not self._padding_logged and any(tuple(x["image"].shape[-2:]) != size for x in target_batch):
            self._log_padding(teacher_logits, target_valid, iteration)
        pseudo_weights = pseudo.weights
        if all("pseudo_label_valid" in x for x in target_batch):
            # UDA.PSEUDO_LABEL_MARGINS (HRDA): margins of the whole image, cropped with it by the mapper.
            pseudo_weights = pseudo_weights * stack_field(target_batch, "pseudo_label_valid", device, 0, size)
        mixed, masks = self.mixed_batch(source_batch, target_images, pseudo.labels, pseudo_weights)
        mixed_losses = runner.losses(mixed)
        mixed_weights = gbw_weights(runner.model, "mixed")
        runner.backward(sum(mixed_losses.values()))
        for name, value in mixed_losses.items():
            losses[name.replace("loss_", "loss_mix_", 1)] = value.detach()
        metrics: Dict[str, float] = {
            "dacs/pseudo_confidence": float(pseudo.confidence.mean()),
            "dacs/pseudo_max_prob": float(pseudo.max_probs.mean()),
            "dacs/mixed_fraction": float(masks.float().mean()),
        }
        return StepOutput(losses, metrics, {**source.gbw_weights, **mixed_weights})
