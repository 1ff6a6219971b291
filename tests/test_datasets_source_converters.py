"""SYNTHIA class/instance mapping and GTA5 connected-component instances, on hand-made label files."""
import json
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from gbw_panoptic.data.datasets.builtin_meta import SYNTHIA_EVAL_TRAIN_IDS, THING_LABEL_IDS
from gbw_panoptic.data.datasets.layout import synthia_paths
from gbw_panoptic.data.prepare import gta5, synthia
from gbw_panoptic.data.prepare.conversion import instance_ids_from_labels

# SYNTHIA id -> Cityscapes train id, written out independently of the implementation.
SYNTHIA_TO_TRAIN_ID = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10,
    10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}


def _write_rgb(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(path)


def _write_synthia_labels(path: Path, class_ids: np.ndarray, instance_ids: np.ndarray) -> None:
    """16-bit PNG with RGB channels (class, instance, 0): OpenCV writes BGR, so reverse them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.stack([class_ids, instance_ids, np.zeros_like(class_ids)], axis=-1).astype(np.uint16)
    assert cv2.imwrite(str(path), rgb[..., ::-1])


def test_synthia_class_ids_map_to_cityscapes_train_ids(tmp_path):
    # One 4x4 block per SYNTHIA id 0..23 (0, 13, 14, 22, 23 are void).
    class_ids = np.repeat(np.repeat(np.arange(24, dtype=np.uint16).reshape(4, 6), 4, axis=0), 4, axis=1)
    _write_rgb(tmp_path / "RGB" / "0000000.png", *class_ids.shape)
    _write_synthia_labels(tmp_path / "GT" / "LABELS" / "0000000.png", class_ids, np.zeros_like(class_ids))

    report = synthia.prepare_synthia(str(tmp_path))
    assert report.failures == []
    train_ids = np.asarray(Image.open(tmp_path / "GT" / "LABELS" / "0000000_labelTrainIds.png"))
    expected = np.vectorize(lambda c: SYNTHIA_TO_TRAIN_ID.get(int(c), 255))(class_ids)
    np.testing.assert_array_equal(train_ids, expected)
    with open(tmp_path / "class_stats.json") as f:
        counts = json.load(f)["images"]["0000000"]
    assert counts == [16] * 19  # every train id has exactly one 4x4 block


def test_synthia_archive_top_folder_is_accepted(tmp_path):
    """RAND_CITYSCAPES.rar extracted into datasets/synthia keeps its top folder RAND_CITYSCAPES/; the
    conversion and the registered dataset (both through synthia_paths) use the folder inside."""
    data = tmp_path / "synthia" / "RAND_CITYSCAPES"
    class_ids = np.full((16, 24), 3, np.uint16)  # road
    _write_rgb(data / "RGB" / "0000000.png", *class_ids.shape)
    _write_synthia_labels(data / "GT" / "LABELS" / "0000000.png", class_ids, np.zeros_like(class_ids))
    assert synthia.main([str(tmp_path / "synthia"), "--workers", "1"]) == 0
    paths = synthia_paths(str(tmp_path / "synthia"))
    assert paths["image_dir"] == str(data / "RGB") and paths["class_stats"] == str(data / "class_stats.json")
    assert os.path.isfile(paths["panoptic_json"]) and os.path.isfile(paths["class_stats"])


def test_synthia_evaluation_subset_is_the_16_classes():
    assert len(SYNTHIA_EVAL_TRAIN_IDS) == 16
    assert set(range(19)) - set(SYNTHIA_EVAL_TRAIN_IDS) == {9, 14, 16}  # terrain, truck, train


def test_synthia_instances_come_from_the_instance_channel(tmp_path):
    class_ids = np.full((20, 30), 3, np.uint16)  # road
    instance_ids = np.zeros_like(class_ids)
    class_ids[2:8, 2:8], instance_ids[2:8, 2:8] = 8, 7  # car, instance 7
    class_ids[2:8, 10:16], instance_ids[2:8, 10:16] = 8, 9  # car, instance 9
    class_ids[10:18, 2:5], instance_ids[10:18, 2:5] = 10, 7  # pedestrian, instance 7
    class_ids[10:18, 20:25] = 10  # pedestrian without an instance id: crowd
    _write_rgb(tmp_path / "RGB" / "0000001.png", *class_ids.shape)
    _write_synthia_labels(tmp_path / "GT" / "LABELS" / "0000001.png", class_ids, instance_ids)

    report = synthia.prepare_synthia(str(tmp_path))
    (record,) = report.records
    segments = sorted(
        (s["id"], s["category_id"], s["iscrowd"], s["area"]) for s in record.annotation["segments_info"]
    )
    assert segments == [
        (7, 7, 0, 600 - 36 - 36 - 24 - 40),  # road
        (24, 24, 1, 40),  # crowd pedestrians
        (24000, 24, 0, 24),
        (26000, 26, 0, 36),
        (26001, 26, 0, 36),
    ]


def test_synthia_label_file_with_wrong_format_is_reported(tmp_path):
    _write_rgb(tmp_path / "RGB" / "0000000.png", 8, 8)
    (tmp_path / "GT" / "LABELS").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "GT" / "LABELS" / "0000000.png")
    report = synthia.prepare_synthia(str(tmp_path))
    ((inputs, message),) = report.failures
    assert "16-bit 3-channel" in message and "0000000.png" in message


def _write_gta5(root: Path, label_ids: np.ndarray, name: str = "00001") -> None:
    _write_rgb(root / "images" / f"{name}.png", *label_ids.shape)
    image = Image.fromarray(label_ids.astype(np.uint8), mode="P")  # GTA5 labels are palette PNGs
    image.putpalette([0] * 768)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    image.save(root / "labels" / f"{name}.png")


def _gta5_scene() -> np.ndarray:
    label_ids = np.full((40, 60), 7, np.uint8)  # road
    label_ids[5:15, 5:15] = 26  # car A
    label_ids[5:15, 15:25] = 26  # car B touching A: one component
    label_ids[20:30, 40:50] = 26  # car C
    label_ids[20:30, 5:9] = 24  # person
    label_ids[35:37, 50:52] = 24  # 4-pixel person fragment: below the area threshold
    label_ids[0:2, :] = 0  # unlabeled
    return label_ids


def test_gta5_connected_components():
    instances = gta5.connected_component_instances(_gta5_scene(), min_instance_area=16)
    car_instances = np.unique(instances[_gta5_scene() == 26])
    assert len(car_instances) == 2 and 0 not in car_instances
    assert len(np.unique(instances[5:15, 5:25])) == 1  # touching cars merge
    assert np.unique(instances[35:37, 50:52]).tolist() == [0]  # small fragment -> crowd
    assert np.all(instances[_gta5_scene() == 7] == 0)  # stuff has no instances


def _thing_segments(record):
    """Sorted (category_id, iscrowd, area) of the thing segments of an image record."""
    segments = record.annotation["segments_info"]
    return sorted((s["category_id"], s["iscrowd"], s["area"]) for s in segments if s["category_id"] >= 24)


def test_gta5_panoptic_with_and_without_instances(tmp_path):
    _write_gta5(tmp_path, _gta5_scene())
    report = gta5.prepare_gta5(str(tmp_path), min_instance_area=16)
    (record,) = report.records
    things = _thing_segments(record)
    assert things == [(24, 0, 40), (24, 1, 4), (26, 0, 100), (26, 0, 200)]

    # Switching instances off re-converts (the JSON info differs) and writes crowd segments only.
    report = gta5.prepare_gta5(str(tmp_path), instances=False)
    assert report.converted == 1
    (record,) = report.records
    things = _thing_segments(record)
    assert things == [(24, 1, 44), (26, 1, 300)]
    with open(tmp_path / "panoptic.json") as f:
        assert json.load(f)["info"]["has_instances"] is False


def test_gta5_rgb_label_is_reported(tmp_path):
    _write_gta5(tmp_path, _gta5_scene())
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "labels" / "00001.png")
    assert gta5.main([str(tmp_path), "--workers", "1"]) == 1
    ((inputs, message),) = gta5.prepare_gta5(str(tmp_path)).failures
    assert "single-channel" in message and os.path.join("labels", "00001.png") in message


def test_gta5_pairs_of_different_sizes_are_excluded_as_known(tmp_path, capsys):
    _write_gta5(tmp_path, _gta5_scene(), "00001")
    _write_gta5(tmp_path, _gta5_scene(), "00002")
    _write_rgb(tmp_path / "images" / "00002.png", 40, 64)  # the image 4 pixels wider than its label
    assert gta5.main([str(tmp_path), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 converted, 0 already valid (skipped), 1 excluded (image and label of different sizes, a known defect" in out
    assert re.search(r"EXCLUDED .*00002\.png: ImageLabelSizeMismatch: .*label size \(40, 60\) differs from image size \(40, 64\)", out)
    with open(tmp_path / "panoptic.json") as f:
        assert [image["id"] for image in json.load(f)["images"]] == ["00001"]
    report = gta5.prepare_gta5(str(tmp_path))  # a re-run reports it again
    assert (report.converted, report.skipped, len(report.excluded), report.failures) == (0, 1, 1, [])


def test_gta5_help_mentions_the_approximation(capsys):
    with pytest.raises(SystemExit):
        gta5.main(["--help"])
    out = capsys.readouterr().out
    assert "APPROXIMATED" in out and "--no-instances" in out


@settings(max_examples=50, deadline=None)
@given(
    labels=hnp.arrays(np.uint8, (6, 7), elements=st.sampled_from([0, 7, 11, 24, 26, 33])),
    instances=hnp.arrays(np.int32, (6, 7), elements=st.integers(0, 4)),
)
def test_instance_ids_encode_label_and_instance(labels, instances):
    ids = instance_ids_from_labels(labels, instances, THING_LABEL_IDS)
    is_instance = np.isin(labels, THING_LABEL_IDS) & (instances > 0)
    # Stuff, void and crowd pixels keep their label id; instances get labelId * 1000 + k.
    np.testing.assert_array_equal(ids[~is_instance], labels[~is_instance])
    np.testing.assert_array_equal(ids[is_instance] // 1000, labels[is_instance])
    # Pixels share an id exactly when they share (label, instance).
    pairs = {(int(l), int(i)) for l, i in zip(labels[is_instance], instances[is_instance])}
    assert len(np.unique(ids[is_instance])) == len(pairs)
    for label, instance in pairs:
        assert len(np.unique(ids[(labels == label) & (instances == instance)])) == 1
    # Instance indices of each class are 0, 1, ... without gaps.
    for label in np.unique(labels[is_instance]):
        ks = np.unique(ids[is_instance & (labels == label)]) % 1000
        assert ks.tolist() == list(range(len(ks)))
