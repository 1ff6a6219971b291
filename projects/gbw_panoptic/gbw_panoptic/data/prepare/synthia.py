"""SYNTHIA-RAND-CITYSCAPES -> COCO panoptic + train-id labels (``datasets/prepare_synthia.py``)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

from ..datasets.builtin_meta import THING_LABEL_IDS, synthia_id_to_label_id_lut
from ..datasets.layout import synthia_paths
from .conversion import (
    ConversionJob,
    ConversionReport,
    ImageRecord,
    conversion_parser,
    exit_code_on_missing_input,
    flat_layout_jobs,
    instance_ids_from_labels,
    print_report,
    run_conversion,
    write_label_outputs,
)

__all__ = ["read_synthia_labels", "prepare_synthia", "main"]

DESCRIPTION = """\
Convert SYNTHIA-RAND-CITYSCAPES to COCO panoptic format and train-id label images.

Expected input layout (as downloaded, ROOT = e.g. datasets/synthia):
  ROOT/RGB/<id>.png          RGB images
  ROOT/GT/LABELS/<id>.png    16-bit 3-channel PNG; in RGB order channel 0 = SYNTHIA class id,
                             channel 1 = instance id (0 = none)
The archive extracted into ROOT as distributed, under its top folder (ROOT/RAND_CITYSCAPES/RGB, ...),
works too: ROOT then stands for ROOT/RAND_CITYSCAPES below, for this script and for training.

Outputs (existing valid outputs are kept, so re-running only converts what is missing):
  ROOT/GT/LABELS/<id>_labelTrainIds.png   Cityscapes train ids (255 = ignore)
  ROOT/GT/panoptic/<id>_panoptic.png      COCO panoptic PNG (thing id = labelId*1000+k)
  ROOT/GT/panoptic.json                   COCO panoptic JSON, category_id = Cityscapes label id
  ROOT/class_stats.json                   per-image class pixel counts (rare class sampling)
  ROOT/class_frequencies.json             class frequency summary

SYNTHIA class ids are mapped to Cityscapes label ids as in the mapping table of datasets/README.md; thing instances come
from the instance channel, thing pixels without an instance id become crowd segments.
"""


def read_synthia_labels(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """Read a SYNTHIA ``GT/LABELS`` PNG.

    Returns:
        ``(class_ids, instance_ids)``, both HxW uint16 (SYNTHIA class ids, instance ids).
    """
    labels = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if labels is None:
        raise ValueError(f"{path}: cannot be read as an image (missing or corrupt)")
    if labels.ndim != 3 or labels.shape[2] < 3 or labels.dtype != np.uint16:
        raise ValueError(
            f"{path}: expected a 16-bit 3-channel SYNTHIA label PNG, got shape {labels.shape} "
            f"dtype {labels.dtype}"
        )
    # OpenCV returns BGR: RGB channel 0 (class) is the last one, channel 1 (instance) the middle one.
    return labels[:, :, 2], labels[:, :, 1]


def _convert_synthia_image(job: ConversionJob) -> ImageRecord:
    class_ids, instance_map = read_synthia_labels(job.inputs[1])
    label_ids = synthia_id_to_label_id_lut()[class_ids]
    instance_ids = instance_ids_from_labels(label_ids, instance_map, THING_LABEL_IDS)
    return write_label_outputs(job, label_ids, instance_ids)


def prepare_synthia(root: str, workers: int = 1) -> ConversionReport:
    """Convert every image of the SYNTHIA folder ``root`` (layout in :data:`DESCRIPTION`)."""
    paths = synthia_paths(root)
    jobs = flat_layout_jobs(paths, "SYNTHIA")
    return run_conversion(
        jobs,
        _convert_synthia_image,
        paths=paths,
        info={"description": "SYNTHIA-RAND-CITYSCAPES panoptic", "has_instances": True},
        workers=workers,
        description="SYNTHIA",
    )


@exit_code_on_missing_input
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = conversion_parser(DESCRIPTION, "synthia").parse_args(argv)
    report = prepare_synthia(args.root, workers=args.workers)
    return print_report(report, f"SYNTHIA ({args.root})")

