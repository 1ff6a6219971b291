"""Mapillary Vistas: the converter on a generated v1.2-layout fixture (class mapping, resize, panoptic
validity, corrupt input, idempotence), the registered datasets, and a synthia2mapillary config that
trains and evaluates."""
import contextlib
import io
import json
import os
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from gbw_panoptic.data.datasets import register_all
from gbw_panoptic.data.datasets.layout import mapillary_paths
from gbw_panoptic.data.prepare import mapillary

# (id, full name, readable name, isthing) of Mapillary Vistas v1.2's panoptic_2018.json: the
# categories the 19-class mapping uses, plus some it leaves void.
CATEGORIES = [
    (1, "animal--bird", "Bird", 1),
    (3, "construction--barrier--curb", "Curb", 0),
    (4, "construction--barrier--fence", "Fence", 0),
    (7, "construction--barrier--wall", "Wall", 0),
    (8, "construction--flat--bike-lane", "Bike Lane", 0),
    (9, "construction--flat--crosswalk-plain", "Crosswalk - Plain", 1),
    (10, "construction--flat--curb-cut", "Curb Cut", 0),
    (11, "construction--flat--parking", "Parking", 0),
    (12, "construction--flat--pedestrian-area", "Pedestrian Area", 0),
    (14, "construction--flat--road", "Road", 0),
    (15, "construction--flat--service-lane", "Service Lane", 0),
    (16, "construction--flat--sidewalk", "Sidewalk", 0),
    (18, "construction--structure--building", "Building", 0),
    (20, "human--person", "Person", 1),
    (21, "human--rider--bicyclist", "Bicyclist", 1),
    (22, "human--rider--motorcyclist", "Motorcyclist", 1),
    (23, "human--rider--other-rider", "Other Rider", 1),
    (24, "marking--crosswalk-zebra", "Lane Marking - Crosswalk", 1),
    (25, "marking--general", "Lane Marking - General", 0),
    (28, "nature--sky", "Sky", 0),
    (30, "nature--terrain", "Terrain", 0),
    (31, "nature--vegetation", "Vegetation", 0),
    (32, "nature--water", "Water", 0),
    (34, "object--bench", "Bench", 1),
    (46, "object--support--pole", "Pole", 1),
    (48, "object--support--utility-pole", "Utility Pole", 1),
    (49, "object--traffic-light", "Traffic Light", 1),
    (50, "object--traffic-sign--back", "Traffic Sign (Back)", 1),
    (51, "object--traffic-sign--front", "Traffic Sign (Front)", 1),
    (53, "object--vehicle--bicycle", "Bicycle", 1),
    (55, "object--vehicle--bus", "Bus", 1),
    (56, "object--vehicle--car", "Car", 1),
    (58, "object--vehicle--motorcycle", "Motorcycle", 1),
    (59, "object--vehicle--on-rails", "On Rails", 0),
    (62, "object--vehicle--truck", "Truck", 1),
    (65, "void--ego-vehicle", "Ego Vehicle", 0),
]

# The scene drawn in every fixture image, far to near: (Mapillary category id, iscrowd, box as
# fractions x0, y0, x1, y1 of the image). Panoptic ids are drawn large, over all three channels.
SCENE = [
    (28, 0, (0, 0, 1, 0.5)),  # sky
    (18, 0, (0, 0.125, 0.5, 0.5)),  # building
    (31, 0, (0.5, 0.25, 0.75, 0.5)),  # vegetation
    (16, 0, (0, 0.5, 0.625, 0.6875)),  # sidewalk
    (3, 0, (0.625, 0.5, 1, 0.6875)),  # curb -> sidewalk
    (14, 0, (0, 0.6875, 1, 1)),  # road
    (24, 0, (0.125, 0.75, 0.375, 0.875)),  # zebra marking -> road
    (46, 0, (0.53125, 0, 0.5625, 0.625)),  # pole (a Mapillary thing) -> pole (stuff)
    (48, 0, (0.9375, 0, 0.96875, 0.5)),  # utility pole -> the same pole segment
    (20, 0, (0.0625, 0.375, 0.125, 0.625)),  # person 1
    (20, 0, (0.15625, 0.375, 0.21875, 0.625)),  # person 2
    (21, 0, (0.3125, 0.375, 0.375, 0.625)),  # bicyclist -> rider
    (56, 0, (0.625, 0.6875, 0.875, 0.9375)),  # car
    (56, 1, (0.875, 0.6875, 1, 0.9375)),  # crowd of cars
    (1, 0, (0.6875, 0.0625, 0.75, 0.125)),  # bird -> void
    (32, 0, (0, 0.9375, 0.125, 1)),  # water -> void
    (65, 0, (0.25, 0.9375, 1, 1)),  # ego vehicle -> void
]
VOID_BOX = (0.4375, 0.1875, 0.5, 0.25)  # no segment (panoptic id 0)

