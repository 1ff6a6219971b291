"""MinEnt (Vu et al., CVPR 2019): entropy minimisation of the student's predictions on target images."""
from typing import List

from detectron2.config import CfgNode, configurable

from .entropy import entropy_loss
from .method import UDA_METHOD_REGISTRY, StepOutput, UDAMethod
from .runner import StudentRunner, stack_images

__all__ = ["MinEnt"]


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
        source = self.source_step(runner, source_batch)
        losses = source.losses
        target_images, target_valid = stack_images(target_batch, runner.model.device)
        target_entropy = entropy_loss(runner.predict_dense(target_images)["sem_seg"], target_valid)
        loss_entropy = self.loss_weight * target_entropy
        runner.backward(loss_entropy)
        losses["loss_entropy"] = loss_entropy.detach()
        return StepOutput(losses, {"minent/target_entropy": float(target_entropy.detach())}, source.gbw_weights)
