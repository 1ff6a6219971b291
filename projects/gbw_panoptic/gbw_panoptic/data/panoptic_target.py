"""Panoptic-DeepLab training targets (semantic labels, center heatmap, offsets and loss weights).

:class:`PanopticTargetGenerator` computes the same targets as Detectron2's
``detectron2.projects.panoptic_deeplab.PanopticDeepLabTargetGenerator`` (the Panoptic-DeepLab
recipe: a Gaussian of standard deviation ``sigma`` at the mean position of every thing segment,
offsets pointing from each thing pixel to its segment's mean position, center weights on every
non-crowd labelled segment, offset weights on non-crowd thing segments), value for value, but
vectorised: every segment is found with one ``searchsorted`` over the image and the per-segment
sums come from ``bincount`` instead of one full-image mask per segment.

Intended differences to Detectron2's generator (all in the layout of the returned tensors, to
match what the model consumes):

- ``center`` is ``1xHxW`` (Detectron2: ``HxW``);
- ``center_weights`` and ``offset_weights`` are ``HxW`` (Detectron2: ``1xHxW``);
- ``center_points`` is not returned (the model does not use it);
- ``center_class`` is added: the class of the instance whose Gaussian gives each pixel its
  center target (the one with the largest value there), for grouping the center loss by instance.

``tools/bench_panoptic_targets.py`` (``from_detectron2_layout``) converts the reference's output to this
layout.
"""
from typing import Any, Dict, Iterable, List

import numpy as np
import torch

__all__ = ["PanopticTargetGenerator", "CENTER_ROUNDINGS"]

CENTER_ROUNDINGS = ("round", "floor")