# What each SCENE entry must become: Cityscapes train id (255 = void) and panoptic id (label id for
# stuff and crowd, label id * 1000 + k for the k-th instance of a thing class, 0 = void).
EXPECTED_TRAIN_IDS = [10, 2, 8, 1, 1, 0, 0, 5, 5, 11, 11, 12, 13, 13, 255, 255, 255]
EXPECTED_PANOPTIC_IDS = [23, 11, 21, 8, 8, 7, 7, 17, 17, 24000, 24001, 25000, 26000, 26, 0, 0, 0]

# (split, image id, source (width, height)) at --size 64 48; the first three shrink by a whole factor.
IMAGES = [
    ("training", "tr_wide", (256, 128)),  # 2:1 -> 64x32
    ("training", "tr_43", (128, 96)),  # 4:3 -> 64x48
    ("validation", "va_43", (128, 96)),
    ("validation", "va_tall", (72, 96)),  # 3:4 -> 36x48
    ("validation", "va_odd", (100, 70)),  # 10:7 -> 64x44 (44.8 truncated)
]
CORRUPT = ("validation", "va_corrupt", (128, 96))
SIZE = ["--size", "64", "48"]
FITTED = {"tr_wide": (64, 32), "tr_43": (64, 48), "va_43": (64, 48), "va_tall": (36, 48), "va_odd": (64, 44),
          "va_corrupt": (64, 48)}  # fmt: skip


def _draw(width: int, height: int, values: List[int], void: int = 0, factor: int = 1) -> np.ndarray:
    """The scene at ``width x height``, each box filled with its entry of ``values``; with ``factor``,
    that picture enlarged ``factor`` times (so that shrinking it back is exact)."""
    canvas = np.full((height * factor, width * factor), -1, dtype=np.int64)
    for value, (x0, y0, x1, y1) in zip(values + [void], [box for _, _, box in SCENE] + [VOID_BOX]):
        rows = slice(round(y0 * height) * factor, round(y1 * height) * factor)
        canvas[rows, round(x0 * width) * factor : round(x1 * width) * factor] = value
    assert (canvas >= 0).all(), "the scene covers the image"
    return canvas


def _segment_ids() -> List[int]:
    return [70000 + 4099 * index for index in range(len(SCENE))]


def _write_image(root: Path, split: str, image_id: str, size: Tuple[int, int]) -> Tuple[Dict, Dict]:
    """Write one image and its Mapillary panoptic PNG; return its ``images`` and ``annotations`` entries."""
    width, height = size
    fitted_width, fitted_height = FITTED[image_id]
    factor = width // fitted_width
    if (width, height) == (fitted_width * factor, fitted_height * factor):
        ids = _draw(fitted_width, fitted_height, _segment_ids(), factor=factor)
    else:
        ids = _draw(width, height, _segment_ids())
    rng = np.random.default_rng(len(image_id) * width)
    rgb = np.clip((ids[..., None] * [7, 13, 29]) % 200 + rng.integers(0, 40, (height, width, 3)), 0, 255)
    os.makedirs(root / split / "images", exist_ok=True)
    os.makedirs(root / split / "panoptic", exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8)).save(root / split / "images" / f"{image_id}.jpg", quality=95)
    panoptic = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(panoptic).save(root / split / "panoptic" / f"{image_id}.png")
    segments = []
    for segment_id, (category_id, iscrowd, _) in zip(_segment_ids(), SCENE):
        ys, xs = np.nonzero(ids == segment_id)
        if len(ys):
            box = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            segments.append(
                {"id": segment_id, "category_id": category_id, "iscrowd": iscrowd, "area": len(ys), "bbox": box}
            )
    image = {"id": image_id, "file_name": f"{image_id}.jpg", "width": width, "height": height}
    return image, {"image_id": image_id, "file_name": f"{image_id}.png", "segments_info": segments}


