"""Mapillary Vistas v1.2 panoptic -> 19 Cityscapes classes, resized (``datasets/prepare_mapillary.py``).

Each image of a split is read with its Mapillary panoptic PNG and ``panoptic_2018.json`` segments,
its segments are mapped to Cityscapes label ids (:data:`MAPILLARY_TO_LABEL_ID`, the mapping of the
panoptic UDA literature), and the image and labels are resized to fit ``1024x768`` as EDAPS does
(:func:`fitted_size`). All label outputs come from one resized Cityscapes-style instance-id image,
so the train-id PNG, the panoptic PNG and its ``segments_info`` agree by construction.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image

from ..datasets.builtin_meta import LABEL_DIVISOR, THING_LABEL_IDS, label_id_to_train_id_lut
from ..datasets.layout import mapillary_paths
from .conversion import (
    ConversionJob,
    ConversionReport,
    ImageRecord,
    conversion_parser,
    exit_code_on_missing_input,
    image_record,
    instance_ids_from_labels,
    panoptic_from_instance_ids,
    print_report,
    run_conversion,
    save_png,
)

__all__ = [
    "MAPILLARY_TO_LABEL_ID",
    "SPLITS",
    "DEFAULT_SIZE",
    "mapillary_input_paths",
    "fitted_size",
    "mapillary_instance_ids",
    "prepare_mapillary",
    "main",
]

#: The two labelled splits of the release (folder names as downloaded).
SPLITS = ("training", "validation")

#: (width, height) the images are fitted into, as EDAPS' ``ResizeWithPad(img_scale=(1024, 768))``.
DEFAULT_SIZE = (1024, 768)

#: Mapillary Vistas v1.2 panoptic category id (``panoptic_2018.json``, 1..65) -> (Mapillary label
#: name, Cityscapes label id); every other category is void. The mapping of EDAPS'
#: ``mapillaryscripts/map_ids_19_classes.py`` (taken from CVRN), whose keys are the same classes
#: counted from 0.
MAPILLARY_TO_LABEL_ID: Dict[int, Tuple[str, int]] = {
    8: ("construction--flat--bike-lane", 7),  # road
    9: ("construction--flat--crosswalk-plain", 7),
    11: ("construction--flat--parking", 7),
    14: ("construction--flat--road", 7),
    15: ("construction--flat--service-lane", 7),
    24: ("marking--crosswalk-zebra", 7),
    25: ("marking--general", 7),
    3: ("construction--barrier--curb", 8),  # sidewalk
    10: ("construction--flat--curb-cut", 8),
    12: ("construction--flat--pedestrian-area", 8),
    16: ("construction--flat--sidewalk", 8),
    18: ("construction--structure--building", 11),  # building
    7: ("construction--barrier--wall", 12),  # wall
    4: ("construction--barrier--fence", 13),  # fence
    46: ("object--support--pole", 17),  # pole
    48: ("object--support--utility-pole", 17),
    49: ("object--traffic-light", 19),  # traffic light
    50: ("object--traffic-sign--back", 20),  # traffic sign
    51: ("object--traffic-sign--front", 20),
    31: ("nature--vegetation", 21),  # vegetation
    30: ("nature--terrain", 22),  # terrain
    28: ("nature--sky", 23),  # sky
    20: ("human--person", 24),  # person
    21: ("human--rider--bicyclist", 25),  # rider
    22: ("human--rider--motorcyclist", 25),
    23: ("human--rider--other-rider", 25),
    56: ("object--vehicle--car", 26),  # car
    62: ("object--vehicle--truck", 27),  # truck
    55: ("object--vehicle--bus", 28),  # bus
    59: ("object--vehicle--on-rails", 31),  # train
    58: ("object--vehicle--motorcycle", 32),  # motorcycle
    53: ("object--vehicle--bicycle", 33),  # bicycle
}

DESCRIPTION = """\
Convert Mapillary Vistas v1.2 (panoptic release) to the 19 Cityscapes classes: resized images,
train-id label images and COCO panoptic annotations.

Expected input layout (as downloaded, ROOT = e.g. datasets/mapillary; the v2.0 download, which
holds the v1.2 annotations under <split>/v1.2/panoptic/, works too):
  ROOT/{training,validation}/images/<id>.jpg
  ROOT/{training,validation}/panoptic/panoptic_2018.json   category ids of v1.2 (1..65)
  ROOT/{training,validation}/panoptic/<id>.png             id = R + 256 G + 256^2 B

