"""MinEnt (Vu et al., CVPR 2019): entropy minimisation of the student's predictions on target images."""
import math
from typing import List, Optional

import torch
import torch.nn.functional as F

from detectron2.config import CfgNode, configurable

from .method import UDA_METHOD_REGISTRY, StepOutput, UDAMethod
from .runner import StudentRunner, stack_images

__all__ = ["entropy_map", "entropy_loss", "MinEnt"]


def entropy_map(logits: torch.Tensor) -> torch.Tensor:
    """Weighted self-information ``-p log p / log C`` per class (AdvEnt's discriminator input).

    Args:
        logits: ``B x C x H x W`` (computed in float32 whatever their dtype).
    Returns:
        float32 ``B x C x H x W``; summed over classes it is the normalised entropy in [0, 1].
    """
    log_probs = F.log_softmax(logits.float(), dim=1)
    return -(log_probs.exp() * log_probs) / math.log(logits.shape[1])


def entropy_loss(logits: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean normalised pixel entropy of ``logits`` (``B x C x H x W``), a scalar in [0, 1].

    ``valid`` (bool ``B x H x W``, False on padding) restricts the mean to real pixels.
    """
    entropy = entropy_map(logits).sum(dim=1)
    if valid is None:
        return entropy.mean()
    return (entropy * valid).sum() / valid.sum().clamp(min=1)


@UDA_METHOD_REGISTRY.register()
class MinEnt(UDAMethod):
    """Source losses plus ``UDA.MINENT.LOSS_WEIGHT`` times the entropy of the target predictions."""

    config_name = "minent"
    semantic_only_pass = True  # the entropy of the target's semantic predictions

    @configurable
    def __init__(self, *, loss_weight: float, **kwargs):
        super().__init__(**kwargs)
        self.loss_weight = loss_weight

    @classmethod
    def from_config(cls, cfg: CfgNode, model) -> dict:
        ret = super().from_config(cfg, model)
        ret["loss_weight"] = cfg.UDA.MINENT.LOSS_WEIGHT
        return ret

    def run_step(
        self, runner: StudentRunner, source_batch: List[dict], target_batch: List[dict], iteration: int
    ) -> StepOutput:
        losses = self.source_step(runner, source_batch)
        target_images, target_valid = stack_images(target_batch, runner.model.device)
        target_entropy = entropy_loss(runner.predict_dense(target_images)["sem_seg"], target_valid)
        loss_entropy = self.loss_weight * target_entropy
        runner.backward(loss_entropy)
        losses["loss_entropy"] = loss_entropy.detach()
        return losses, {"minent/target_entropy": float(target_entropy.detach())}