def write_mapillary_fixture(root: Path) -> None:
    """A Mapillary Vistas v1.2 layout with :data:`IMAGES` and a truncated JPEG (:data:`CORRUPT`)."""
    categories = [
        {"id": i, "supercategory": full, "name": name, "isthing": thing, "color": [i, 2 * i, 3 * i]}
        for i, full, name, thing in CATEGORIES
    ]
    for split in ("training", "validation"):
        entries = [_write_image(root, s, i, size) for s, i, size in IMAGES + [CORRUPT] if s == split]
        images, annotations = zip(*entries)
        content = {"images": list(images), "annotations": list(annotations), "categories": categories}
        with open(root / split / "panoptic" / "panoptic_2018.json", "w") as f:
            json.dump(content, f)
    corrupt = root / CORRUPT[0] / "images" / f"{CORRUPT[1]}.jpg"
    data = corrupt.read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])


def _panoptic_ids(path) -> np.ndarray:
    from panopticapi.utils import rgb2id

    return rgb2id(np.asarray(Image.open(path), dtype=np.uint32))


def _load(path) -> dict:
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def mapillary_root(tmp_path_factory):
    """``(datasets root, exit code, printed output)`` of converting the fixture under ``mapillary/``."""
    root = tmp_path_factory.mktemp("datasets")
    write_mapillary_fixture(root / "mapillary")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exit_code = mapillary.main([str(root / "mapillary"), *SIZE, "--workers", "1"])
    return root, exit_code, printed.getvalue()


def test_corrupt_image_reported_and_skipped_with_nonzero_exit(mapillary_root):
    root, exit_code, output = mapillary_root
    assert exit_code == 1
    corrupt = str(root / "mapillary" / "validation" / "images" / "va_corrupt.jpg")
    name = f"({root / 'mapillary'})"
    assert f"Mapillary training {name}: 2 converted, 0 already valid (skipped), 0 failed." in output
    assert f"Mapillary validation {name}: 3 converted, 0 already valid (skipped), 1 failed." in output
    assert f"FAILED {corrupt}" in output and "image file is truncated" in output
    panoptic = _load(mapillary_paths(str(root / "mapillary"), "validation")["panoptic_json"])
    assert [a["image_id"] for a in panoptic["annotations"]] == ["va_43", "va_odd", "va_tall"]


@pytest.mark.parametrize("split, image_id, size", IMAGES)
def test_outputs_sizes_and_consistency(mapillary_root, split, image_id, size):
    root, _, _ = mapillary_root
    paths = mapillary_paths(str(root / "mapillary"), split)
    panoptic = _load(paths["panoptic_json"])
    (annotation,) = [a for a in panoptic["annotations"] if a["image_id"] == image_id]
    (image,) = [i for i in panoptic["images"] if i["id"] == image_id]
    width, height = FITTED[image_id]
    assert (image["width"], image["height"], image["file_name"]) == (width, height, f"{image_id}.png")
    resized = np.asarray(Image.open(os.path.join(paths["image_dir"], image["file_name"])))
    train_ids = np.asarray(Image.open(os.path.join(paths["label_dir"], f"{image_id}_labelTrainIds.png")))
    pan = _panoptic_ids(os.path.join(paths["panoptic_dir"], annotation["file_name"]))
    assert resized.shape == (height, width, 3) and train_ids.shape == pan.shape == (height, width)
    # One resized instance-id image gives all outputs: segments, areas and train ids agree.
    segments = {s["id"]: s for s in annotation["segments_info"]}
    assert set(np.unique(pan)) - {0} == set(segments)
    np.testing.assert_array_equal(pan == 0, train_ids == 255)
    for segment_id, segment in segments.items():
        assert segment["area"] == int((pan == segment_id).sum())
        label_id = segment_id // 1000 if segment_id >= 1000 else segment_id
        assert segment["category_id"] == label_id
    stats = _load(paths["class_stats"])["images"][image_id]
    assert stats == np.bincount(train_ids.ravel(), minlength=256)[:19].tolist()


