"""Class definitions shared by every dataset: the 19 Cityscapes train classes and the SYNTHIA id map.

All names, colours and ids come from ``cityscapesscripts.helpers.labels`` (the Cityscapes definition).
"Label id" is the Cityscapes ``id`` (0..33, what the panoptic JSONs store as ``category_id``);
"train id" is the contiguous id 0..18 used for training (255 = ignore).
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
from cityscapesscripts.helpers.labels import Label, labels

__all__ = [
    "IGNORE_LABEL",
    "LABEL_DIVISOR",
    "NUM_CLASSES",
    "TRAIN_LABELS",
    "CLASS_NAMES",
    "CLASS_COLORS",
    "THING_TRAIN_IDS",
    "THING_LABEL_IDS",
    "LABEL_ID_TO_TRAIN_ID",
    "SYNTHIA_TO_LABEL_ID",
    "SYNTHIA_EVAL_TRAIN_IDS",
    "ALL_EVAL_TRAIN_IDS",
    "label_id_to_train_id_lut",
    "synthia_id_to_label_id_lut",
    "panoptic_metadata",
]

IGNORE_LABEL = 255
# Panoptic id = category * LABEL_DIVISOR + instance (Cityscapes / Panoptic-DeepLab convention).
LABEL_DIVISOR = 1000

#: The evaluated Cityscapes classes ordered by train id.
TRAIN_LABELS: List[Label] = sorted(
    (label for label in labels if 0 <= label.trainId < IGNORE_LABEL), key=lambda label: label.trainId
)
NUM_CLASSES = len(TRAIN_LABELS)
assert [label.trainId for label in TRAIN_LABELS] == list(range(NUM_CLASSES))

CLASS_NAMES: List[str] = [label.name for label in TRAIN_LABELS]
CLASS_COLORS: List[List[int]] = [list(label.color) for label in TRAIN_LABELS]
THING_TRAIN_IDS: List[int] = [label.trainId for label in TRAIN_LABELS if label.hasInstances]
THING_LABEL_IDS: List[int] = [label.id for label in TRAIN_LABELS if label.hasInstances]
LABEL_ID_TO_TRAIN_ID: Dict[int, int] = {label.id: label.trainId for label in TRAIN_LABELS}

#: SYNTHIA (RAND-CITYSCAPES) class id -> Cityscapes label id; every other SYNTHIA id is void.
SYNTHIA_TO_LABEL_ID: Dict[int, int] = {
    3: 7,  # road
    4: 8,  # sidewalk
    2: 11,  # building
    21: 12,  # wall
    5: 13,  # fence
    7: 17,  # pole
    15: 19,  # traffic light
    9: 20,  # traffic sign
    6: 21,  # vegetation
    16: 22,  # terrain
    1: 23,  # sky
    10: 24,  # person (pedestrian)
    17: 25,  # rider
    8: 26,  # car
    18: 27,  # truck
    19: 28,  # bus
    20: 31,  # train
    12: 32,  # motorcycle
    11: 33,  # bicycle
}

#: Train ids of the 16 classes evaluated in SYNTHIA -> Cityscapes (all but terrain, truck, train).
SYNTHIA_EVAL_TRAIN_IDS: List[int] = [
    label.trainId for label in TRAIN_LABELS if label.name not in ("terrain", "truck", "train")
]
ALL_EVAL_TRAIN_IDS: List[int] = list(range(NUM_CLASSES))


def label_id_to_train_id_lut() -> np.ndarray:
    """Look-up table (uint8, 256 entries) mapping a Cityscapes label id to its train id (255 if none)."""
    lut = np.full(256, IGNORE_LABEL, dtype=np.uint8)
    for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    return lut


def synthia_id_to_label_id_lut() -> np.ndarray:
    """Look-up table (uint8, 65536 entries) mapping a SYNTHIA class id to a Cityscapes label id.

    Unmapped ids go to 0 ("unlabeled", void).
    """
    lut = np.zeros(1 << 16, dtype=np.uint8)
    for synthia_id, label_id in SYNTHIA_TO_LABEL_ID.items():
        lut[synthia_id] = label_id
    return lut


def panoptic_metadata(evaluation_classes: List[int]) -> Dict[str, Any]:
    """Metadata of a panoptic dataset in the 19-class Cityscapes label space.

    As in Detectron2's builtin Cityscapes panoptic registration (and Panoptic-DeepLab),
    ``thing_classes`` and ``stuff_classes`` both list all 19 names indexed by train id; which classes
    are things is given by ``thing_dataset_id_to_contiguous_id`` (label id -> train id).
    ``stuff_dataset_id_to_contiguous_id`` maps every evaluated label id to its train id.

    Args:
        evaluation_classes: train ids the evaluators report (19 or the 16 SYNTHIA classes).
    """
    return {
        "thing_classes": list(CLASS_NAMES),
        "thing_colors": [list(color) for color in CLASS_COLORS],
        "stuff_classes": list(CLASS_NAMES),
        "stuff_colors": [list(color) for color in CLASS_COLORS],
        "thing_dataset_id_to_contiguous_id": {
            label.id: label.trainId for label in TRAIN_LABELS if label.hasInstances
        },
        "stuff_dataset_id_to_contiguous_id": dict(LABEL_ID_TO_TRAIN_ID),
        "label_divisor": LABEL_DIVISOR,
        "ignore_label": IGNORE_LABEL,
        "evaluation_classes": list(evaluation_classes),
        "evaluator_type": "gbw_panoptic",
    }
