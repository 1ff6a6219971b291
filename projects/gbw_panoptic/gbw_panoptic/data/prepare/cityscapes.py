"""Cityscapes -> train-id labels + COCO panoptic with cityscapesScripts' converters
(``datasets/prepare_cityscapes.py``)."""
from __future__ import annotations

import glob
import os
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

from ...utils.io import atomic_path
from ..datasets.layout import cityscapes_paths
from .conversion import (
    ConversionJob,
    ConversionReport,
    ImageRecord,
    conversion_parser,
    exit_code_on_missing_input,
    image_record,
    panoptic_from_instance_ids,
    print_report,
    read_png_size,
    run_conversion,
)

__all__ = ["prepare_cityscapes", "main"]

SPLITS = ("train", "val")

DESCRIPTION = """\
Create the Cityscapes train-id label images and COCO panoptic annotations with cityscapesScripts'
own converters (json2labelImg as in createTrainIdLabelImgs, convert2panoptic of createPanopticImgs).

Expected input layout (as downloaded, leftImg8bit_trainvaltest.zip + gtFine_trainvaltest.zip;
ROOT = e.g. datasets/cityscapes):
  ROOT/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  ROOT/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_polygons.json
  ROOT/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png

Outputs (the names Detectron2's builtin cityscapes_fine_panoptic_* registration expects too;
existing valid outputs are kept, so re-running only converts what is missing):
  ROOT/gtFine/<split>/<city>/*_gtFine_labelTrainIds.png
  ROOT/gtFine/cityscapes_panoptic_<split>/*_gtFine_panoptic.png
  ROOT/gtFine/cityscapes_panoptic_<split>.json     category_id = Cityscapes label id
  ROOT/gtFine/class_stats_<split>.json             per-image class pixel counts
  ROOT/gtFine/class_frequencies_<split>.json       class frequency summary
"""


def _convert_cityscapes_image(job: ConversionJob) -> ImageRecord:
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    image_path, polygons_path, instance_path = job.inputs
    train_id_path, panoptic_path = job.outputs
    for path in job.inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing")
    image_size = read_png_size(image_path)
    if image_size is None:
        raise ValueError(f"{image_path}: image corrupt")
    if read_png_size(instance_path) != image_size:
        raise ValueError(f"{instance_path}: corrupt or not of the image size {image_size}")
    with atomic_path(train_id_path) as tmp_path:
        json2labelImg(polygons_path, tmp_path, "trainIds")
        train_ids = np.asarray(Image.open(tmp_path))
        if train_ids.shape != image_size:
            raise ValueError(
                f"{polygons_path}: imgHeight/imgWidth {train_ids.shape} differ from {image_size}"
            )
    segments_info = panoptic_from_instance_ids(instance_path, panoptic_path)
    return image_record(job, train_ids, segments_info)


def prepare_cityscapes(root: str, split: str, workers: int = 1) -> ConversionReport:
    """Convert one split (``"train"`` or ``"val"``) of the Cityscapes folder ``root``."""
    paths = cityscapes_paths(root, split)
    polygon_files = sorted(glob.glob(os.path.join(paths["label_dir"], "*", "*_gtFine_polygons.json")))
    if not polygon_files:
        raise FileNotFoundError(
            f"no Cityscapes annotations found: expected {paths['label_dir']}/<city>/*_gtFine_polygons.json"
        )
    jobs: List[ConversionJob] = []
    for polygon_file in polygon_files:
        prefix = polygon_file[: -len("_gtFine_polygons.json")]
        image_id = os.path.basename(prefix)
        city = os.path.basename(os.path.dirname(polygon_file))
        jobs.append(
            ConversionJob(
                image_id=image_id,
                inputs=[
                    os.path.join(paths["image_dir"], city, f"{image_id}_leftImg8bit.png"),
                    polygon_file,
                    f"{prefix}_gtFine_instanceIds.png",
                ],
                outputs=[
                    f"{prefix}_gtFine_labelTrainIds.png",
                    os.path.join(paths["panoptic_dir"], f"{image_id}_gtFine_panoptic.png"),
                ],
            )
        )
    return run_conversion(
        jobs,
        _convert_cityscapes_image,
        paths=paths,
        info={"description": f"Cityscapes {split} panoptic", "has_instances": True},
        workers=workers,
        description=f"Cityscapes {split}",
    )


@exit_code_on_missing_input
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = conversion_parser(DESCRIPTION, "cityscapes")
    parser.add_argument(
        "--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="splits to convert"
    )
    args = parser.parse_args(argv)
    exit_code = 0
    for split in args.splits:
        report = prepare_cityscapes(args.root, split, workers=args.workers)
        exit_code = max(exit_code, print_report(report, f"Cityscapes {split} ({args.root})"))
    return exit_code