Every image and its labels are resized to fit --size WIDTH HEIGHT (default 1024 768, aspect ratio
kept, the rule of EDAPS' ResizeWithPad without its padding): the image with area interpolation
(bilinear when enlarging; --image-interpolation bicubic is EDAPS' choice), the labels with nearest
neighbour. Outputs (existing valid outputs are kept, so re-running only converts what is missing;
another --size or --image-interpolation re-converts everything):
  ROOT/<split>/cityscapes19/images/<id>.png                 resized RGB image
  ROOT/<split>/cityscapes19/labels/<id>_labelTrainIds.png   Cityscapes train ids (255 = ignore)
  ROOT/<split>/cityscapes19/panoptic/<id>_panoptic.png      COCO panoptic PNG (thing id = labelId*1000+k)
  ROOT/<split>/cityscapes19/panoptic.json                   COCO panoptic JSON, category_id = Cityscapes label id
  ROOT/<split>/cityscapes19/class_stats.json                per-image class pixel counts
  ROOT/<split>/cityscapes19/class_frequencies.json          class frequency summary

Mapillary categories map to Cityscapes classes as in datasets/README.md (EDAPS' mapping); the
others are void. Crowd segments of thing classes become crowd segments, segments of Mapillary
thing classes that are Cityscapes stuff (pole, traffic light, traffic sign) merge into one stuff
segment per class.
"""

_INTERPOLATIONS = ("area", "bicubic")


def mapillary_input_paths(root: str, split: str) -> Dict[str, str]:
    """The downloaded inputs of one split: ``image_dir``, ``panoptic_dir`` and ``panoptic_json``.

    The annotations are looked for in ``<split>/panoptic/`` (v1.2 download), then in
    ``<split>/v1.2/panoptic/`` (v2.0 download).

    Raises:
        FileNotFoundError: neither ``panoptic_2018.json`` exists.
    """
    candidates = [os.path.join(root, split, "panoptic"), os.path.join(root, split, "v1.2", "panoptic")]
    for panoptic_dir in candidates:
        panoptic_json = os.path.join(panoptic_dir, "panoptic_2018.json")
        if os.path.isfile(panoptic_json):
            return {
                "image_dir": os.path.join(root, split, "images"),
                "panoptic_dir": panoptic_dir,
                "panoptic_json": panoptic_json,
            }
    expected = " or ".join(os.path.join(d, "panoptic_2018.json") for d in candidates)
    raise FileNotFoundError(f"no Mapillary Vistas v1.2 panoptic annotations found: expected {expected}")


def fitted_size(width: int, height: int, max_width: int, max_height: int) -> Tuple[int, int]:
    """Size ``(width, height)`` that fits ``max_width x max_height`` with the aspect ratio kept.

    EDAPS' ``ResizeWithPad`` rule: images wider than the target ratio get the target width, the
    others the target height; the other side is scaled and truncated to an integer (at least 1).
    Images smaller than the target are enlarged.
    """
    if width / height > max_width / max_height:
        return max_width, max(1, int(height * max_width / width))
    return max(1, int(width * max_height / height)), max_height


def _category_map(categories: List[Dict[str, Any]], panoptic_json: str) -> Dict[int, int]:
    """Mapillary category id -> Cityscapes label id, checked against the JSON's ``categories``.

    Raises:
        ValueError: a mapped id names another class than in v1.2 (e.g. a v2.0 JSON).
    """
    by_id = {category["id"]: category for category in categories}
    for category_id, (name, _) in MAPILLARY_TO_LABEL_ID.items():
        category = by_id.get(category_id)
        if category is None or name not in (category.get("supercategory"), category.get("name")):
            found = None if category is None else category.get("supercategory", category.get("name"))
            raise ValueError(
                f"{panoptic_json}: category id {category_id} is {found!r}, expected {name!r}; "
                "the categories of Mapillary Vistas v1.2 (panoptic_2018.json) are expected"
            )
    return {category_id: label_id for category_id, (_, label_id) in MAPILLARY_TO_LABEL_ID.items()}


def mapillary_instance_ids(
    segment_ids: np.ndarray, segments_info: Sequence[Dict[str, Any]], category_map: Dict[int, int]
) -> np.ndarray:
    """Cityscapes-style instance-id image of a Mapillary panoptic image.

    Args:
        segment_ids: HxW Mapillary panoptic ids (0 = void).
        segments_info: the image's segments (``id``, ``category_id``, ``iscrowd``).
        category_map: Mapillary category id -> Cityscapes label id (others are void).

    Returns:
        HxW int32: ``labelId * 1000 + k`` for the k-th non-crowd segment of a Cityscapes thing class
        (in the order of ``segments_info``), ``labelId`` for stuff and crowd pixels, 0 for void.

    Raises:
        ValueError: a pixel's id is not listed in ``segments_info`` (checked on the ids given, i.e.
            after the resize in the converter).
    """
    listed = np.array(sorted(segment["id"] for segment in segments_info), dtype=np.int64)
    labels_of_listed = np.zeros(len(listed), dtype=np.int64)
    instances_of_listed = np.zeros(len(listed), dtype=np.int64)
    for order, segment in enumerate(segments_info):
        position = int(np.searchsorted(listed, segment["id"]))
        label_id = category_map.get(segment["category_id"], 0)
        labels_of_listed[position] = label_id
        if label_id in THING_LABEL_IDS and not segment.get("iscrowd", 0):
            instances_of_listed[position] = order + 1
    labelled = segment_ids != 0
    values = segment_ids[labelled]
    positions = np.minimum(np.searchsorted(listed, values), max(len(listed) - 1, 0))
    known = listed[positions] == values if len(listed) else np.zeros(values.shape, dtype=bool)
    if not known.all():
        unknown = np.unique(values[~known])[:5].tolist()
        raise ValueError(f"panoptic ids {unknown} are not in the image's segments_info")
    label_ids = np.zeros(segment_ids.shape, dtype=np.int64)
    instance_map = np.zeros(segment_ids.shape, dtype=np.int64)
    label_ids[labelled] = labels_of_listed[positions]
    instance_map[labelled] = instances_of_listed[positions]
    return instance_ids_from_labels(label_ids, instance_map, THING_LABEL_IDS)


def _read_rgb(path: str) -> np.ndarray:
    """HxWx3 uint8 RGB pixels of an image file (fully decoded, so truncated files fail)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: cannot be read as an image (missing or corrupt): {e}") from e


def _resize_image(image: np.ndarray, size: Tuple[int, int], interpolation: str) -> np.ndarray:
    """``image`` resized to ``size`` (width, height): area when shrinking, bilinear when enlarging,
    or bicubic."""
    height, width = image.shape[:2]
    if interpolation == "bicubic":
        flag = cv2.INTER_CUBIC
    else:
        flag = cv2.INTER_AREA if size[0] <= width and size[1] <= height else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=flag)


def _read_mapillary_panoptic(path: str) -> np.ndarray:
    """HxW int32 segment ids of a Mapillary panoptic PNG (RGB, id = R + 256 G + 256^2 B)."""
    try:
        with Image.open(path) as image:
            if image.mode != "RGB":
                raise ValueError(f"expected an RGB panoptic PNG, got mode {image.mode}")
            rgb = np.asarray(image).astype(np.int32)
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: cannot be read as a panoptic PNG (missing or corrupt): {e}") from e
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _convert_mapillary_image(job: ConversionJob) -> ImageRecord:
    image_path, mapillary_panoptic_path = job.inputs
    train_id_path, panoptic_path, resized_image_path = job.outputs
    image = _read_rgb(image_path)
    segment_ids = _read_mapillary_panoptic(mapillary_panoptic_path)
    height, width = image.shape[:2]
    if segment_ids.shape != (height, width):
        raise ValueError(
            f"{mapillary_panoptic_path}: size {segment_ids.shape} differs from the image size {(height, width)}"
        )
    size = fitted_size(width, height, *job.options["size"])
    # Nearest neighbour on pixel centres (OpenCV's exact variant, as PIL's), aligned with the image;
    # the class mapping commutes with it, so it runs on the resized ids.
    resized_segment_ids = cv2.resize(segment_ids, size, interpolation=cv2.INTER_NEAREST_EXACT)
    try:
        instance_ids = mapillary_instance_ids(
            resized_segment_ids, job.options["segments_info"], job.options["category_map"]
        )
    except ValueError as e:
        raise ValueError(f"{mapillary_panoptic_path}: {e}") from e
    label_ids = np.where(instance_ids >= LABEL_DIVISOR, instance_ids // LABEL_DIVISOR, instance_ids)
    train_ids = label_id_to_train_id_lut()[label_ids]
    segments_info = panoptic_from_instance_ids(instance_ids, panoptic_path)
    save_png(train_id_path, train_ids)
    save_png(resized_image_path, _resize_image(image, size, job.options["image_interpolation"]))
    record = image_record(job, train_ids, segments_info)
    record.image["file_name"] = os.path.basename(resized_image_path)
    return record


def _load_panoptic_json(path: str) -> Dict[str, Any]:
    """The content of a COCO panoptic JSON, with its ``images``, ``annotations`` and ``categories``."""
    try:
        with open(path) as f:
            content = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    keys = ("images", "annotations", "categories")
    missing = [key for key in keys if not isinstance(content, dict) or key not in content]
    if missing:
        raise ValueError(f"{path}: not a COCO panoptic JSON, {missing} missing")
    return content


def prepare_mapillary(
    root: str,
    split: str,
    workers: int = 1,
    size: Tuple[int, int] = DEFAULT_SIZE,
    image_interpolation: str = "area",
) -> ConversionReport:
    """Convert one split (``"training"`` or ``"validation"``) of the Mapillary folder ``root``.

    Args:
        size: (width, height) every image is fitted into (:func:`fitted_size`).
        image_interpolation: ``"area"`` (area when shrinking, bilinear when enlarging) or
            ``"bicubic"`` (EDAPS); labels always use nearest neighbour.
    """
    if image_interpolation not in _INTERPOLATIONS:
        raise ValueError(f"image_interpolation must be one of {_INTERPOLATIONS}, got {image_interpolation!r}")
    if min(size) < 1:
        raise ValueError(f"size must be two positive integers (width, height), got {size}")
    inputs = mapillary_input_paths(root, split)
    paths = mapillary_paths(root, split)
    content = _load_panoptic_json(inputs["panoptic_json"])
    category_map = _category_map(content["categories"], inputs["panoptic_json"])
    image_files = {image["id"]: image["file_name"] for image in content["images"]}
    jobs: List[ConversionJob] = []
    for annotation in content["annotations"]:
        image_id = str(annotation["image_id"])
        if annotation["image_id"] not in image_files:
            raise ValueError(
                f"{inputs['panoptic_json']}: annotation of image_id {image_id!r} has no 'images' entry"
            )
        jobs.append(
            ConversionJob(
                image_id=image_id,
                inputs=[
                    os.path.join(inputs["image_dir"], image_files[annotation["image_id"]]),
                    os.path.join(inputs["panoptic_dir"], annotation["file_name"]),
                ],
                outputs=[
                    os.path.join(paths["label_dir"], f"{image_id}_labelTrainIds.png"),
                    os.path.join(paths["panoptic_dir"], f"{image_id}_panoptic.png"),
                    os.path.join(paths["image_dir"], f"{image_id}.png"),
                ],
                options={
                    "segments_info": annotation["segments_info"],
                    "category_map": category_map,
                    "size": tuple(size),
                    "image_interpolation": image_interpolation,
                },
            )
        )
    if not jobs:
        raise FileNotFoundError(f"{inputs['panoptic_json']} lists no annotations")
    width, height = size
    return run_conversion(
        jobs,
        _convert_mapillary_image,
        paths=paths,
        info={
            "description": f"Mapillary Vistas v1.2 {split} panoptic, 19 Cityscapes classes",
            "has_instances": True,
            "resize": f"fit {width}x{height}, image {image_interpolation}, labels nearest",
        },
        workers=workers,
        description=f"Mapillary {split}",
    )


@exit_code_on_missing_input
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = conversion_parser(DESCRIPTION, "mapillary")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="splits to convert")
    parser.add_argument(
        "--size",
        nargs=2,
        type=int,
        default=list(DEFAULT_SIZE),
        metavar=("WIDTH", "HEIGHT"),
        help="fit every image into WIDTH x HEIGHT, aspect ratio kept (default: %(default)s, EDAPS)",
    )
    parser.add_argument(
        "--image-interpolation",
        choices=_INTERPOLATIONS,
        default="area",
        help="area (bilinear when enlarging) or bicubic (EDAPS) (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    exit_code = 0
    for split in args.splits:
        try:
            report = prepare_mapillary(args.root, split, args.workers, tuple(args.size), args.image_interpolation)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        exit_code = max(exit_code, print_report(report, f"Mapillary {split} ({args.root})"))
    return exit_code
