"""What the output-space adversarial methods (AdvEnt, AdvSeg) share: the domain labels, the
discriminator, and their base class (the discriminator with its own optimizer and schedule)."""
from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn

from detectron2.config import configurable
from detectron2.utils import comm

from .method import UDAMethod

__all__ = ["OutputSpaceDiscriminator", "OutputSpaceAdversarial", "SOURCE_DOMAIN", "TARGET_DOMAIN"]

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
