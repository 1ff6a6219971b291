"""Entropy of class predictions: the maps AdvEnt's discriminator sees and the loss MinEnt minimises."""
import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["entropy_map", "entropy_loss"]


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