@pytest.mark.parametrize("split, image_id, size", IMAGES[:4])
def test_whole_factor_resize_is_exact(mapillary_root, split, image_id, size):
    """Source boxes on multiples of the factor: the label outputs equal the scene drawn at the
    output size with the expected classes and instances, and the image is the mean of each
    factor x factor block (area interpolation)."""
    root, _, _ = mapillary_root
    paths = mapillary_paths(str(root / "mapillary"), split)
    width, height = FITTED[image_id]
    train_ids = np.asarray(Image.open(os.path.join(paths["label_dir"], f"{image_id}_labelTrainIds.png")))
    np.testing.assert_array_equal(train_ids, _draw(width, height, EXPECTED_TRAIN_IDS, void=255))
    pan = _panoptic_ids(os.path.join(paths["panoptic_dir"], f"{image_id}_panoptic.png"))
    np.testing.assert_array_equal(pan, _draw(width, height, EXPECTED_PANOPTIC_IDS))

    factor = size[0] // width
    source = np.asarray(Image.open(root / "mapillary" / split / "images" / f"{image_id}.jpg").convert("RGB"))
    block_means = source.reshape(height, factor, width, factor, 3).mean(axis=(1, 3))
    resized = np.asarray(Image.open(os.path.join(paths["image_dir"], f"{image_id}.png")))
    assert np.abs(resized - block_means).max() <= 1.0


def test_class_mapping_on_specific_segments(mapillary_root):
    root, _, _ = mapillary_root
    paths = mapillary_paths(str(root / "mapillary"), "validation")
    (annotation,) = [a for a in _load(paths["panoptic_json"])["annotations"] if a["image_id"] == "va_43"]
    pan = _panoptic_ids(os.path.join(paths["panoptic_dir"], annotation["file_name"]))
    segments = {s["id"]: s for s in annotation["segments_info"]}

    def visible(index: int) -> np.ndarray:
        """Pixels of SCENE entry ``index`` (``len(SCENE)``: the void box) at the output size."""
        values = [int(i == index) for i in range(len(SCENE))]
        return _draw(64, 48, values, void=int(index == len(SCENE))).astype(bool)

    # Two persons: two instances of person (label id 24), numbered in segments_info order.
    assert (pan[visible(9)] == 24000).all() and (pan[visible(10)] == 24001).all()
    # A bicyclist is a rider instance; a car is a car instance, a crowd of cars a crowd segment.
    assert (pan[visible(11)] == 25000).all() and (pan[visible(12)] == 26000).all()
    assert (pan[visible(13)] == 26).all() and segments[26]["iscrowd"] == 1
    assert segments[26000]["iscrowd"] == segments[24001]["iscrowd"] == 0
    # Pole and utility pole (Mapillary things) merge into the one stuff segment "pole" (label id 17).
    np.testing.assert_array_equal(pan == 17, visible(7) | visible(8))
    # Curb joins sidewalk, the zebra marking joins road: one segment each.
    np.testing.assert_array_equal(pan == 8, visible(3) | visible(4))
    np.testing.assert_array_equal(pan == 7, visible(5) | visible(6))
    # Bird, water, ego vehicle (unmapped) and unlabelled pixels are void.
    np.testing.assert_array_equal(pan == 0, visible(14) | visible(15) | visible(16) | visible(len(SCENE)))
    assert {s["category_id"] for s in segments.values()} == {7, 8, 11, 17, 21, 23, 24, 25, 26}


@pytest.mark.parametrize("split", ["training", "validation"])
def test_panopticapi_pq_of_converted_ground_truth_is_100(mapillary_root, split):
    from panopticapi.evaluation import pq_compute

    root, _, _ = mapillary_root
    paths = mapillary_paths(str(root / "mapillary"), split)
    gt_json, gt_dir = paths["panoptic_json"], paths["panoptic_dir"]
    results = pq_compute(gt_json, gt_json, gt_dir, gt_dir)
    assert results["All"]["n"] == 9  # road, sidewalk, building, pole, vegetation, sky, person, rider, car
    assert results["All"]["pq"] == pytest.approx(1.0)
    assert results["Things"]["n"] == 3 and results["Things"]["pq"] == pytest.approx(1.0)


