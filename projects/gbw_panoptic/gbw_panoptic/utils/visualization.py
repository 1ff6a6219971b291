"""Predictions drawn on their image by Detectron2's ``Visualizer`` with a dataset's class names and colours
(``stuff_classes`` / ``stuff_colors`` of its ``MetadataCatalog`` entry); used by ``tools/demo.py`` and
``tools/visualize.py``."""
from typing import Any, Dict, List

import numpy as np
import torch

__all__ = ["draw_detections", "draw_panoptic", "draw_semantic"]


def draw_panoptic(image: np.ndarray, panoptic: np.ndarray, segments_info: List[Dict[str, Any]], metadata: Any) -> np.ndarray:
    """Segments (``panoptic`` ids HxW, 0 void; ``segments_info`` with contiguous ``category_id`` and
    ``isthing``) drawn on ``image`` (RGB uint8 HxWx3); returns the RGB uint8 picture."""
    from detectron2.utils.visualizer import Visualizer

    visualizer = Visualizer(image, metadata)
    return visualizer.draw_panoptic_seg(torch.as_tensor(panoptic), segments_info, area_threshold=0).get_image()


def draw_semantic(image: np.ndarray, labels: np.ndarray, metadata: Any) -> np.ndarray:
    """Class ids (``labels`` HxW; the metadata's ``ignore_label`` not drawn) drawn on ``image`` (RGB uint8
    HxWx3); returns the RGB uint8 picture."""
    from detectron2.utils.visualizer import Visualizer

    labels = np.where(labels == metadata.get("ignore_label", 255), len(metadata.stuff_classes), labels)
    return Visualizer(image, metadata).draw_sem_seg(labels, area_threshold=0).get_image()


def draw_detections(image: np.ndarray, instances: Any, metadata: Any) -> np.ndarray:
    """A Mask R-CNN model's detections (Detectron2 ``Instances`` at the image's size: ``pred_boxes``,
    ``scores``, ``pred_classes`` as contiguous semantic ids, ``pred_masks`` bool K x H x W) drawn on ``image``
    (RGB uint8 HxWx3), every detection with its class name and score, those below the panoptic fusion's
    score threshold included; returns the RGB uint8 picture."""
    from detectron2.utils.visualizer import Visualizer

    instances = instances.to("cpu")
    classes = instances.pred_classes.tolist()
    labels = [f"{metadata.stuff_classes[c]} {score:.0%}" for c, score in zip(classes, instances.scores.tolist())]
    colors = [np.asarray(metadata.stuff_colors[c]) / 255.0 for c in classes]
    visualizer = Visualizer(image, metadata)
    drawn = visualizer.overlay_instances(
        boxes=instances.pred_boxes.tensor.numpy(),
        masks=instances.pred_masks.numpy(),
        labels=labels,
        assigned_colors=colors,
    )
    return drawn.get_image()
