"""Registration of the builtin panoptic datasets in Detectron2's ``DatasetCatalog`` / ``MetadataCatalog``.

Datasets (folders relative to the datasets root, ``$DETECTRON2_DATASETS`` or ``./datasets``):

====================================  ==========================  =================================
name                                  folder (layout)             prepared by
====================================  ==========================  =================================
``synthia_panoptic_train``            ``synthia`` (SYNTHIA)       ``datasets/prepare_synthia.py``
``gta5_panoptic_train``               ``gta5`` (GTA5)             ``datasets/prepare_gta5.py``
``cityscapes_panoptic_train``         ``cityscapes`` (Cityscapes)  ``datasets/prepare_cityscapes.py``
``cityscapes_panoptic_val``           ``cityscapes``              ``datasets/prepare_cityscapes.py``
``synthetic_source_panoptic_train``   ``synthetic/source`` (SYNTHIA)  ``datasets/prepare_synthetic.py``
``synthetic_source_panoptic_val``     ``synthetic/source_val`` (SYNTHIA)  ``datasets/prepare_synthetic.py``
``synthetic_target_panoptic_train``   ``synthetic/target`` (Cityscapes)  ``datasets/prepare_synthetic.py``
``synthetic_target_panoptic_val``     ``synthetic/target``        ``datasets/prepare_synthetic.py``
``mapillary_panoptic_train``          ``mapillary`` (Mapillary)   ``datasets/prepare_mapillary.py``
``mapillary_panoptic_val``            ``mapillary``               ``datasets/prepare_mapillary.py``
====================================  ==========================  =================================

Registration only records paths; files are read when a dataset is loaded from ``DatasetCatalog``,
which raises a ``FileNotFoundError`` naming the missing file and the script that creates it.
The target ``*_train`` sets are unlabelled during UDA: if their panoptic JSON does not exist, they
list the images only (``file_name``, ``image_id``, ``height``, ``width``).
"""
from __future__ import annotations

import functools
import glob
import json
import os
from typing import Any, Callable, Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from .builtin_meta import (
    ALL_EVAL_TRAIN_IDS,
    LABEL_ID_TO_TRAIN_ID,
    SYNTHIA_EVAL_TRAIN_IDS,
    THING_LABEL_IDS,
    panoptic_metadata,
)
from .layout import cityscapes_paths, datasets_root, gta5_paths, mapillary_paths, synthia_paths

__all__ = ["register_all", "load_panoptic_dataset", "load_cityscapes_images", "DATASET_NAMES"]

DATASET_NAMES = (
    "synthia_panoptic_train",
    "gta5_panoptic_train",
    "cityscapes_panoptic_train",
    "cityscapes_panoptic_val",
    "synthetic_source_panoptic_train",
    "synthetic_source_panoptic_val",
    "synthetic_target_panoptic_train",
    "synthetic_target_panoptic_val",
    "mapillary_panoptic_train",
    "mapillary_panoptic_val",
)


