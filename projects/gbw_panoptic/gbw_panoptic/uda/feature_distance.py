"""ImageNet feature distance (DAFormer): keeps the encoder's features of selected classes (thing classes)
close to those of the frozen initial (pretrained) encoder, so that source training does not erase what
the pretraining learned about them."""
import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.padding import pad_to

__all__ = ["downscale_labels", "FeatureDistance"]


def downscale_labels(
    labels: torch.Tensor, factor: int, num_classes: int, min_ratio: float, ignore_value: int = 255
) -> torch.Tensor:
    """Labels of ``factor x factor`` cells: the majority class of each cell, or ``ignore_value`` when that
    class covers less than ``min_ratio`` of the cell (or the majority is void).

    Args:
        labels: int64 ``B x H x W`` with ``H`` and ``W`` divisible by ``factor``.
    Returns:
        int64 ``B x H/factor x W/factor``.
    """
    if labels.shape[-2] % factor or labels.shape[-1] % factor:
        raise ValueError(f"label size {tuple(labels.shape[-2:])} is not divisible by the feature stride {factor}")
    void = num_classes  # void as an extra class, so it can be the majority
    labels = torch.where(labels == ignore_value, torch.full_like(labels, void), labels)
    one_hot = F.one_hot(labels, num_classes + 1).permute(0, 3, 1, 2).float()
    ratios = F.avg_pool2d(one_hot, kernel_size=factor)
    best_ratio, majority = ratios.max(dim=1)
    majority[(majority == void) | (best_ratio < min_ratio)] = ignore_value
    return majority


class FeatureDistance(nn.Module):
    """Feature distance loss against a frozen copy of the initial encoder.

    Args:
        model: the student meta-architecture (copied and frozen at construction; it must provide
            ``extract_features``).
        feature_name: which encoder output to compare (e.g. ``"res5"``, the deepest stage).
        classes: contiguous class ids whose pixels are compared (the thing classes).
        num_classes: number of semantic classes.
        min_ratio: a feature cell counts as class ``c`` when ``c`` covers at least this fraction of it.
        weight: loss weight (0.005 in the reference).
    """

    def __init__(
        self,
        model: nn.Module,
        feature_name: str,
        classes: Sequence[int],
        num_classes: int,
        min_ratio: float = 0.75,
        weight: float = 0.005,
        ignore_value: int = 255,
    ):
        super().__init__()
        self.frozen_model = copy.deepcopy(model).eval()
        for param in self.frozen_model.parameters():
            param.requires_grad_(False)
        self.feature_name = feature_name
        self.register_buffer("classes", torch.as_tensor(list(classes), dtype=torch.long), persistent=False)
        self.num_classes = num_classes
        self.min_ratio = min_ratio
        self.weight = weight
        self.ignore_value = ignore_value

    def train(self, mode: bool = True) -> "FeatureDistance":
        """The frozen encoder always runs in eval mode."""
        return super().train(False)

    def forward(self, features: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Weighted mean L2 distance between ``features`` and the frozen features on selected-class cells.

        Args:
            features: student encoder features ``B x C x h x w`` of ``images``.
            images: normalised (padded) images ``B x 3 x H x W`` the features were computed from.
            labels: int64 ``B x H0 x W0`` (H0 <= H, W0 <= W; padded here with void).
        Returns:
            scalar loss; 0 (still connected to ``features``) when no cell holds a selected class.
        """
        with torch.no_grad():
            frozen = self.frozen_model.extract_features(images)[self.feature_name]
        labels = pad_to(labels, images.shape[-2:], self.ignore_value)
        factor = images.shape[-1] // features.shape[-1]
        cell_labels = downscale_labels(labels, factor, self.num_classes, self.min_ratio, self.ignore_value)
        mask = torch.isin(cell_labels, self.classes)
        distance = torch.linalg.vector_norm(features.float() - frozen.float(), dim=1)
        if not mask.any():
            return features.sum() * 0.0
        return self.weight * distance[mask].mean()