class PanopticTargetGenerator:
    """Turns a panoptic id map and its ``segments_info`` into Panoptic-DeepLab training targets."""

    def __init__(
        self,
        ignore_label: int,
        thing_ids: Iterable[int],
        sigma: float = 8,
        ignore_stuff_in_offset: bool = False,
        small_instance_area: int = 0,
        small_instance_weight: float = 1,
        ignore_crowd_in_semantic: bool = False,
        center_rounding: str = "round",
    ):
        """
        Args:
            ignore_label: semantic label of pixels outside every segment (255).
            thing_ids: contiguous category ids (train ids) of the thing classes.
            sigma: standard deviation of the center Gaussian, in pixels.
            ignore_stuff_in_offset: give offset weight only to thing segments (stuff pixels then
                carry offset weight 0).
            small_instance_area: thing segments with fewer pixels than this get the semantic
                loss weight ``small_instance_weight`` (0 disables it).
            small_instance_weight: semantic loss weight of the pixels of small thing segments.
            ignore_crowd_in_semantic: label crowd segments ``ignore_label`` in the semantic map.
            center_rounding: pixel of each Gaussian's peak from the segment's mean position:
                ``"round"`` (Panoptic-DeepLab, Detectron2) or ``"floor"`` (EDAPS's ``int()``).
                The offsets always point to the exact mean.
        """
        if center_rounding not in CENTER_ROUNDINGS:
            raise ValueError(f"center_rounding must be one of {CENTER_ROUNDINGS}, got {center_rounding!r}")
        self.ignore_label = int(ignore_label)
        self.thing_ids = frozenset(int(i) for i in thing_ids)
        self.sigma = sigma
        self.ignore_stuff_in_offset = ignore_stuff_in_offset
        self.small_instance_area = small_instance_area
        self.small_instance_weight = small_instance_weight
        self.ignore_crowd_in_semantic = ignore_crowd_in_semantic
        self.center_rounding = center_rounding
        # The Gaussian patch pasted at every center, (6 sigma + 3) pixels wide, peak 1 at its middle.
        size = 6 * sigma + 3
        coords = np.arange(0, size, 1, float)
        peak = 3 * sigma + 1
        # float32, the dtype of the heatmap: max-pasting it gives the values of pasting the float64
        # Gaussian, and strict comparisons in the heatmap's precision decide which instance owns a pixel.
        self.gaussian = np.exp(
            -((coords[None, :] - peak) ** 2 + (coords[:, None] - peak) ** 2) / (2 * sigma**2)
        ).astype(np.float32)

    def __call__(self, panoptic: np.ndarray, segments_info: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        """
        Args:
            panoptic: ``HxW`` integer array of segment ids (``panopticapi.utils.rgb2id`` of the
                panoptic PNG); pixels whose id is not in ``segments_info`` are unlabelled.
            segments_info: the dataset dict's segments, each with ``id``, ``category_id``
                (contiguous train id) and ``iscrowd``.

        Returns:
            dict with
            - ``sem_seg``: int64 ``HxW`` train ids, ``ignore_label`` where unlabelled;
            - ``sem_seg_weights``: float32 ``HxW`` semantic loss weights;
            - ``center``: float32 ``1xHxW`` center heatmap in [0, 1];
            - ``center_weights``: float32 ``HxW``, 1 on non-crowd labelled segments, else 0;
            - ``offset``: float32 ``2xHxW`` (dy, dx) in pixels from each thing pixel to its
              segment's mean position, 0 elsewhere;
            - ``offset_weights``: float32 ``HxW``, 1 on non-crowd thing segments (on every
              non-crowd segment when ``ignore_stuff_in_offset`` is False), else 0;
            - ``center_class``: int64 ``HxW``, the category id of the instance whose Gaussian
              sets ``center`` at the pixel (the first pasted one on ties), ``ignore_label`` where
              no Gaussian reaches.
        """
        if panoptic.ndim != 2:
            raise ValueError(f"panoptic must be an HxW id map, got shape {panoptic.shape}")
        height, width = panoptic.shape
        num_segments = len(segments_info)
        segment_ids = np.array([int(seg["id"]) for seg in segments_info], dtype=np.int64)
        category_ids = np.array([int(seg["category_id"]) for seg in segments_info], dtype=np.int64)
        is_crowd = np.array([bool(seg.get("iscrowd", 0)) for seg in segments_info], dtype=bool)
        is_thing = np.array([c in self.thing_ids for c in category_ids.tolist()], dtype=bool)

        pixel_segment = _segment_index(panoptic.reshape(-1), segment_ids)

        def per_pixel(values: np.ndarray, unlabelled_value) -> np.ndarray:
            """Broadcast one value per segment to the pixels of that segment, as HxW."""
            table = np.append(values, np.asarray(unlabelled_value, dtype=values.dtype))
            return table[pixel_segment].reshape(height, width)

        semantic_category = np.where(
            self.ignore_crowd_in_semantic & is_crowd, self.ignore_label, category_ids
        )
        semantic = per_pixel(semantic_category, self.ignore_label)
        center_weights = per_pixel((~is_crowd).astype(np.float32), 0.0)
        offset_segments = ~is_crowd & (is_thing | (not self.ignore_stuff_in_offset))
        offset_weights = per_pixel(offset_segments.astype(np.float32), 0.0)

        # Per-segment pixel counts and coordinate sums (exact in float64 for integer coordinates).
        rows = np.arange(height, dtype=np.float64)[:, None]
        cols = np.arange(width, dtype=np.float64)[None, :]
        bins = num_segments + 1
        area = np.bincount(pixel_segment, minlength=bins)[:num_segments]
        sum_y = np.bincount(pixel_segment, weights=np.repeat(rows[:, 0], width), minlength=bins)
        sum_x = np.bincount(pixel_segment, weights=np.tile(cols[0], height), minlength=bins)
        sum_y, sum_x = sum_y[:num_segments], sum_x[:num_segments]
        has_center = is_thing & (area > 0)
        center_y = np.divide(sum_y, area, out=np.zeros(num_segments), where=area > 0)
        center_x = np.divide(sum_x, area, out=np.zeros(num_segments), where=area > 0)

        small = has_center & (area < self.small_instance_area)
        sem_seg_weights = per_pixel(
            np.where(small, self.small_instance_weight, 1.0).astype(np.float32), 1.0
        )

        center = np.zeros((height, width), dtype=np.float32)
        center_class = np.full((height, width), self.ignore_label, dtype=np.int64)
        for index in np.flatnonzero(has_center):
            self._paste_gaussian(center, center_class, center_y[index], center_x[index], category_ids[index])

        thing_pixel = per_pixel(has_center, False)
        pixel_center_y = per_pixel(center_y, 0.0)
        pixel_center_x = per_pixel(center_x, 0.0)
        offset = np.zeros((2, height, width), dtype=np.float32)
        offset[0] = np.where(thing_pixel, pixel_center_y - rows, 0.0)
        offset[1] = np.where(thing_pixel, pixel_center_x - cols, 0.0)

        return {
            "sem_seg": torch.as_tensor(semantic.astype(np.int64)),
            "sem_seg_weights": torch.as_tensor(sem_seg_weights),
            "center": torch.as_tensor(center[None]),
            "center_weights": torch.as_tensor(center_weights),
            "offset": torch.as_tensor(offset),
            "offset_weights": torch.as_tensor(offset_weights),
            "center_class": torch.as_tensor(center_class),
        }

    def _paste_gaussian(
        self, center: np.ndarray, center_class: np.ndarray, center_y: float, center_x: float, category: int
    ) -> None:
        """Max-paste the Gaussian patch centred at (center_y, center_x), rounded as
        ``center_rounding`` says, into ``center`` in place, and write ``category`` into
        ``center_class`` where the patch is the new maximum."""
        height, width = center.shape
        if self.center_rounding == "round":
            y, x = int(round(center_y)), int(round(center_x))
        else:
            y, x = int(np.floor(center_y)), int(np.floor(center_x))
        radius = 3 * self.sigma + 1
        top, left = int(np.round(y - radius)), int(np.round(x - radius))
        bottom, right = int(np.round(y + radius + 1)), int(np.round(x + radius + 1))
        y0, y1 = max(0, top), min(bottom, height)
        x0, x1 = max(0, left), min(right, width)
        if y0 >= y1 or x0 >= x1:
            return
        patch = self.gaussian[y0 - top : y1 - top, x0 - left : x1 - left]
        region = center[y0:y1, x0:x1]
        larger = patch > region
        region[larger] = patch[larger]
        center_class[y0:y1, x0:x1][larger] = category


# Largest segment id for which the id -> segment lookup uses a dense table (4 MiB of int32).
_MAX_DENSE_SEGMENT_ID = 1 << 20


def _segment_index(pixel_ids: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """Index into ``segment_ids`` of every pixel id, ``len(segment_ids)`` where it is absent.

    Args:
        pixel_ids: integer array (N,) of panoptic ids.
        segment_ids: int64 array (S,) of distinct segment ids.

    Returns:
        intp array (N,) with values in [0, S].
    """
    num_segments = len(segment_ids)
    if num_segments == 0:
        return np.zeros(pixel_ids.shape, dtype=np.intp)
    max_id = int(segment_ids.max())
    if int(segment_ids.min()) >= 0 and max_id < _MAX_DENSE_SEGMENT_ID:
        # Dense lookup table; ids outside [0, max_id] fall on the last, "absent" entry.
        table = np.full(max_id + 2, num_segments, dtype=np.intp)
        table[segment_ids] = np.arange(num_segments)
        lookup = np.where((pixel_ids < 0) | (pixel_ids > max_id), max_id + 1, pixel_ids)
        return table[lookup]
    order = np.argsort(segment_ids, kind="stable")
    sorted_ids = segment_ids[order]
    position = np.minimum(np.searchsorted(sorted_ids, pixel_ids), num_segments - 1)
    return np.where(sorted_ids[position] == pixel_ids, order[position], num_segments)