def test_rerun_is_idempotent_and_repaired_input_is_converted(tmp_path, capsys):
    write_mapillary_fixture(tmp_path)
    arguments = [str(tmp_path), *SIZE, "--splits", "validation", "--workers", "1"]
    assert mapillary.main(arguments) == 1
    paths = mapillary_paths(str(tmp_path), "validation")
    outputs = sorted(str(p) for p in Path(paths["panoptic_dir"]).parent.rglob("*.png"))
    mtimes = [os.stat(p).st_mtime_ns for p in outputs]
    before = _load(paths["panoptic_json"])
    capsys.readouterr()

    assert mapillary.main(arguments) == 1
    assert f"({tmp_path}): 0 converted, 3 already valid (skipped), 1 failed." in capsys.readouterr().out
    assert [os.stat(p).st_mtime_ns for p in outputs] == mtimes
    assert _load(paths["panoptic_json"]) == before
    assert not list(tmp_path.rglob(".*.tmp*"))

    _write_image(tmp_path, *CORRUPT)  # the download repaired
    assert mapillary.main(arguments) == 0
    assert f"({tmp_path}): 1 converted, 3 already valid (skipped), 0 failed." in capsys.readouterr().out
    # Another size re-converts everything.
    assert mapillary.main([*arguments[:-2], "--size", "32", "24", "--workers", "1"]) == 0
    assert "4 converted, 0 already valid" in capsys.readouterr().out
    assert _load(paths["panoptic_json"])["images"][0]["width"] == 32
    # So does the reference (EDAPS) image interpolation.
    assert mapillary.main([*arguments, "--image-interpolation", "bicubic"]) == 0
    assert "4 converted, 0 already valid" in capsys.readouterr().out
    assert _load(paths["panoptic_json"])["info"]["resize"] == "fit 64x48, image bicubic, labels nearest"


def test_categories_of_another_version_are_refused(tmp_path, capsys):
    write_mapillary_fixture(tmp_path)
    json_path = tmp_path / "validation" / "panoptic" / "panoptic_2018.json"
    content = _load(json_path)
    for category in content["categories"]:
        if category["id"] == 14:
            category["supercategory"], category["name"] = "construction--flat--driveway", "Driveway"
    json_path.write_text(json.dumps(content))
    assert mapillary.main([str(tmp_path), "--splits", "validation"]) == 2
    error = capsys.readouterr().err
    assert str(json_path) in error and "category id 14" in error and "construction--flat--road" in error


def test_unlisted_segment_or_grey_panoptic_png_fails_that_image(tmp_path, capsys):
    write_mapillary_fixture(tmp_path)
    json_path = tmp_path / "validation" / "panoptic" / "panoptic_2018.json"
    content = _load(json_path)
    del content["annotations"][0]["segments_info"][0]
    json_path.write_text(json.dumps(content))
    grey = tmp_path / "validation" / "panoptic" / "va_tall.png"
    Image.open(grey).convert("L").save(grey)
    assert mapillary.main([str(tmp_path), *SIZE, "--splits", "validation", "--workers", "1"]) == 1
    output = capsys.readouterr().out
    assert "1 converted" in output and "3 failed" in output
    assert f"{tmp_path / 'validation' / 'panoptic' / 'va_43.png'}: panoptic ids [70000]" in output
    assert f"{grey}: cannot be read as a panoptic PNG (missing or corrupt): expected an RGB" in output


