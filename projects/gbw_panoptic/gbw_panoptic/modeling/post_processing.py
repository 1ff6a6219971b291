"""Panoptic-DeepLab post-processing of one image.

Same algorithm and results as ``detectron2.projects.panoptic_deeplab.post_processing.
get_panoptic_segmentation`` (threshold + max-pool NMS + top-k on the center heatmap, each thing
pixel grouped to the nearest shifted center, instance class by majority vote of the semantic map,
small stuff regions dropped), with the majority votes, the per-class instance numbering and the stuff
areas computed by ``bincount``/``cumsum`` instead of Python loops over instances and classes, and the
center distances computed on thing pixels only.

:func:`merge_semantic_and_instances`, the merge step, also fuses the top-down model's instance masks
with its semantic map (as EDAPS does).

The model calls it once per image: each image is resized to its own output size first, so a batch of
them generally has no common shape (and Detectron2's test loader gives one image per batch).
"""
from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["find_instance_centers", "merge_semantic_and_instances", "panoptic_segmentation", "panoptic_to_segments"]


def find_instance_centers(
    center_heatmap: torch.Tensor, threshold: float = 0.1, nms_kernel: int = 7, top_k: Optional[int] = 200
) -> torch.Tensor:
    """Center points of one center heatmap.

    Args:
        center_heatmap: 1 x H x W float, the predicted center heatmap (0..1).
        threshold: scores at or below it are discarded.
        nms_kernel: size of the max-pooling window; only local maxima survive.
        top_k: keep the points whose score is above the ``top_k``-th largest score (strictly above, as
            Panoptic-DeepLab); ``None`` or <= 0 keeps every local maximum.
    Returns:
        K x 2 int64 tensor of ``(y, x)``, row-major order.
    """
    if center_heatmap.dim() != 3 or center_heatmap.size(0) != 1:
        raise ValueError(f"center_heatmap must be 1 x H x W, got shape {tuple(center_heatmap.shape)}")
    scores = F.threshold(center_heatmap, threshold, -1.0)
    pooled = F.max_pool2d(scores, kernel_size=nms_kernel, stride=1, padding=(nms_kernel - 1) // 2)
    scores = torch.where(scores == pooled, scores, torch.full_like(scores, -1.0)).flatten()
    if top_k is None or top_k <= 0:
        keep = scores > 0
    else:
        keep = scores > torch.topk(scores, min(top_k, scores.numel())).values[-1].clamp(min=0)
    flat_index = torch.nonzero(keep).squeeze(1)
    width = center_heatmap.size(2)
    return torch.stack([flat_index // width, flat_index % width], dim=1)


def _group_thing_pixels(centers: torch.Tensor, offsets: torch.Tensor, thing_mask: torch.Tensor) -> torch.Tensor:
    """Instance id (``k + 1`` for the k-th center, 0 = none) of every thing pixel.

    Args:
        centers: K x 2 int64 ``(y, x)`` from :func:`find_instance_centers`.
        offsets: 2 x H x W float (dy, dx) in pixels, from each pixel to its instance center.
        thing_mask: H x W bool, pixels whose semantic class is a thing class.
    Returns:
        H x W int64.
    """
    instance_ids = torch.zeros(thing_mask.shape, dtype=torch.int64, device=offsets.device)
    pixel_y, pixel_x = torch.nonzero(thing_mask, as_tuple=True)
    if centers.size(0) == 0 or pixel_y.numel() == 0:
        return instance_ids
    shifted = torch.stack([pixel_y.to(offsets.dtype), pixel_x.to(offsets.dtype)], dim=1) + offsets[:, pixel_y, pixel_x].T
    # K x N x 2 differences in row-major order: the broadcast subtraction alone lays its result out with
    # each (dy, dx) pair far apart in memory, which makes the norm over them several times slower.
    differences = torch.empty((centers.size(0), shifted.size(0), 2), dtype=shifted.dtype, device=shifted.device)
    distance = torch.norm(torch.sub(centers.unsqueeze(1), shifted.unsqueeze(0), out=differences), dim=-1)
    instance_ids[pixel_y, pixel_x] = torch.argmin(distance, dim=0) + 1
    return instance_ids


def panoptic_segmentation(
    sem_seg: torch.Tensor,
    center_heatmap: torch.Tensor,
    offsets: torch.Tensor,
    thing_ids: Iterable[int],
    label_divisor: int,
    stuff_area: int,
    void_label: int,
    threshold: float = 0.1,
    nms_kernel: int = 7,
    top_k: Optional[int] = 200,
) -> torch.Tensor:
    """Panoptic-DeepLab panoptic segmentation of one image.

    Args:
        sem_seg: H x W int64 predicted semantic class (contiguous id) of each pixel.
        center_heatmap: 1 x H x W float predicted center heatmap.
        offsets: 2 x H x W float predicted (dy, dx) offsets in pixels.
        thing_ids: contiguous ids of the thing classes.
        label_divisor: panoptic label = class * label_divisor + instance number (1, 2, ... per
            class; 0 for stuff).
        stuff_area: stuff regions with fewer pixels become ``void_label``.
        void_label: label of pixels without a segment.
        threshold, nms_kernel, top_k: see :func:`find_instance_centers`.
    Returns:
        H x W int64 panoptic labels, equal to Detectron2's
        ``get_panoptic_segmentation(sem_seg[None], center_heatmap, offsets, ...)[0][0]``.
    """
    if sem_seg.dim() != 2:
        raise ValueError(f"sem_seg must be H x W, got shape {tuple(sem_seg.shape)}")
    height, width = sem_seg.shape
    if center_heatmap.shape != (1, height, width) or offsets.shape != (2, height, width):
        raise ValueError(
            f"center_heatmap {tuple(center_heatmap.shape)} and offsets {tuple(offsets.shape)} must be "
            f"1 x H x W and 2 x H x W with H, W = {height}, {width}"
        )
    sem_seg = sem_seg.long()
    thing_ids = list(thing_ids)
    is_thing_class = _thing_class_table(sem_seg, thing_ids)
    centers = find_instance_centers(center_heatmap, threshold, nms_kernel, top_k)
    instance_ids = _group_thing_pixels(centers, offsets, is_thing_class[sem_seg])
    return merge_semantic_and_instances(
        sem_seg, instance_ids, thing_ids, label_divisor, stuff_area, void_label, num_instances=centers.size(0)
    )


def _thing_class_table(sem_seg: torch.Tensor, thing_ids: Iterable[int]) -> torch.Tensor:
    """bool [C]: whether each class id is a thing class, C covering every id of ``sem_seg`` and ``thing_ids``."""
    thing_ids = list(thing_ids)
    num_classes = max(int(sem_seg.max().item()) + 1 if sem_seg.numel() else 1, max(thing_ids, default=0) + 1)
    is_thing_class = torch.zeros(num_classes, dtype=torch.bool, device=sem_seg.device)
    is_thing_class[torch.as_tensor(thing_ids, dtype=torch.long, device=sem_seg.device)] = True
    return is_thing_class


def merge_semantic_and_instances(
    sem_seg: torch.Tensor,
    instance_ids: torch.Tensor,
    thing_ids: Iterable[int],
    label_divisor: int,
    stuff_area: int,
    void_label: int,
    num_instances: Optional[int] = None,
) -> torch.Tensor:
    """Panoptic labels of one image from its semantic map and class-agnostic instance ids (the merge step
    of Panoptic-DeepLab, which EDAPS also applies to Mask R-CNN masks).

    Each instance keeps the pixels whose semantic class is a thing class; its class is their majority
    (ties -> smallest class id, as ``torch.mode``) and the instances of each class are numbered 1, 2, ...
    in the order of their ids (an instance without such pixels gets no number). Pixels without an
    instance take their semantic class when it is a stuff class whose region outside the instances has at
    least ``stuff_area`` pixels. Every other pixel (instance pixels of a stuff class, thing-class pixels
    without an instance, small stuff) is ``void_label``.

    Args:
        sem_seg: H x W int64 semantic class (contiguous id) of each pixel.
        instance_ids: H x W int64, 0 = no instance, k > 0 = the k-th instance.
        thing_ids, label_divisor, stuff_area, void_label: as :func:`panoptic_segmentation`.
        num_instances: the largest instance id, when known (saves reading it back from the device).
    Returns:
        H x W int64 panoptic labels ``class * label_divisor + number`` (stuff: number 0).
    """
    if sem_seg.dim() != 2 or instance_ids.shape != sem_seg.shape:
        raise ValueError(
            f"sem_seg {tuple(sem_seg.shape)} and instance_ids {tuple(instance_ids.shape)} must be the same H x W"
        )
    sem_seg = sem_seg.long()
    instance_ids = instance_ids.long()
    is_thing_class = _thing_class_table(sem_seg, thing_ids)
    num_classes = is_thing_class.numel()
    if num_instances is None:
        num_instances = int(instance_ids.max().item()) if instance_ids.numel() else 0
    has_instance = instance_ids > 0
    thing_pixel = has_instance & is_thing_class[sem_seg]
    votes = torch.bincount(
        (instance_ids * num_classes + sem_seg)[thing_pixel], minlength=(num_instances + 1) * num_classes
    ).view(-1, num_classes)
    instance_class = votes.argmax(dim=1)
    class_one_hot = F.one_hot(instance_class, num_classes) * (votes.sum(dim=1, keepdim=True) > 0)
    instance_number = class_one_hot.cumsum(dim=0).gather(1, instance_class.unsqueeze(1)).squeeze(1)
    instance_label = instance_class * label_divisor + instance_number
    panoptic = torch.where(thing_pixel, instance_label[instance_ids], torch.full_like(sem_seg, void_label))

    # Stuff: every non-thing class region (pixels without an instance) with at least stuff_area pixels.
    areas = torch.bincount(sem_seg[~has_instance], minlength=num_classes)
    stuff_kept = (areas >= stuff_area) & ~is_thing_class
    return torch.where(~has_instance & stuff_kept[sem_seg], sem_seg * label_divisor, panoptic)


def panoptic_to_segments(
    panoptic: torch.Tensor, label_divisor: int, thing_ids: Iterable[int], void_label: int = -1
) -> Tuple[torch.Tensor, List[dict]]:
    """Convert a panoptic label map into Detectron2's ``(png, segments_info)`` format.

    Args:
        panoptic: H x W int64 labels ``class * label_divisor + instance`` (``void_label`` = void).
        label_divisor: as in :func:`panoptic_segmentation`.
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