def load_panoptic_dataset(
    name: str,
    panoptic_json: str,
    panoptic_dir: str,
    image_file: Callable[[Dict[str, Any]], str],
    sem_seg_file: Callable[[Dict[str, Any]], str],
    prepare_command: str,
) -> List[Dict[str, Any]]:
    """Dataset dicts of a prepared panoptic dataset (Detectron2 panoptic standard).

    Args:
        name: dataset name (for error messages).
        panoptic_json: COCO panoptic JSON written by a prepare script (``category_id`` = label id).
        panoptic_dir: folder of the panoptic PNGs.
        image_file, sem_seg_file: map a JSON ``images`` entry to its RGB image / train-id label path.
        prepare_command: the command that creates the files, quoted in errors.

    Returns:
        Dicts with ``file_name``, ``image_id``, ``height``, ``width``, ``pan_seg_file_name``,
        ``sem_seg_file_name``, ``segments_info`` (``category_id`` = contiguous train id, ``isthing``)
        and ``has_instances`` (False when the dataset was prepared without thing instances).
    """
    if not os.path.isfile(panoptic_json):
        raise FileNotFoundError(
            f"Dataset '{name}': expected the panoptic annotation file {panoptic_json}; "
            f"create it with `{prepare_command}` (input layout: datasets/README.md)"
        )
    with open(panoptic_json) as f:
        content = json.load(f)
    has_instances = bool(content.get("info", {}).get("has_instances", True))
    images = {image["id"]: image for image in content["images"]}
    dataset_dicts = []
    for annotation in content["annotations"]:
        image = images[annotation["image_id"]]
        segments_info = [
            dict(
                segment,
                category_id=LABEL_ID_TO_TRAIN_ID[segment["category_id"]],
                isthing=segment["category_id"] in THING_LABEL_IDS,
            )
            for segment in annotation["segments_info"]
        ]
        dataset_dicts.append(
            {
                "file_name": image_file(image),
                "image_id": image["id"],
                "height": image["height"],
                "width": image["width"],
                "pan_seg_file_name": os.path.join(panoptic_dir, annotation["file_name"]),
                "sem_seg_file_name": sem_seg_file(image),
                "segments_info": segments_info,
                "has_instances": has_instances,
            }
        )
    if not dataset_dicts:
        raise FileNotFoundError(
            f"Dataset '{name}': {panoptic_json} lists no images; re-run `{prepare_command}`"
        )
    for key in ("file_name", "sem_seg_file_name", "pan_seg_file_name"):
        if not os.path.isfile(dataset_dicts[0][key]):
            raise FileNotFoundError(
                f"Dataset '{name}': {key} {dataset_dicts[0][key]} listed in {panoptic_json} does not "
                f"exist; re-run `{prepare_command}`"
            )
    return dataset_dicts


def load_cityscapes_images(name: str, image_dir: str, prepare_command: str) -> List[Dict[str, Any]]:
    """Unlabelled dataset dicts of the ``<city>/*_leftImg8bit.png`` images under ``image_dir``."""
    files = sorted(glob.glob(os.path.join(image_dir, "*", "*_leftImg8bit.png")))
    if not files:
        raise FileNotFoundError(
            f"Dataset '{name}': no images found, expected {image_dir}/<city>/*_leftImg8bit.png "
            f"(and the labels created by `{prepare_command}`; see datasets/README.md)"
        )
    dataset_dicts = []
    for file_name in files:
        with Image.open(file_name) as image:
            width, height = image.size
        image_id = os.path.basename(file_name)[: -len("_leftImg8bit.png")]
        dataset_dicts.append({"file_name": file_name, "image_id": image_id, "height": height, "width": width})
    return dataset_dicts


def _flat_image_file(paths: Dict[str, str], image: Dict[str, Any]) -> str:
    return os.path.join(paths["image_dir"], image["file_name"])


def _flat_sem_seg_file(paths: Dict[str, str], image: Dict[str, Any]) -> str:
    return os.path.join(paths["label_dir"], f"{image['id']}_labelTrainIds.png")


def _cityscapes_image_file(paths: Dict[str, str], image: Dict[str, Any]) -> str:
    city = image["id"].split("_")[0]
    return os.path.join(paths["image_dir"], city, image["file_name"])


def _cityscapes_sem_seg_file(paths: Dict[str, str], image: Dict[str, Any]) -> str:
    city = image["id"].split("_")[0]
    return os.path.join(paths["label_dir"], city, f"{image['id']}_gtFine_labelTrainIds.png")


def _load_cityscapes_split(name: str, paths: Dict[str, str], prepare_command: str, labels_optional: bool):
    if labels_optional and not os.path.isfile(paths["panoptic_json"]):
        return load_cityscapes_images(name, paths["image_dir"], prepare_command)
    return load_panoptic_dataset(
        name,
        paths["panoptic_json"],
        paths["panoptic_dir"],
        functools.partial(_cityscapes_image_file, paths),
        functools.partial(_cityscapes_sem_seg_file, paths),
        prepare_command,
    )


