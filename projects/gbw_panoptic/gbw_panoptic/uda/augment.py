"""ClassMix and the strong colour augmentation of DACS, as batched tensor functions.

Images are float tensors ``B x 3 x H x W`` in RGB, 0-255 (the scale the model normalises). Randomness
comes from ``torch``'s default generator on the CPU (checkpointed with the other RNG states), so runs are
reproducible under a seed and the same on any device.
"""
import math
from typing import Tuple
import torch
import torchvision.transforms.v2.functional as TF

__all__ = ["class_mix_masks", "mix", "color_jitter", "gaussian_blur", "strong_augment"]


def class_mix_masks(labels: torch.Tensor, ignore_value: int = 255) -> torch.Tensor:
    """ClassMix masks: for each image, the pixels of a random half of the classes present.

    Args:
        labels: int64 ``B x H x W`` semantic labels of the source images (``ignore_value`` = void).
    Returns:
        bool ``B x H x W``: True where the source pixel is pasted. With ``n`` classes present in an
        image, ``ceil(n / 2)`` of them are chosen (none when the image is all void).
    """
    masks = torch.zeros_like(labels, dtype=torch.bool)
    for index, label in enumerate(labels):
        classes = torch.unique(label)
        classes = classes[classes != ignore_value]
        if classes.numel() == 0:
            continue
        num_chosen = (classes.numel() + 1) // 2
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


def color_jitter(images: torch.Tensor, strength: float, probability: float) -> torch.Tensor:
    """Random brightness, contrast, saturation (factors in ``[1 - s, 1 + s]``) and hue (shift in
    ``[-s/2, s/2]``), applied to each image with ``probability``; float ``B x 3 x H x W``, 0-255."""
    if strength <= 0 or probability <= 0:
        return images
    jittered = []
    for image in images / 255.0:
        if _uniform(0.0, 1.0) < probability:
            image = TF.adjust_brightness(image, _uniform(1 - strength, 1 + strength))
            image = TF.adjust_contrast(image, _uniform(1 - strength, 1 + strength))
            image = TF.adjust_saturation(image, _uniform(1 - strength, 1 + strength))
            image = TF.adjust_hue(image, _uniform(-strength / 2, strength / 2))
        jittered.append(image)
    return torch.stack(jittered) * 255.0


def gaussian_blur(
    images: torch.Tensor, probability: float = 0.5, sigma_range: Tuple[float, float] = (0.15, 1.15)
) -> torch.Tensor:
    """Gaussian blur of each image with ``probability``: sigma uniform in ``sigma_range`` (pixels), an
    odd kernel of about a tenth of the image size; float ``B x 3 x H x W``."""
    height, width = images.shape[-2:]
    kernel = [2 * math.ceil(0.05 * size) + 1 for size in (width, height)]
    blurred = []
    for image in images:
        if _uniform(0.0, 1.0) < probability:
            sigma = _uniform(*sigma_range)
            image = TF.gaussian_blur(image, kernel_size=kernel, sigma=[sigma, sigma])
        blurred.append(image)
    return torch.stack(blurred)


def strong_augment(images: torch.Tensor, jitter_strength: float, jitter_probability: float, blur: bool) -> torch.Tensor:
    """Colour jitter then (if ``blur``) Gaussian blur, as DACS applies to the mixed images."""
    images = color_jitter(images, jitter_strength, jitter_probability)
    if blur:
        images = gaussian_blur(images)
    return images.clamp(0.0, 255.0)
