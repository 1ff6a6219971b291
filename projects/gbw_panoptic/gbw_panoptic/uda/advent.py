"""AdvEnt (Vu et al., CVPR 2019): adversarial alignment of the entropy maps of source and target
predictions with an output-space discriminator that has its own optimizer."""
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from detectron2.config import CfgNode, configurable
from detectron2.utils import comm

from .method import UDA_METHOD_REGISTRY, StepOutput, UDAMethod
from .minent import entropy_map
from .optim import build_lr_scheduler
from .runner import StudentRunner, stack_images

__all__ = ["EntropyDiscriminator", "AdvEnt"]

SOURCE_DOMAIN = 0.0
TARGET_DOMAIN = 1.0


class EntropyDiscriminator(nn.Module):
    """AdvEnt's fully convolutional discriminator: five 4x4 stride-2 convolutions with leaky ReLU.

    Input ``B x C x H x W`` entropy maps (zero on padding); output ``B x 1 x H/32 x W/32`` domain logits (target = 1).
    """

    def __init__(self, num_classes: int, channels: int = 64):
        super().__init__()
        widths = [num_classes, channels, channels * 2, channels * 4, channels * 8]
        layers: List[nn.Module] = []
        for in_channels, out_channels in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=2, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, entropy: torch.Tensor) -> torch.Tensor:
        return self.layers(entropy)


def _domain_loss(domain_logits: torch.Tensor, domain: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(domain_logits, torch.full_like(domain_logits, domain))


@UDA_METHOD_REGISTRY.register()
class AdvEnt(UDAMethod):
    """Source losses, plus ``UDA.ADVENT.LOSS_WEIGHT`` times the loss of fooling the discriminator with the
    target entropy maps; the discriminator learns to tell source (0) from target (1) entropy maps.

    The discriminator has its own Adam optimizer (``UDA.ADVENT.DISC_LR``, betas 0.9/0.99) with the
    student's schedule; under DDP its gradients are averaged across processes.
    """

    config_name = "advent"

    @configurable
    def __init__(
        self,
        *,
        discriminator: nn.Module,
        disc_optimizer: torch.optim.Optimizer,
        disc_scheduler: torch.optim.lr_scheduler.LRScheduler,
        loss_weight: float,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.discriminator = discriminator
        self.disc_optimizer = disc_optimizer
        self.disc_scheduler = disc_scheduler
        self.loss_weight = loss_weight

    @classmethod
    def from_config(cls, cfg: CfgNode, model) -> dict:
        ret = super().from_config(cfg, model)
        discriminator = EntropyDiscriminator(model.num_classes, cfg.UDA.ADVENT.DISC_CHANNELS).to(model.device)
        disc_optimizer = torch.optim.Adam(discriminator.parameters(), lr=cfg.UDA.ADVENT.DISC_LR, betas=(0.9, 0.99))
        ret.update(
            discriminator=discriminator,
            disc_optimizer=disc_optimizer,
            disc_scheduler=build_lr_scheduler(cfg, disc_optimizer),
            loss_weight=cfg.UDA.ADVENT.LOSS_WEIGHT,
        )
        return ret

    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        return {"discriminator": self.disc_optimizer}

    def schedulers(self) -> Dict[str, torch.optim.lr_scheduler.LRScheduler]:
        return {"discriminator": self.disc_scheduler}

    def run_step(
        self, runner: StudentRunner, source_batch: List[dict], target_batch: List[dict], iteration: int
    ) -> StepOutput:
        losses = self.source_step(runner, source_batch)
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
        if comm.get_world_size() > 1:
            for param in self.discriminator.parameters():
                dist.all_reduce(param.grad)
                param.grad.div_(comm.get_world_size())
        return losses, {
            "advent/disc_loss_source": float(disc_source.detach()),
            "advent/disc_loss_target": float(disc_target.detach()),
        }
