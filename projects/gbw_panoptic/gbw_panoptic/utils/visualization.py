"""Predictions drawn on their image by Detectron2's ``Visualizer`` with a dataset's class names and colours
(``stuff_classes`` / ``stuff_colors`` of its ``MetadataCatalog`` entry); used by ``tools/demo.py`` and
``tools/visualize.py``."""
from typing import Any, Dict, List

import numpy as np
import torch

__all__ = ["draw_panoptic", "draw_semantic"]


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
