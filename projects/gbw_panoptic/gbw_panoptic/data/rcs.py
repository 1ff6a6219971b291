"""Rare class sampling (RCS, DAFormer): draw source images so that rare classes are seen often.

Each draw first picks a class ``c`` with probability

    P(c) = exp((1 - f_c) / T) / sum_k exp((1 - f_k) / T),

where ``f_c`` is the fraction of labelled source pixels of class ``c`` (classes without pixels
are never picked) and ``T`` the temperature (``DATALOADER.RCS.TEMPERATURE``, 0.01 in DAFormer:
small T favours rare classes strongly), then picks uniformly an image with more than
``DATALOADER.RCS.MIN_PIXELS`` pixels of ``c`` (as DAFormer), or any image containing ``c`` when none
has that many. The drawn class can travel with the index (``class_key``), so that the mapper redraws
the crop until it holds enough of ``c`` (``DATALOADER.RCS.MIN_CROP_RATIO``).

The per-image class pixel counts come from the class statistics file written by the
``datasets/prepare_*.py`` scripts (metadata ``class_stats_file``)::

    {"classes": [C class names], "images": {image_id: [C pixel counts, indexed by train id]}}
"""
import json
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .stream import index_block_seed

__all__ = ["RareClassSampler", "rcs_class_probabilities", "load_class_pixel_counts"]


def rcs_class_probabilities(class_pixels: np.ndarray, temperature: float) -> np.ndarray:
    """Sampling probability of each class.

    Args:
        class_pixels: (C,) total labelled pixels of each class.
        temperature: T > 0.

    Returns:
        float64 (C,) probabilities summing to 1, zero for classes without pixels.
    """
    if temperature <= 0:
        raise ValueError(f"RCS temperature must be positive, got {temperature}")
    class_pixels = np.asarray(class_pixels, dtype=np.float64)
    present = class_pixels > 0
    if not present.any():
        raise ValueError("RCS needs at least one class with labelled pixels; the class statistics are empty")
    frequency = class_pixels / class_pixels.sum()
    logits = np.where(present, (1.0 - frequency) / temperature, -np.inf)
    weights = np.exp(logits - logits[present].max())
    return weights / weights.sum()


def load_class_pixel_counts(
    class_stats_file: str, dataset_dicts: Sequence[Dict[str, Any]], num_classes: int
) -> np.ndarray:
    """Read the class statistics file and align it with the dataset dicts.

    Args:
        class_stats_file: JSON in the format of the module docstring.
        dataset_dicts: the dataset, whose ``image_id`` values index the file's ``images``.
        num_classes: C, the length of every count list.

    Returns:
        int64 (N, C): pixel counts of every class in every image of ``dataset_dicts``.
    """
    with open(class_stats_file) as f:
        stats = json.load(f)
    images = stats.get("images") if isinstance(stats, dict) else None
    if not isinstance(images, dict):
        raise ValueError(
            f"Class statistics file '{class_stats_file}' has no 'images' mapping "
            "{image_id: [pixel counts per class]}"
        )
    counts = np.zeros((len(dataset_dicts), num_classes), dtype=np.int64)
    for row, record in enumerate(dataset_dicts):
        image_id = str(record["image_id"])
        if image_id not in images:
            raise KeyError(
                f"Image '{image_id}' ({record.get('file_name')}) is missing from the class statistics "
                f"file '{class_stats_file}'; re-run the dataset's prepare script"
            )
        pixels = images[image_id]
        if len(pixels) != num_classes:
            raise ValueError(
                f"Class statistics file '{class_stats_file}': image '{image_id}' has {len(pixels)} "
                f"class counts, expected {num_classes}"
            )
        counts[row] = pixels
    return counts


class RareClassSampler:
    """Infinite stream of dataset indices drawn by rare class sampling (an
    :class:`~gbw_panoptic.data.stream.IndexStream`).

    The draws come in chunks of ``chunk_size``, each from a generator seeded by the stream's seed
    and the chunk number, so the stream can be read from any position without drawing the earlier
    chunks.
    """

    def __init__(
        self,
        class_pixels: np.ndarray,
        temperature: float,
        min_pixels: int,
        chunk_size: int = 1024,
        class_key: Optional[str] = None,
    ):
        """
        Args:
            class_pixels: (N, C) pixel counts of each class in each of the N images.
            temperature: RCS temperature T.
            min_pixels: an image is drawn for class c only if it has more than this many pixels
                of c (unless no image has, then any image containing c qualifies).
            chunk_size: indices drawn per vectorised step.
            class_key: None: the stream yields dataset indices; else ``(index, {class_key: c})``
                pairs, ``c`` the class the image was drawn for (see
                :class:`~gbw_panoptic.data.stream.IndexStream`).
        """
        class_pixels = np.asarray(class_pixels, dtype=np.int64)
        if class_pixels.ndim != 2 or class_pixels.shape[0] == 0:
            raise ValueError(f"class_pixels must be a non-empty (N, C) array, got shape {class_pixels.shape}")
        probabilities = rcs_class_probabilities(class_pixels.sum(axis=0), temperature)
        self.classes = np.flatnonzero(probabilities > 0)
        self.class_probabilities = probabilities[self.classes]
        self.images_of_class: List[np.ndarray] = []
        for c in self.classes:
            images = np.flatnonzero(class_pixels[:, c] > min_pixels)
            if len(images) == 0:
                images = np.flatnonzero(class_pixels[:, c] > 0)
            self.images_of_class.append(images)
        self._chunk_size = chunk_size
        self.class_key = class_key

    def indices(self, seed: int, start: int) -> Iterator[Union[int, Tuple[int, Dict[str, int]]]]:
        """The indices (with ``class_key``: index and drawn class) at positions ``start, start + 1,
        ...`` of the stream of ``seed``."""
        class_probabilities = torch.as_tensor(self.class_probabilities)
        num_images = torch.as_tensor([len(images) for images in self.images_of_class])
        chunk, offset = divmod(start, self._chunk_size)
        while True:
            generator = torch.Generator().manual_seed(index_block_seed(seed, chunk))
            picked = torch.multinomial(class_probabilities, self._chunk_size, replacement=True, generator=generator)
            uniform = torch.rand(self._chunk_size, generator=generator, dtype=torch.float64)
            position = (uniform * num_images[picked]).long().clamp_max(num_images[picked] - 1)
            for class_index, image_position in zip(picked[offset:].tolist(), position[offset:].tolist()):
                index = int(self.images_of_class[class_index][image_position])
                if self.class_key is None:
                    yield index
                else:
                    yield index, {self.class_key: int(self.classes[class_index])}
            chunk, offset = chunk + 1, 0
