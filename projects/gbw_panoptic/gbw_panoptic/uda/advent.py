"""Output-space adversarial adaptation: the discriminator shared by AdvEnt and AdvSeg, their common base
(discriminator with its own optimizer and schedule), and AdvEnt (Vu et al., CVPR 2019): adversarial
alignment of the entropy maps of source and target predictions."""
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

__all__ = ["OutputSpaceDiscriminator", "OutputSpaceAdversarial", "AdvEnt", "SOURCE_DOMAIN", "TARGET_DOMAIN"]

SOURCE_DOMAIN = 0.0
TARGET_DOMAIN = 1.0


class OutputSpaceDiscriminator(nn.Module):
    """The fully convolutional discriminator of AdaptSegNet and AdvEnt: four 4x4 stride-2 convolutions
    (``channels`` x 1, 2, 4, 8) with leaky ReLU (slope 0.2), then a 4x4 stride-2 convolution to one channel.

    Input ``B x C x H x W`` per-class maps (entropy or softmax; zero on padding); output
    ``B x 1 x H/32 x W/32`` domain logits (target = 1).
    """

    def __init__(self, num_classes: int, channels: int = 64):
        super().__init__()
        widths = [num_classes, channels, channels * 2, channels * 4, channels * 8]
        layers: List[nn.Module] = []
        for in_channels, out_channels in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=2, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.layers(maps)


def _domain_loss(domain_logits: torch.Tensor, domain: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(domain_logits, torch.full_like(domain_logits, domain))


class OutputSpaceAdversarial(UDAMethod):
    """Base of the output-space adversarial methods: source losses plus ``loss_weight`` times the loss of
    fooling ``discriminator`` with target maps; the discriminator has its own optimizer and schedule
    (stepped by the trainer), and under DDP its gradients are averaged across processes
    (:meth:`average_discriminator_gradients`)."""

    semantic_only_pass = True  # the adversarial loss of the target's semantic maps

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

    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        return {"discriminator": self.disc_optimizer}

    def schedulers(self) -> Dict[str, torch.optim.lr_scheduler.LRScheduler]:
        return {"discriminator": self.disc_scheduler}

    def average_discriminator_gradients(self) -> None:
        """Average the discriminator's gradients across processes (a no-op in a single process)."""
        if comm.get_world_size() > 1:
            for param in self.discriminator.parameters():
                dist.all_reduce(param.grad)
                param.grad.div_(comm.get_world_size())


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
        self.average_discriminator_gradients()
        return losses, {
            "advent/disc_loss_source": float(disc_source.detach()),
            "advent/disc_loss_target": float(disc_target.detach()),
        }
