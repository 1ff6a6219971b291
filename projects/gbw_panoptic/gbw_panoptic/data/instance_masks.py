"""Mask R-CNN targets of a panoptic label map: the semantic labels and Detectron2 ``Instances`` of the
thing segments (``gt_boxes``, ``gt_classes``, ``gt_masks``), for the top-down (Mask R-CNN) model.

Same recipe as EDAPS's top-down training labels (``GenPanopLabelsForMaskFormer``): crowd segments are
ignored in the semantic labels (``ignore_crowd_in_semantic``) and are no instances; a thing segment
becomes an instance when the (augmented) crop still holds it and its box is at least 2 pixels wide and
high (EDAPS drops boxes whose inclusive corners coincide); instance classes are numbered from 0 in the
order of the thing class ids.
"""
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from detectron2.structures import BitMasks, Instances

__all__ = ["InstanceMaskTargetGenerator"]


class InstanceMaskTargetGenerator:
    """Builds ``sem_seg``, ``sem_seg_weights`` and ``instances`` from a panoptic id map.

    Args:
        thing_ids: contiguous (train) ids of the thing classes; ``gt_classes`` is the index of a
            segment's class in their sorted list.
        ignore_label: semantic label of pixels without a segment (and of crowd segments when
            ``ignore_crowd_in_semantic``).
        ignore_crowd_in_semantic: label crowd segments ``ignore_label`` in ``sem_seg``.
    """

    def __init__(self, thing_ids: Sequence[int], ignore_label: int = 255, ignore_crowd_in_semantic: bool = True):
        if not thing_ids:
            raise ValueError("thing_ids must name at least one thing class")
        self.thing_ids = sorted(int(c) for c in thing_ids)
        self.ignore_label = ignore_label
        self.ignore_crowd_in_semantic = ignore_crowd_in_semantic

    def __call__(self, panoptic: np.ndarray, segments_info: List[Dict[str, Any]]) -> Dict[str, Any]:
        """
        Args:
            panoptic: int ``HxW`` segment ids (``rgb2id`` of the augmented panoptic PNG).
            segments_info: the dataset dict's segments, each with ``id``, ``category_id`` (contiguous
                train id) and ``iscrowd``.
        Returns:
            ``"sem_seg"``: int64 ``HxW`` (``ignore_label`` where no segment, and on crowd when set);
            ``"sem_seg_weights"``: float32 ``HxW`` ones; ``"instances"``: ``Instances((H, W))`` with
            ``gt_boxes`` (``Boxes`` N x 4, XYXY, exclusive far corner as Detectron2's
            ``BitMasks.get_bounding_boxes``), ``gt_classes`` (int64 N, 0 .. len(thing_ids) - 1) and
            ``gt_masks`` (``BitMasks`` N x H x W).
        """
        if panoptic.ndim != 2:
            raise ValueError(f"panoptic must be an HxW id map, got shape {panoptic.shape}")
        height, width = panoptic.shape
        semantic = np.full((height, width), self.ignore_label, dtype=np.int64)
        masks, classes = [], []
        for segment in segments_info:
            mask = panoptic == int(segment["id"])
            category = int(segment["category_id"])
            crowd = bool(segment.get("iscrowd", 0))
            if not (crowd and self.ignore_crowd_in_semantic):
                semantic[mask] = category
            if crowd or category not in self.thing_ids or not mask.any():
                continue
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            if rows[-1] > rows[0] and cols[-1] > cols[0]:
                masks.append(mask)
                classes.append(self.thing_ids.index(category))
        instances = Instances((height, width))
        mask_tensor = torch.as_tensor(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.bool)
        gt_masks = BitMasks(mask_tensor)
        instances.gt_masks = gt_masks
        instances.gt_boxes = gt_masks.get_bounding_boxes()
        instances.gt_classes = torch.as_tensor(classes, dtype=torch.int64)
        return {
            "sem_seg": torch.as_tensor(semantic),
            "sem_seg_weights": torch.ones((height, width), dtype=torch.float32),
            "instances": instances,
        }
