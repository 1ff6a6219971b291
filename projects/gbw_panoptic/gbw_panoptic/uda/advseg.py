"""AdvSeg (Tsai et al., "Learning to Adapt Structured Output Space", CVPR 2018) as DAFormer's code base
runs it (HRDA's ``mmseg/models/uda/advseg.py`` and ``configs/_base_/uda/advseg.py``; DAFormer's own
repository does not include it): an output-space discriminator on the softmax maps of the semantic
predictions.

Per iteration, in the reference's order: the supervised source losses (GBW-weighted when ``MODEL.GBW.*``
is on) and their backward; ``UDA.ADVSEG.LOSS_WEIGHT`` times the loss of the frozen discriminator
labelling the target softmax maps as source, backward into the student; then the discriminator learns
source (0) vs target (1) on the detached maps of the same two forwards, each term halved. The reference
adds an auxiliary term (weight 0.0002, its own discriminator) only for segmentors with an auxiliary
head; its DeepLabV2 and DAFormer models have none, and neither has this model, so only the main term
exists here as there.
"""
from typing import List

import torch
import torch.nn.functional as F

from detectron2.config import CfgNode

from .adversarial import SOURCE_DOMAIN, TARGET_DOMAIN, OutputSpaceAdversarial, OutputSpaceDiscriminator
from .method import UDA_METHOD_REGISTRY, StepOutput, build_feature_distance, gbw_weights
from ..utils.padding import stack_padded
from .runner import StudentRunner, stack_images

__all__ = ["AdvSeg", "gan_loss", "poly_lr_scheduler"]


def gan_loss(domain_logits: torch.Tensor, domain: float) -> torch.Tensor:
    """Least-squares GAN loss (the reference's ``discriminator_type`` 'LS', its default): mean squared
    difference of the raw discriminator outputs ``B x 1 x h x w`` and the domain label (0 source, 1 target)."""
    return F.mse_loss(domain_logits, torch.full_like(domain_logits, domain))


def poly_lr_scheduler(
    optimizer: torch.optim.Optimizer, max_iter: int, power: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate ``base_lr * (1 - iteration / max_iter) ** power``, no warm-up (the reference's
    ``adjust_learning_rate_D`` with ``lr_D_min`` 0); 0 from ``max_iter`` on."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda iteration: max(0.0, 1.0 - iteration / max_iter) ** power)


def _softmax_maps(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``B x C x H x W`` (float32) of ``logits``, zero where ``valid`` (B x H x W) is False."""
    return F.softmax(logits.float(), dim=1) * valid[:, None]


@UDA_METHOD_REGISTRY.register()
class AdvSeg(OutputSpaceAdversarial):
    """Source losses plus ``UDA.ADVSEG.LOSS_WEIGHT`` times the least-squares GAN loss of the discriminator
    on the target softmax maps labelled as source; the discriminator (:class:`OutputSpaceDiscriminator`,
    ``UDA.ADVSEG.DISC_CHANNELS``) has its own Adam (``UDA.ADVSEG.DISC_LR``, betas 0.9/0.99) with a
    polynomial schedule of power ``UDA.ADVSEG.DISC_LR_POWER`` over ``SOLVER.MAX_ITER``, no warm-up.

    The discriminator sees the source predictions of the supervised forward (no second source pass), so
    the feature distance (``UDA.FD``, a DAFormer component the reference AdvSeg does not use) is not
    supported.
    """

    config_name = "advseg"

    @classmethod
    def from_config(cls, cfg: CfgNode, model) -> dict:
        if build_feature_distance(cfg, model) is not None:
            raise ValueError(
                f"UDA.METHOD 'advseg' does not use the feature distance, but UDA.FD.WEIGHT={cfg.UDA.FD.WEIGHT} "
                "with pretrained weights switches it on; set UDA.FD.WEIGHT 0"
            )
        node = cfg.UDA.ADVSEG
        discriminator = OutputSpaceDiscriminator(model.num_classes, node.DISC_CHANNELS).to(model.device)
        disc_optimizer = torch.optim.Adam(discriminator.parameters(), lr=node.DISC_LR, betas=(0.9, 0.99))
        return {
            "feature_distance": None,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "discriminator": discriminator,
            "disc_optimizer": disc_optimizer,
            "disc_scheduler": poly_lr_scheduler(disc_optimizer, cfg.SOLVER.MAX_ITER, node.DISC_LR_POWER),
            "loss_weight": node.LOSS_WEIGHT,
        }

    def run_step(
        self, runner: StudentRunner, source_batch: List[dict], target_batch: List[dict], iteration: int
    ) -> StepOutput:
        device = runner.model.device
        source_losses, source_dense = runner.losses_and_dense(source_batch)
        source_weights = gbw_weights(runner.model, "source")
        runner.backward(sum(source_losses.values()))
        losses = {name: value.detach() for name, value in source_losses.items()}

        # Student: make the target softmax maps look like source ones (discriminator frozen).
        self.discriminator.requires_grad_(False)
        target_images, target_valid = stack_images(target_batch, device)
        target_maps = _softmax_maps(runner.predict_dense(target_images)["sem_seg"], target_valid)
        loss_adv = self.loss_weight * gan_loss(self.discriminator(target_maps), SOURCE_DOMAIN)
        runner.backward(loss_adv)
        losses["loss_adv"] = loss_adv.detach()

        # Discriminator: source maps -> 0, target maps -> 1, on the detached predictions above.
        self.discriminator.requires_grad_(True)
        source_logits = source_dense["sem_seg"].detach()
        source_valid = [torch.ones(x["image"].shape[-2:], dtype=torch.bool, device=device) for x in source_batch]
        source_maps = _softmax_maps(source_logits, stack_padded(source_valid, False, source_logits.shape[-2:]))
        disc_source = gan_loss(self.discriminator(source_maps), SOURCE_DOMAIN) / 2
        disc_target = gan_loss(self.discriminator(target_maps.detach()), TARGET_DOMAIN) / 2
        runner.backward(disc_source + disc_target)
        self.average_discriminator_gradients()
        metrics = {
            "advseg/disc_loss_source": float(disc_source.detach()),
            "advseg/disc_loss_target": float(disc_target.detach()),
        }
        return StepOutput(losses, metrics, source_weights)