def _register(
    name: str,
    loader: Callable[[], List[Dict[str, Any]]],
    paths: Dict[str, str],
    evaluation_classes: List[int],
    **extra_metadata: Any,
) -> None:
    """(Re)register ``name``; ``gt_dir`` is the folder of the train-id label images."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(
        **panoptic_metadata(evaluation_classes),
        image_root=paths["image_dir"],
        panoptic_root=paths["panoptic_dir"],
        panoptic_json=paths["panoptic_json"],
        gt_dir=paths["label_dir"],
        class_stats_file=paths["class_stats"],
        **extra_metadata,
    )


def _register_flat_layout(
    name: str, paths: Dict[str, str], prepare_command: str, evaluation_classes: List[int], **extra_metadata: Any
) -> None:
    """A dataset with all images in one folder (SYNTHIA, GTA5 and converted Mapillary layouts)."""
    loader = functools.partial(
        load_panoptic_dataset,
        name,
        paths["panoptic_json"],
        paths["panoptic_dir"],
        functools.partial(_flat_image_file, paths),
        functools.partial(_flat_sem_seg_file, paths),
        prepare_command,
    )
    _register(name, loader, paths, evaluation_classes, **extra_metadata)


def _register_cityscapes_layout(name: str, folder: str, split: str, prepare_command: str) -> None:
    paths = cityscapes_paths(folder, split)
    loader = functools.partial(_load_cityscapes_split, name, paths, prepare_command, split == "train")
    _register(name, loader, paths, ALL_EVAL_TRAIN_IDS, evaluation_classes_16=list(SYNTHIA_EVAL_TRAIN_IDS))


def register_all(root: Optional[str] = None) -> List[str]:
    """(Re)register every builtin dataset under ``root``.

    Args:
        root: datasets root; default ``$DETECTRON2_DATASETS`` or ``./datasets``.

    Returns:
        The registered dataset names.
    """
    root = datasets_root() if root is None else str(root)
    synthia, gta5 = os.path.join(root, "synthia"), os.path.join(root, "gta5")
    cityscapes = os.path.join(root, "cityscapes")
    source, target = os.path.join(root, "synthetic", "source"), os.path.join(root, "synthetic", "target")
    synthetic_command = f"python datasets/prepare_synthetic.py {os.path.join(root, 'synthetic')}"

    _register_flat_layout(
        "synthia_panoptic_train",
        synthia_paths(synthia),
        f"python datasets/prepare_synthia.py {synthia}",
        SYNTHIA_EVAL_TRAIN_IDS,
    )
    _register_flat_layout(
        "gta5_panoptic_train", gta5_paths(gta5), f"python datasets/prepare_gta5.py {gta5}", ALL_EVAL_TRAIN_IDS
    )
    _register_flat_layout(
        "synthetic_source_panoptic_train", synthia_paths(source), synthetic_command, SYNTHIA_EVAL_TRAIN_IDS
    )
    _register_flat_layout(
        "synthetic_source_panoptic_val", synthia_paths(f"{source}_val"), synthetic_command, SYNTHIA_EVAL_TRAIN_IDS
    )
    for split in ("train", "val"):
        _register_cityscapes_layout(
            f"cityscapes_panoptic_{split}",
            cityscapes,
            split,
            f"python datasets/prepare_cityscapes.py {cityscapes}",
        )
        _register_cityscapes_layout(f"synthetic_target_panoptic_{split}", target, split, synthetic_command)
    mapillary = os.path.join(root, "mapillary")
    for split, folder in (("train", "training"), ("val", "validation")):
        # A SYNTHIA -> Mapillary target: all 19 classes, and the 16 SYNTHIA has.
        _register_flat_layout(
            f"mapillary_panoptic_{split}",
            mapillary_paths(mapillary, folder),
            f"python datasets/prepare_mapillary.py {mapillary} --splits {folder}",
            ALL_EVAL_TRAIN_IDS,
            evaluation_classes_16=list(SYNTHIA_EVAL_TRAIN_IDS),
        )
    return list(DATASET_NAMES)
