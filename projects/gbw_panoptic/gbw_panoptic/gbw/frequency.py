"""Static class weights from class frequencies: the classical baseline that GBW's per-step weights
replace.

Median frequency balancing (Eigen & Fergus, "Predicting Depth, Surface Normals and Semantic Labels
with a Common Multi-Scale Convolutional Architecture", ICCV 2015; SegNet's class balancing)::

    f_c = n_c / sum_k n_k          (fraction of the labelled source pixels that are class c)
    w_c = median_{k: f_k > 0}(f_k) / f_c

then scaled so that ``sum_c w_c = C``, the constraint GBW's weights satisfy, so that the two schemes
differ only in how they distribute the same total weight. A class without labelled pixels
(``n_c = 0``) gets the weight of the rarest class that has pixels (it can still occur in pseudo-labels).
"""
from typing import Sequence, Union

import torch

__all__ = ["median_frequency_weights"]


def median_frequency_weights(class_pixels: Union[Sequence[float], torch.Tensor]) -> torch.Tensor:
    """Median-frequency class weights summing to C.

    Args:
        class_pixels: [C] labelled pixel counts per class (e.g. summed over the source training set).

    Returns:
        float32 [C] weights, positive, summing to C.
    """
    pixels = torch.as_tensor(class_pixels, dtype=torch.float64).flatten()
    if pixels.numel() == 0 or bool((pixels < 0).any()) or not bool(torch.isfinite(pixels).all()):
        raise ValueError(f"class_pixels must be a non-empty list of finite counts >= 0, got {pixels.tolist()}")
    present = pixels > 0
    if not bool(present.any()):
        raise ValueError("class_pixels has no labelled pixel in any class; cannot derive frequency weights")
    frequency = pixels / pixels.sum()
    # torch.median returns the lower of the two middle values; the mean of both is the median.
    ordered = frequency[present].sort().values
    middle = (ordered.numel() - 1) / 2
    median = (ordered[int(middle)] + ordered[int(middle + 0.5)]) / 2
    weights = median / frequency.where(present, frequency[present].min())
    return (weights * (pixels.numel() / weights.sum())).float()
