"""Batched Panoptic-DeepLab post-processing.

Same algorithm and results as ``detectron2.projects.panoptic_deeplab.post_processing.
get_panoptic_segmentation`` (threshold + max-pool NMS + top-k on the center heatmap, each thing
pixel grouped to the nearest shifted center, instance class by majority vote of the semantic map,
small stuff regions dropped), computed for a whole batch at once with tensor operations instead of
Python loops over instances and classes, and the center distances computed on thing pixels only.
"""
from typing import Iterable, List, Tuple

import torch
import torch.nn.functional as F

__all__ = ["find_instance_centers", "get_panoptic_segmentation_batched", "panoptic_to_segments"]


def find_instance_centers(
    center_heatmap: torch.Tensor, threshold: float = 0.1, nms_kernel: int = 7, top_k: int = 200
) -> torch.Tensor:
    """Center points of a batch of center heatmaps.

    Args:
        center_heatmap: B x 1 x H x W float, the predicted center heatmap (0..1).
        threshold: scores at or below it are discarded.
        nms_kernel: size of the max-pooling window; only local maxima survive.
        top_k: keep the points whose score is above the ``top_k``-th largest score of their image
            (strictly above, as Panoptic-DeepLab); ``None`` or <= 0 keeps every local maximum.
    Returns:
        K x 3 int64 tensor of ``(image index, y, x)``, sorted by image, then row-major.
    """
    if center_heatmap.dim() != 4 or center_heatmap.size(1) != 1:
        raise ValueError(f"center_heatmap must be B x 1 x H x W, got shape {tuple(center_heatmap.shape)}")
    scores = F.threshold(center_heatmap, threshold, -1.0)
    pooled = F.max_pool2d(scores, kernel_size=nms_kernel, stride=1, padding=(nms_kernel - 1) // 2)
    scores = torch.where(scores == pooled, scores, torch.full_like(scores, -1.0)).flatten(1)
    if top_k is None or top_k <= 0:
        keep = scores > 0
    else:
        kth_score = torch.topk(scores, min(top_k, scores.size(1)), dim=1).values[:, -1:]
        keep = scores > kth_score.clamp(min=0)
    image_index, flat_index = torch.nonzero(keep, as_tuple=True)
    width = center_heatmap.size(3)
    return torch.stack([image_index, flat_index // width, flat_index % width], dim=1)


def _group_thing_pixels(
    centers: torch.Tensor, offsets: torch.Tensor, thing_mask: torch.Tensor
) -> torch.Tensor:
    """Instance id (1-based within its image, 0 = none) of every thing pixel.

    Args:
        centers: K x 3 int64 ``(image index, y, x)`` from :func:`find_instance_centers`.
        offsets: B x 2 x H x W float (dy, dx) in pixels, from each pixel to its instance center.
        thing_mask: B x H x W bool, pixels whose semantic class is a thing class.
    Returns:
        B x H x W int64.
    """
    batch, _, height, width = offsets.shape
    instance_ids = torch.zeros((batch, height, width), dtype=torch.int64, device=offsets.device)
    for image_index in range(batch):
        image_centers = centers[centers[:, 0] == image_index, 1:]
        if image_centers.size(0) == 0:
            continue
        pixel_y, pixel_x = torch.nonzero(thing_mask[image_index], as_tuple=True)
        if pixel_y.numel() == 0:
            continue
        shifted = torch.stack(
            [
                pixel_y.to(offsets.dtype) + offsets[image_index, 0, pixel_y, pixel_x],
                pixel_x.to(offsets.dtype) + offsets[image_index, 1, pixel_y, pixel_x],
            ],
            dim=1,
        )
        distance = torch.norm(image_centers.unsqueeze(1) - shifted.unsqueeze(0), dim=-1)
        instance_ids[image_index, pixel_y, pixel_x] = torch.argmin(distance, dim=0) + 1
    return instance_ids


def get_panoptic_segmentation_batched(
    sem_seg: torch.Tensor,
    center_heatmap: torch.Tensor,
    offsets: torch.Tensor,
    thing_ids: Iterable[int],
    label_divisor: int,
    stuff_area: int,
    void_label: int,
    threshold: float = 0.1,
    nms_kernel: int = 7,
    top_k: int = 200,
) -> torch.Tensor:
    """Panoptic-DeepLab panoptic segmentation of a batch.

    Args:
        sem_seg: B x H x W int64 predicted semantic class (contiguous id) of each pixel.
        center_heatmap: B x 1 x H x W float predicted center heatmap.
        offsets: B x 2 x H x W float predicted (dy, dx) offsets in pixels.
        thing_ids: contiguous ids of the thing classes.
        label_divisor: panoptic label = class * label_divisor + instance number (1, 2, ... per
            class; 0 for stuff).
        stuff_area: stuff regions with fewer pixels become ``void_label``.
        void_label: label of pixels without a segment.
        threshold, nms_kernel, top_k: see :func:`find_instance_centers`.
    Returns:
        B x H x W int64 panoptic labels; per image equal to Detectron2's
        ``get_panoptic_segmentation(sem_seg[i:i+1], center_heatmap[i], offsets[i], ...)[0][0]``.
    """
    if sem_seg.dim() != 3:
        raise ValueError(f"sem_seg must be B x H x W, got shape {tuple(sem_seg.shape)}")
    batch, height, width = sem_seg.shape
    if center_heatmap.shape != (batch, 1, height, width) or offsets.shape != (batch, 2, height, width):
        raise ValueError(
            f"center_heatmap {tuple(center_heatmap.shape)} and offsets {tuple(offsets.shape)} must be "
            f"B x 1 x H x W and B x 2 x H x W with B, H, W = {batch}, {height}, {width}"
        )
    sem_seg = sem_seg.long()
    num_classes = max(int(sem_seg.max().item()) + 1 if sem_seg.numel() else 1, max(thing_ids, default=0) + 1)
    is_thing_class = torch.zeros(num_classes, dtype=torch.bool, device=sem_seg.device)
    is_thing_class[torch.as_tensor(list(thing_ids), dtype=torch.long, device=sem_seg.device)] = True
    thing_mask = is_thing_class[sem_seg]

    centers = find_instance_centers(center_heatmap, threshold, nms_kernel, top_k)
    instance_ids = _group_thing_pixels(centers, offsets, thing_mask)

    panoptic = torch.full_like(sem_seg, void_label)

    # Things: majority class of each instance (ties -> smallest class id, as torch.mode), then
    # instances of the same class numbered 1, 2, ... in the order of their instance ids.
    max_instances = int(instance_ids.max().item()) + 1
    image_index = torch.arange(batch, device=sem_seg.device).view(batch, 1, 1).expand_as(sem_seg)
    global_instance = image_index * max_instances + instance_ids
    votes = torch.bincount(
        (global_instance * num_classes + sem_seg)[instance_ids > 0], minlength=batch * max_instances * num_classes
    ).view(batch * max_instances, num_classes)
    instance_class = votes.argmax(dim=1)
    instance_exists = votes.sum(dim=1) > 0
    class_one_hot = F.one_hot(instance_class, num_classes) * instance_exists.unsqueeze(1)
    per_image_rank = class_one_hot.view(batch, max_instances, num_classes).cumsum(dim=1).view(-1, num_classes)
    instance_number = per_image_rank.gather(1, instance_class.unsqueeze(1)).squeeze(1)
    instance_label = instance_class * label_divisor + instance_number
    panoptic = torch.where(instance_ids > 0, instance_label[global_instance], panoptic)

    # Stuff: every non-thing class region (pixels without an instance) with at least stuff_area pixels.
    free = instance_ids == 0
    areas = torch.bincount(
        (image_index * num_classes + sem_seg)[free], minlength=batch * num_classes
    ).view(batch, num_classes)
    stuff_kept = (areas >= stuff_area) & ~is_thing_class.unsqueeze(0)
    keep_pixel = free & stuff_kept[image_index, sem_seg]
    return torch.where(keep_pixel, sem_seg * label_divisor, panoptic)


def panoptic_to_segments(
    panoptic: torch.Tensor, label_divisor: int, thing_ids: Iterable[int], void_label: int = -1
) -> Tuple[torch.Tensor, List[dict]]:
    """Convert a panoptic label map into Detectron2's ``(png, segments_info)`` format.

    Args:
        panoptic: H x W int64 labels ``class * label_divisor + instance`` (``void_label`` = void).
        label_divisor: as in :func:`get_panoptic_segmentation_batched`.
        thing_ids: contiguous ids of the thing classes.
        void_label: label of void pixels.
    Returns:
        ``png``: H x W int32 segment ids, 0 = void, segments numbered 1..N in increasing panoptic
        label order; ``segments_info``: one dict per segment with ``id`` (its value in ``png``),
        ``category_id`` (contiguous class id), ``isthing``, ``area`` (pixels) and
        ``panoptic_label`` (the input label).
    """
    thing_set = set(int(t) for t in thing_ids)
    labels, inverse, areas = torch.unique(panoptic, return_inverse=True, return_counts=True)
    keep = labels != void_label
    segment_id = torch.cumsum(keep.to(torch.int32), dim=0) * keep
    png = segment_id[inverse].to(torch.int32)
    segments_info = []
    for label, area, seg_id in zip(labels[keep].tolist(), areas[keep].tolist(), segment_id[keep].tolist()):
        category_id = label // label_divisor
        segments_info.append(
            {
                "id": int(seg_id),
                "category_id": int(category_id),
                "isthing": category_id in thing_set,
                "area": int(area),
                "panoptic_label": int(label),
            }
        )
    return png, segments_info