def test_v2_download_layout_and_missing_input(tmp_path, capsys):
    write_mapillary_fixture(tmp_path / "v1")
    (tmp_path / "v2" / "validation" / "v1.2").mkdir(parents=True)
    os.rename(tmp_path / "v1" / "validation" / "images", tmp_path / "v2" / "validation" / "images")
    os.rename(tmp_path / "v1" / "validation" / "panoptic", tmp_path / "v2" / "validation" / "v1.2" / "panoptic")
    report = mapillary.prepare_mapillary(str(tmp_path / "v2"), "validation", size=(64, 48))
    assert report.converted == 3 and len(report.failures) == 1

    assert mapillary.main([str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err
    assert str(tmp_path / "nowhere" / "training" / "panoptic" / "panoptic_2018.json") in error
    assert str(tmp_path / "nowhere" / "training" / "v1.2" / "panoptic" / "panoptic_2018.json") in error


@pytest.mark.slow
def test_command_line_with_worker_processes_matches_serial(mapillary_root, tmp_path, repo_root):
    """``datasets/prepare_mapillary.py`` as users run it, with 2 worker processes: the same files as
    the serial conversion of the module fixture."""
    import subprocess
    import sys

    write_mapillary_fixture(tmp_path)
    script = str(repo_root / "datasets" / "prepare_mapillary.py")
    command = [sys.executable, script, str(tmp_path), *SIZE, "--workers", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "va_corrupt.jpg" in result.stdout
    serial_root = mapillary_root[0] / "mapillary"
    for split in ("training", "validation"):
        serial, parallel = (Path(mapillary_paths(str(r), split)["panoptic_dir"]).parent
                            for r in (serial_root, tmp_path))  # fmt: skip
        files = sorted(p.relative_to(serial) for p in serial.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(parallel) for p in parallel.rglob("*") if p.is_file())
        for name in files:
            assert (serial / name).read_bytes() == (parallel / name).read_bytes(), name


def test_help_explains_layout(capsys):
    with pytest.raises(SystemExit) as exit_info:
        mapillary.main(["--help"])
    assert exit_info.value.code == 0
    assert "panoptic/panoptic_2018.json" in capsys.readouterr().out


def test_fitted_size_follows_the_reference_rule():
    # Wider than 4:3: width 1024; otherwise height 768; the other side truncated.
    assert mapillary.fitted_size(4000, 3000, 1024, 768) == (1024, 768)
    assert mapillary.fitted_size(1920, 1080, 1024, 768) == (1024, 576)
    assert mapillary.fitted_size(3264, 2448 - 1, 1024, 768) == (1024, 767)
    assert mapillary.fitted_size(2448, 3264, 1024, 768) == (576, 768)
    assert mapillary.fitted_size(800, 600, 1024, 768) == (1024, 768)  # enlarged


@pytest.fixture
def registered_root(mapillary_root, synthetic_datasets, tmp_path):
    """Datasets root whose ``mapillary/`` is the converted fixture and ``synthia/`` the synthetic
    source (SYNTHIA layout), registered; the synthetic benchmark's registration restored afterwards."""
    os.symlink(mapillary_root[0] / "mapillary", tmp_path / "mapillary")
    os.symlink(synthetic_datasets / "synthetic" / "source", tmp_path / "synthia")
    register_all(str(tmp_path))
    yield tmp_path
    register_all(str(synthetic_datasets))


@pytest.mark.parametrize(
    "name, split", [("mapillary_panoptic_train", "training"), ("mapillary_panoptic_val", "validation")]
)
def test_registered_datasets_read_the_converted_files(registered_root, name, split):
    paths = mapillary_paths(str(registered_root / "mapillary"), split)
    dataset_dicts = DatasetCatalog.get(name)
    expected = [i for s, i, _ in IMAGES if s == split]
    assert sorted(d["image_id"] for d in dataset_dicts) == sorted(expected)
    for record in dataset_dicts:
        image_id = record["image_id"]
        assert record["file_name"] == os.path.join(paths["image_dir"], f"{image_id}.png")
        assert record["sem_seg_file_name"] == os.path.join(paths["label_dir"], f"{image_id}_labelTrainIds.png")
        assert record["pan_seg_file_name"] == os.path.join(paths["panoptic_dir"], f"{image_id}_panoptic.png")
        assert Image.open(record["file_name"]).size == (record["width"], record["height"]) == FITTED[image_id]
        assert record["has_instances"] is True
        # Train ids and thing flags of the segments (person, rider, car are things; pole is not).
        by_train_id = {s["category_id"]: s["isthing"] for s in record["segments_info"]}
        assert by_train_id == {0: False, 1: False, 2: False, 5: False, 8: False, 10: False, 11: True, 12: True,
                               13: True}  # fmt: skip
    meta = MetadataCatalog.get(name)
    assert meta.evaluation_classes == list(range(19))
    assert meta.evaluation_classes_16 == [c for c in range(19) if c not in (9, 14, 16)]  # no terrain, truck, train
    assert (meta.panoptic_json, meta.gt_dir, meta.class_stats_file) == (
        paths["panoptic_json"], paths["label_dir"], paths["class_stats"]
    )


def test_missing_mapillary_names_file_and_script(registered_root, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    register_all(str(empty))
    with pytest.raises(FileNotFoundError) as error:
        DatasetCatalog.get("mapillary_panoptic_val")
    message = str(error.value)
    assert str(empty / "mapillary" / "validation" / "cityscapes19" / "panoptic.json") in message
    assert "prepare_mapillary.py" in message and "--splits validation" in message


def _config_args(repo_root, output_dir, config, extra=()):
    from detectron2.engine import default_argument_parser

    tiny = [
        "MODEL.DEVICE", "cpu", "MODEL.MIT.VARIANT", "b0", "MODEL.MIT.PRETRAINED", "",
        "MODEL.SEM_SEG_HEAD.EMBED_DIM", "32", "MODEL.INS_EMBED_HEAD.EMBED_DIM", "32",
        "INPUT.BASE_SIZE", "[48, 64]", "INPUT.SOURCE_BASE_SIZE", "[48, 64]", "INPUT.CROP.SIZE", "[32, 32]",
        "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.WARMUP_ITERS", "2", "TEST.EVAL_PERIOD", "0", "UDA.LOG_PERIOD", "1", "SEED", "7",
    ]  # fmt: skip
    argv = ["--config-file", str(repo_root / "configs" / "synthia2mapillary" / config)]
    return default_argument_parser().parse_args(argv + tiny + ["OUTPUT_DIR", str(output_dir), *extra])


def test_gbw_config_only_switches_gbw_on(repo_root, tmp_path):
    from gbw_panoptic.data.datasets import DATASET_NAMES
    from gbw_panoptic.uda.cli import load_config

    def flat(node, prefix=""):
        items = {}
        for key, value in node.items():
            items.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return items

    baseline = flat(load_config(_config_args(repo_root, tmp_path, "mit_b5.yaml")))
    gbw = flat(load_config(_config_args(repo_root, tmp_path, "mit_b5_gbw.yaml")))
    assert {key for key in baseline if baseline[key] != gbw[key]} == {
        f"MODEL.GBW.{loss}.ENABLED" for loss in ("SEM_SEG", "CENTER", "OFFSET")
    }
    assert not any(baseline[f"MODEL.GBW.{loss}.ENABLED"] for loss in ("SEM_SEG", "CENTER", "OFFSET"))
    datasets = baseline["DATASETS.TRAIN"] + baseline["DATASETS.TARGET_TRAIN"] + baseline["DATASETS.TEST"]
    assert datasets == ("synthia_panoptic_train", "mapillary_panoptic_train", "mapillary_panoptic_val")
    assert set(datasets) <= set(DATASET_NAMES)


@pytest.mark.slow
def test_synthia2mapillary_config_trains_and_evaluates(registered_root, repo_root, tmp_path):
    """mit_b5_gbw.yaml, shrunk to a MiT-B0 on 32x32 crops: 2 DACS + GBW iterations from the synthetic
    source to the converted fixture, then the evaluation on its validation split (16 and 19 classes)."""
    import math

    from gbw_panoptic.uda.cli import main

    main(_config_args(repo_root, tmp_path, "mit_b5_gbw.yaml", ["SOLVER.MAX_ITER", "2"]))
    with open(tmp_path / "metrics.json") as f:
        records = [json.loads(line) for line in f if line.strip() and "total_loss" in line]
    assert [r["iteration"] for r in records] == [0, 1]
    assert all(math.isfinite(r["loss_mix_sem_seg"]) and math.isfinite(r["loss_center"]) for r in records)
    assert any(key.startswith("gbw/source/sem_seg/") for key in records[-1])

    weights = ["MODEL.WEIGHTS", str(tmp_path / "model_final.pth")]
    eval_args = _config_args(repo_root, tmp_path / "eval", "mit_b5_gbw.yaml", weights)
    eval_args.eval_only = True
    results = main(eval_args)["mapillary_panoptic_val"]
    for task, metric in (("sem_seg", "mIoU"), ("panoptic_seg", "mPQ")):
        for subset in ("16", "19"):
            assert 0.0 <= results[task][metric + subset] <= 100.0, (task, metric + subset)
