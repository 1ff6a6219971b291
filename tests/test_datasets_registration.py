"""Registration in Detectron2's DatasetCatalog / MetadataCatalog."""
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from gbw_panoptic.data.datasets import DATASET_NAMES, register_all

SYNTHETIC = (
    "synthetic_source_panoptic_train",
    "synthetic_source_panoptic_val",
    "synthetic_target_panoptic_train",
    "synthetic_target_panoptic_val",
)
THINGS = {"person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"}


@pytest.fixture
def other_root(tmp_path, synthetic_datasets):
    """Register every dataset under ``tmp_path``; restore the synthetic benchmark afterwards."""
    register_all(str(tmp_path))
    yield tmp_path
    register_all(str(synthetic_datasets))


def test_all_names_registered(synthetic_datasets):
    assert set(DATASET_NAMES) <= set(DatasetCatalog.list())


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_metadata(synthetic_datasets, name):
    meta = MetadataCatalog.get(name)
    assert len(meta.stuff_classes) == 19 and meta.stuff_classes[0] == "road"
    assert len(meta.thing_classes) == 19 and len(meta.stuff_colors) == 19 and len(meta.thing_colors) == 19
    thing_ids = set(meta.thing_dataset_id_to_contiguous_id.values())
    assert {meta.stuff_classes[i] for i in thing_ids} == THINGS
    assert meta.thing_dataset_id_to_contiguous_id[26] == 13  # car: label id 26 -> train id 13
    assert sorted(meta.stuff_dataset_id_to_contiguous_id.values()) == list(range(19))
    assert meta.label_divisor == 1000 and meta.ignore_label == 255
    assert meta.evaluator_type == "gbw_panoptic"
    for key in ("panoptic_root", "panoptic_json", "gt_dir", "class_stats_file", "image_root"):
        assert isinstance(getattr(meta, key), str)
    if name.startswith(("synthia", "synthetic_source")):
        assert len(meta.evaluation_classes) == 16
        assert not {9, 14, 16} & set(meta.evaluation_classes)
    else:
        assert meta.evaluation_classes == list(range(19))
    if name.startswith(("cityscapes", "synthetic_target", "mapillary")):
        assert meta.evaluation_classes_16 == [c for c in range(19) if c not in (9, 14, 16)]


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_dataset_dicts(synthetic_datasets, name):
    dataset_dicts = DatasetCatalog.get(name)
    assert len(dataset_dicts) == {"synthetic_source_panoptic_train": 16, "synthetic_source_panoptic_val": 4,
                                  "synthetic_target_panoptic_train": 8, "synthetic_target_panoptic_val": 6}[name]
    root = str(synthetic_datasets)
    for record in dataset_dicts:
        assert isinstance(record["image_id"], str)
        assert (record["height"], record["width"]) == (128, 256) and record["has_instances"] is True
        for key in ("file_name", "sem_seg_file_name", "pan_seg_file_name"):
            assert record[key].startswith(root) and os.path.isfile(record[key])
        assert Image.open(record["file_name"]).size == (256, 128)
        sem_seg = np.asarray(Image.open(record["sem_seg_file_name"]))
        assert set(np.unique(sem_seg)) <= set(range(19)) | {255}
        for segment in record["segments_info"]:
            assert set(segment) >= {"id", "category_id", "iscrowd", "area", "bbox", "isthing"}
            assert 0 <= segment["category_id"] < 19
            assert segment["isthing"] == (segment["category_id"] >= 11)
        # Every labelled class of the semantic map has a segment of that category.
        categories = {s["category_id"] for s in record["segments_info"]}
        assert categories == set(np.unique(sem_seg)) - {255}


def test_class_stats_file_matches_dataset(synthetic_datasets):
    import json

    name = "synthetic_source_panoptic_train"
    with open(MetadataCatalog.get(name).class_stats_file) as f:
        stats = json.load(f)
    assert len(stats["classes"]) == 19
    for record in DatasetCatalog.get(name):
        sem_seg = np.asarray(Image.open(record["sem_seg_file_name"]))
        assert stats["images"][record["image_id"]] == np.bincount(sem_seg.ravel(), minlength=256)[:19].tolist()


def test_detectron2_builtin_loader_reads_the_prepared_cityscapes_layout(synthetic_datasets):
    from detectron2.data.datasets.builtin_meta import CITYSCAPES_CATEGORIES
    from detectron2.data.datasets.cityscapes_panoptic import load_cityscapes_panoptic

    meta = {
        "thing_dataset_id_to_contiguous_id": {c["id"]: c["trainId"] for c in CITYSCAPES_CATEGORIES if c["isthing"]},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: c["trainId"] for c in CITYSCAPES_CATEGORIES if not c["isthing"]},
    }
    target = synthetic_datasets / "synthetic" / "target"
    dataset_dicts = load_cityscapes_panoptic(
        str(target / "leftImg8bit" / "val"),
        str(target / "gtFine" / "cityscapes_panoptic_val"),
        str(target / "gtFine" / "cityscapes_panoptic_val.json"),
        meta,
    )
    ours = {d["image_id"]: d for d in DatasetCatalog.get("synthetic_target_panoptic_val")}
    assert len(dataset_dicts) == len(ours) == 6
    for record in dataset_dicts:
        assert record["sem_seg_file_name"] == ours[record["image_id"]]["sem_seg_file_name"]
        assert record["pan_seg_file_name"] == ours[record["image_id"]]["pan_seg_file_name"]


@pytest.mark.parametrize(
    "name, expected_file, script",
    [
        ("synthia_panoptic_train", os.path.join("synthia", "GT", "panoptic.json"), "prepare_synthia.py"),
        ("gta5_panoptic_train", os.path.join("gta5", "panoptic.json"), "prepare_gta5.py"),
        ("cityscapes_panoptic_val", os.path.join("gtFine", "cityscapes_panoptic_val.json"), "prepare_cityscapes.py"),
        ("cityscapes_panoptic_train", os.path.join("leftImg8bit", "train"), "prepare_cityscapes.py"),
        ("synthetic_target_panoptic_val", os.path.join("synthetic", "target", "gtFine"), "prepare_synthetic.py"),
    ],
)
def test_missing_dataset_names_file_and_script(other_root, name, expected_file, script):
    with pytest.raises(FileNotFoundError) as error:
        DatasetCatalog.get(name)
    message = str(error.value)
    assert str(other_root) in message and expected_file in message and script in message and name in message


def test_unlabelled_target_train_lists_images(other_root):
    image_dir = other_root / "cityscapes" / "leftImg8bit" / "train" / "aachen"
    image_dir.mkdir(parents=True)
    Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(image_dir / "aachen_000000_000019_leftImg8bit.png")
    (record,) = DatasetCatalog.get("cityscapes_panoptic_train")
    assert record == {
        "file_name": str(image_dir / "aachen_000000_000019_leftImg8bit.png"),
        "image_id": "aachen_000000_000019",
        "height": 16,
        "width": 32,
    }
