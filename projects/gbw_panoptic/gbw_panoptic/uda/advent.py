"""AdvEnt (Vu et al., CVPR 2019): adversarial alignment of the entropy maps of source and target
predictions, on the output-space discriminator of :mod:`.adversarial`."""
from typing import List

import torch
import torch.nn.functional as F

from detectron2.config import CfgNode

from .adversarial import SOURCE_DOMAIN, TARGET_DOMAIN, OutputSpaceAdversarial, OutputSpaceDiscriminator
from .entropy import entropy_map
from .method import UDA_METHOD_REGISTRY, StepOutput
from .optim import build_lr_scheduler
from .runner import StudentRunner, stack_images

__all__ = ["AdvEnt"]


def _domain_loss(domain_logits: torch.Tensor, domain: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(domain_logits, torch.full_like(domain_logits, domain))


@UDA_METHOD_REGISTRY.register()
class AdvEnt(OutputSpaceAdversarial):
    """Source losses, plus ``UDA.ADVENT.LOSS_WEIGHT`` times the loss of fooling the discriminator with the
    target entropy maps; the discriminator learns to tell source (0) from target (1) entropy maps.

    The discriminator has its own Adam optimizer (``UDA.ADVENT.DISC_LR``, betas 0.9/0.99) with the
    student's schedule; under DDP its gradients are averaged across processes.
    """

    config_name = "advent"

    @classmethod
    def from_config(cls, cfg: CfgNode, model) -> dict:
        ret = super().from_config(cfg, model)
        discriminator = OutputSpaceDiscriminator(model.num_classes, cfg.UDA.ADVENT.DISC_CHANNELS).to(model.device)
        disc_optimizer = torch.optim.Adam(discriminator.parameters(), lr=cfg.UDA.ADVENT.DISC_LR, betas=(0.9, 0.99))
        ret.update(
            discriminator=discriminator,
            disc_optimizer=disc_optimizer,
            disc_scheduler=build_lr_scheduler(cfg, disc_optimizer),
            loss_weight=cfg.UDA.ADVENT.LOSS_WEIGHT,
        )
        return ret

    def run_step(
        self, runner: StudentRunner, source_batch: List[dict], target_batch: List[dict], iteration: int
    ) -> StepOutput:
        source = self.source_step(runner, source_batch)
        losses = source.losses
        device = runner.model.device

        # Student: make the target entropy maps look like source ones (discriminator frozen).
        self.discriminator.requires_grad_(False)
        target_images, target_valid = stack_images(target_batch, device)
        target_entropy = entropy_map(runner.predict_dense(target_images)["sem_seg"]) * target_valid[:, None]
        loss_adv = self.loss_weight * _domain_loss(self.discriminator(target_entropy), SOURCE_DOMAIN)
        runner.backward(loss_adv)
        losses["loss_adv"] = loss_adv.detach()

        # Discriminator: source maps -> 0, target maps -> 1, on detached predictions.
        self.discriminator.requires_grad_(True)
        source_images, source_valid = stack_images(source_batch, device)
        with torch.no_grad(), runner.autocast():
            source_logits = runner.model.predict_dense(runner.normalize(source_images))["sem_seg"]
        source_entropy = entropy_map(source_logits) * source_valid[:, None]
        disc_source = _domain_loss(self.discriminator(source_entropy), SOURCE_DOMAIN) / 2
        disc_target = _domain_loss(self.discriminator(target_entropy.detach()), TARGET_DOMAIN) / 2
        runner.backward(disc_source + disc_target)
        self.average_discriminator_gradients()
        metrics = {
            "advent/disc_loss_source": float(disc_source.detach()),
            "advent/disc_loss_target": float(disc_target.detach()),
        }
        return StepOutput(losses, metrics, source.gbw_weights)
