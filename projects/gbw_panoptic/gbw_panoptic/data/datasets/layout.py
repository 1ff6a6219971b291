"""Where a prepared dataset's files lie: the datasets root and the folders of each layout.

Registration (:mod:`.builtin`) reads these locations and the converters
(:mod:`gbw_panoptic.data.prepare`) write to them. Every ``*_paths`` function returns the same keys:
``image_dir`` (RGB images), ``label_dir`` (train-id label PNGs), ``panoptic_dir`` and
``panoptic_json`` (COCO panoptic PNGs and JSON), ``class_stats`` (per-image class pixel counts) and
``frequencies`` (class frequency summary).
"""
from __future__ import annotations

import os
from typing import Dict

__all__ = [
    "ARCHIVE_FOLDER",
    "datasets_root",
    "cityscapes_paths",
    "gta5_paths",
    "mapillary_paths",
    "synthia_paths",
]

#: Top folder of the distributed SYNTHIA archive (RAND_CITYSCAPES.rar), holding RGB/, GT/ and Depth/.
ARCHIVE_FOLDER = "RAND_CITYSCAPES"


def datasets_root() -> str:
    """``$DETECTRON2_DATASETS`` or ``./datasets`` (Detectron2's convention)."""
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def cityscapes_paths(root: str, split: str) -> Dict[str, str]:
    """Input and output locations of one Cityscapes split."""
    gt_root = os.path.join(root, "gtFine")
    return {
        "image_dir": os.path.join(root, "leftImg8bit", split),
        "label_dir": os.path.join(gt_root, split),
        "panoptic_dir": os.path.join(gt_root, f"cityscapes_panoptic_{split}"),
        "panoptic_json": os.path.join(gt_root, f"cityscapes_panoptic_{split}.json"),
        "class_stats": os.path.join(gt_root, f"class_stats_{split}.json"),
        "frequencies": os.path.join(gt_root, f"class_frequencies_{split}.json"),
    }


def _flat_paths(folder: str) -> Dict[str, str]:
    """``images/``, ``labels/``, ``panoptic/`` and the JSON files side by side in ``folder``."""
    return {
        "image_dir": os.path.join(folder, "images"),
        "label_dir": os.path.join(folder, "labels"),
        "panoptic_dir": os.path.join(folder, "panoptic"),
        "panoptic_json": os.path.join(folder, "panoptic.json"),
        "class_stats": os.path.join(folder, "class_stats.json"),
        "frequencies": os.path.join(folder, "class_frequencies.json"),
    }


def gta5_paths(root: str) -> Dict[str, str]:
    """Input and output locations of a GTA5 folder."""
    return _flat_paths(root)


def mapillary_paths(root: str, split: str) -> Dict[str, str]:
    """Locations of the converted outputs of one split (``"training"`` or ``"validation"``)."""
    return _flat_paths(os.path.join(root, split, "cityscapes19"))


def synthia_paths(root: str) -> Dict[str, str]:
    """Input and output locations of a SYNTHIA-RAND-CITYSCAPES folder: ``root``, or
    ``root/RAND_CITYSCAPES`` when the archive was extracted into ``root`` with its top folder (no
    ``root/RGB``, but ``root/RAND_CITYSCAPES/RGB``)."""
    nested = os.path.join(root, ARCHIVE_FOLDER)
    if not os.path.isdir(os.path.join(root, "RGB")) and os.path.isdir(os.path.join(nested, "RGB")):
        root = nested
    return {
        "image_dir": os.path.join(root, "RGB"),
        "label_dir": os.path.join(root, "GT", "LABELS"),
        "panoptic_dir": os.path.join(root, "GT", "panoptic"),
        "panoptic_json": os.path.join(root, "GT", "panoptic.json"),
        "class_stats": os.path.join(root, "class_stats.json"),
        "frequencies": os.path.join(root, "class_frequencies.json"),
    }
