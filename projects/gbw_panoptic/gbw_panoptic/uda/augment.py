"""ClassMix and the strong colour augmentation of DACS, as batched tensor functions.

Images are float tensors ``B x 3 x H x W`` in RGB, 0-255 (the scale the model normalises). Randomness
comes from ``torch``'s default generator on the CPU (checkpointed with the other RNG states), so runs are
reproducible under a seed and the same on any device.

The recipe is that of the DACS code DAFormer, HRDA and EDAPS share (``dacs_transforms.py``, with kornia
0.5.8's ``ColorJitter`` and ``GaussianBlur2d``): whether the batch is jittered and whether it is blurred
are one draw each per batch; the jitter factors, their order and the blur sigma are drawn per image.
"""
import math
from typing import Tuple

import torch
import torchvision.transforms.v2.functional as TF

__all__ = [
    "class_mix_masks",
    "mix",
    "rgb_to_hsv",
    "hsv_to_rgb",
    "color_jitter",
    "blur_kernel_size",
    "gaussian_blur",
    "strong_augment",
]

def class_mix_masks(labels: torch.Tensor) -> torch.Tensor:
    """ClassMix masks, as the reference: the candidates are every label value of the whole batch, void
    included, and each image draws ``ceil(n / 2)`` of those ``n`` values, so a drawn class may be absent
    from that image.

    Args:
        labels: int64 ``B x H x W`` semantic labels of the source images.
    Returns:
        bool ``B x H x W``: True where the source pixel is pasted (the image's pixels of its drawn values).
    """
    masks = torch.zeros_like(labels, dtype=torch.bool)
    classes = torch.unique(labels)
    num_chosen = (classes.numel() + 1) // 2
    for index, label in enumerate(labels):
        chosen = classes[torch.randperm(classes.numel())[:num_chosen].to(classes.device)]
        masks[index] = torch.isin(label, chosen)
    return masks


def mix(mask: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``source`` where ``mask`` else ``target``.

    Args:
        mask: bool ``B x H x W``.
        source, target: tensors of equal shape ``B x H x W`` or ``B x K x H x W`` (``mask`` is broadcast
            over ``K``).
    """
    if source.shape != target.shape:
        raise ValueError(f"cannot mix tensors of shapes {tuple(source.shape)} and {tuple(target.shape)}")
    if source.dim() == 4:
        mask = mask[:, None]
    return torch.where(mask, source, target)


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


def rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] to HSV, hue in turns [0, 1), saturation and value in [0, 1]; ``... x 3 x H x W``.

    Grey pixels get hue 0 and black pixels saturation 0. Where two channels share the maximum, the
    hue formula of the first (red, then green) is used.
    """
    red, green, blue = image.unbind(-3)
    value, _ = image.max(dim=-3)
    delta = value - image.min(dim=-3).values
    saturation = torch.where(value > 0, delta / value.clamp(min=torch.finfo(image.dtype).tiny), 0.0)
    safe_delta = torch.where(delta > 0, delta, 1.0)
    hue = torch.where(
        red == value,
        (green - blue) / safe_delta,
        torch.where(green == value, 2.0 + (blue - red) / safe_delta, 4.0 + (red - green) / safe_delta),
    )
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, 0.0)
    return torch.stack((hue, saturation, value), dim=-3)


def hsv_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv` (hue in turns, any real value: taken modulo 1)."""
    hue, saturation, value = image.unbind(-3)
    channels = []
    for offset in (5.0, 3.0, 1.0):  # red, green, blue
        k = (offset + hue * 6.0) % 6.0
        ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
        channels.append(value - value * saturation * ramp)
    return torch.stack(channels, dim=-3)


def _adjust_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    hsv = rgb_to_hsv(image)
    hue, saturation, value = hsv.unbind(-3)
    return hsv_to_rgb(torch.stack((hue, (saturation * factor).clamp(0.0, 1.0), value), dim=-3))


def _adjust_hue(image: torch.Tensor, shift: float) -> torch.Tensor:
    hue, saturation, value = rgb_to_hsv(image).unbind(-3)
    return hsv_to_rgb(torch.stack((hue + shift, saturation, value), dim=-3))


def color_jitter(images: torch.Tensor, strength: float, probability: float) -> torch.Tensor:
    """Colour jitter of the batch with ``probability`` (one draw for the whole batch).

    Each image of a jittered batch gets its own factors, on [0, 1] intensities and each result clamped
    to [0, 1], applied in a random order of its own (kornia 0.5.8's ``ColorJitter(s, s, s, s)``):

    - brightness: ``x + b``, ``b`` uniform in ``[-s, s]`` (additive);
    - contrast: ``x * c``, ``c`` uniform in ``[1 - s, 1 + s]`` (scaled about 0, not about the mean);
    - saturation: the HSV saturation times a factor uniform in ``[1 - s, 1 + s]``;
    - hue: the HSV hue shifted by a uniform ``[-s, s]`` of a full turn.

    Args:
        images: float ``B x 3 x H x W``, 0-255.
        strength: ``s`` (0.2 in the reference).
        probability: of jittering the batch (0.8 in the reference, whose code applies the jitter when a
            uniform draw exceeds its ``color_jitter_probability`` 0.2).
    Returns:
        float ``B x 3 x H x W``, 0-255.
    """
    if strength <= 0 or probability <= 0 or _uniform(0.0, 1.0) >= probability:
        return images
    jittered = []
    for image in images / 255.0:
        low, high = max(1.0 - strength, 0.0), 1.0 + strength
        brightness = _uniform(low, min(high, 2.0)) - 1.0
        contrast, saturation = _uniform(low, high), _uniform(low, high)
        hue = _uniform(max(-strength, -0.5), min(strength, 0.5))
        operations = (
            lambda x: (x + brightness).clamp(0.0, 1.0),
            lambda x: (x * contrast).clamp(0.0, 1.0),
            lambda x: _adjust_saturation(x, saturation),
            lambda x: _adjust_hue(x, hue),
        )
        for index in torch.randperm(len(operations)).tolist():
            image = operations[index](image)
        jittered.append(image)
    return torch.stack(jittered) * 255.0


def blur_kernel_size(size: int) -> int:
    """Blur kernel length along an axis of ``size`` pixels: the largest odd integer <= ceil(size / 10)
    (51 for 512, 103 for 1024), as the reference."""
    length = math.ceil(0.1 * size)
    return length if length % 2 else length - 1


def gaussian_blur(
    images: torch.Tensor, probability: float = 0.5, sigma_range: Tuple[float, float] = (0.15, 1.15)
) -> torch.Tensor:
    """Gaussian blur of the batch with ``probability`` (one draw for the whole batch); each image gets
    its own sigma, uniform in ``sigma_range`` (pixels), with kernels of :func:`blur_kernel_size` and
    reflected borders; float ``B x 3 x H x W``."""
    if _uniform(0.0, 1.0) >= probability:
        return images
    height, width = images.shape[-2:]
    kernel = [blur_kernel_size(width), blur_kernel_size(height)]
    blurred = []
    for image in images:
        sigma = _uniform(*sigma_range)
        blurred.append(TF.gaussian_blur(image, kernel_size=kernel, sigma=[sigma, sigma]))
    return torch.stack(blurred)


def strong_augment(images: torch.Tensor, jitter_strength: float, jitter_probability: float) -> torch.Tensor:
    """Colour jitter then Gaussian blur, as DACS applies to the mixed images."""
    return gaussian_blur(color_jitter(images, jitter_strength, jitter_probability)).clamp(0.0, 255.0)
