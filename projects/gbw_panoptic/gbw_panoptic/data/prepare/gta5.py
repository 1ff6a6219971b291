"""GTA5 -> COCO panoptic + train-id labels (``datasets/prepare_gta5.py``).

GTA5 has no instance annotations. Thing instances are approximated by the connected components
(8-connectivity) of each thing class: touching objects of one class merge into one instance, and an
object split by an occluder becomes several. Components smaller than ``min_instance_area`` pixels
become crowd (``iscrowd`` 1, excluded from the instance targets). With instances turned off, every
thing class is one crowd segment per image and the panoptic JSON says ``"has_instances": false``;
the registered dataset dicts then carry ``has_instances`` False and the instance losses skip them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import cv2
import numpy as np
from PIL import Image

from ..datasets.builtin_meta import THING_LABEL_IDS
from ..datasets.layout import gta5_paths
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

__all__ = ["KNOWN_SIZE_MISMATCH", "connected_component_instances", "prepare_gta5", "main"]

#: Why an image whose label has another size is left out instead of failing the conversion.
KNOWN_SIZE_MISMATCH = "image and label of different sizes, a known defect of the GTA5 release"

DESCRIPTION = """\
Convert GTA5 to COCO panoptic format and train-id label images.

Expected input layout (as downloaded, ROOT = e.g. datasets/gta5):
  ROOT/images/<id>.png   RGB images
  ROOT/labels/<id>.png   single-channel (palette) PNG of Cityscapes label ids

Outputs (existing valid outputs are kept, so re-running only converts what is missing):
  ROOT/labels/<id>_labelTrainIds.png    Cityscapes train ids (255 = ignore)
  ROOT/panoptic/<id>_panoptic.png       COCO panoptic PNG (thing id = labelId*1000+k)
  ROOT/panoptic.json                    COCO panoptic JSON, category_id = Cityscapes label id
  ROOT/class_stats.json                 per-image class pixel counts (rare class sampling)
  ROOT/class_frequencies.json           class frequency summary

The GTA5 release has a few image/label pairs of different sizes: they are reported as EXCLUDED
(known defect), left out of the dataset, and do not make the conversion fail (exit status 0).

GTA5 has no instance ids: thing instances are APPROXIMATED by connected components of each thing
class (touching objects merge, occluded objects split). --no-instances writes thing classes as
crowd segments instead, and the instance losses then skip GTA5 images.
"""


def connected_component_instances(label_ids: np.ndarray, min_instance_area: int = 0) -> np.ndarray:
    """Instance map of the thing classes from connected components.

    Args:
        label_ids: HxW Cityscapes label ids.
        min_instance_area: components with fewer pixels get instance 0 (crowd).

    Returns:
        HxW int32 instance ids, unique within each thing class (0 = no instance).
    """
    instances = np.zeros(label_ids.shape, dtype=np.int32)
    for label_id in THING_LABEL_IDS:
        mask = (label_ids == label_id).astype(np.uint8)
        if not mask.any():
            continue
        count, components, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        keep = stats[:, cv2.CC_STAT_AREA] >= min_instance_area
        keep[0] = False  # background
        component_to_instance = np.where(keep, np.arange(count), 0).astype(np.int32)
        instances[mask > 0] = component_to_instance[components[mask > 0]]
    return instances


def _convert_gta5_image(job: ConversionJob) -> ImageRecord:
    label_path = job.inputs[1]
    try:
        with Image.open(label_path) as label_image:
            label_ids = np.asarray(label_image)
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{label_path}: cannot be read as an image (missing or corrupt): {e}") from e
    if label_ids.ndim != 2 or label_ids.dtype != np.uint8:
        raise ValueError(
            f"{label_path}: expected a single-channel PNG of Cityscapes label ids, got shape "
            f"{label_ids.shape} dtype {label_ids.dtype}"
        )
    if job.options["instances"]:
        instance_map = connected_component_instances(label_ids, job.options["min_instance_area"])
    else:
        instance_map = np.zeros(label_ids.shape, dtype=np.int32)
    instance_ids = instance_ids_from_labels(label_ids, instance_map, THING_LABEL_IDS)
    return write_label_outputs(job, label_ids, instance_ids)


def prepare_gta5(
    root: str, workers: int = 1, instances: bool = True, min_instance_area: int = 16
) -> ConversionReport:
    """Convert every image of the GTA5 folder ``root`` (layout in :data:`DESCRIPTION`).

    Args:
        instances: derive thing instances by connected components; False: thing classes as crowd.
        min_instance_area: smaller components become crowd (pixels).
    """
    paths = gta5_paths(root)
    jobs = flat_layout_jobs(paths, "GTA5", {"instances": instances, "min_instance_area": min_instance_area})
    mode = "connected components" if instances else "none"
    return run_conversion(
        jobs,
        _convert_gta5_image,
        paths=paths,
        info={"description": f"GTA5 panoptic, instances: {mode}", "has_instances": instances},
        workers=workers,
        description="GTA5",
        known_size_mismatch=KNOWN_SIZE_MISMATCH,
    )


@exit_code_on_missing_input
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = conversion_parser(DESCRIPTION, "gta5")
    parser.add_argument(
        "--no-instances",
        dest="instances",
        action="store_false",
        help="do not derive thing instances (thing classes become crowd segments)",
    )
    parser.add_argument(
        "--min-instance-area",
        type=int,
        default=16,
        help="connected components smaller than this (pixels) become crowd (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    report = prepare_gta5(args.root, args.workers, args.instances, args.min_instance_area)
    return print_report(report, f"GTA5 ({args.root})")
