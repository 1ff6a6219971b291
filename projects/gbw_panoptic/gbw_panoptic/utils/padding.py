"""Bottom/right padding of image-shaped tensors to a common size, for the models' batches and the UDA
methods' (training crops can be smaller than ``INPUT.CROP.SIZE`` when the resized image is)."""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["pad_to", "stack_padded"]


def pad_to(tensor: torch.Tensor, size: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """``... x H x W`` padded at the bottom and right with ``value`` to ``size`` (H_pad, W_pad)."""
    return F.pad(tensor, (0, size[1] - tensor.shape[-1], 0, size[0] - tensor.shape[-2]), value=value)


def stack_padded(tensors: List[torch.Tensor], value: float = 0.0, size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Stack ``... x H_i x W_i`` tensors into ``B x ... x H x W``, each :func:`pad_to` ``size`` (default: the
    largest height and width of the list)."""
    size = size or (max(t.shape[-2] for t in tensors), max(t.shape[-1] for t in tensors))
    return torch.stack([pad_to(t, size, value) for t in tensors])
