"""The synthetic two-domain benchmark: file layouts, determinism, and that it is a meaningful UDA
benchmark (classes, instances, imbalance, domain gap, different class frequencies)."""
import filecmp
import glob
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.helpers.labels import name2label
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
from cityscapesscripts.preparation.json2labelImg import createLabelImage
from PIL import Image

from gbw_panoptic.data.datasets.builtin_meta import LABEL_ID_TO_TRAIN_ID, SYNTHIA_TO_LABEL_ID, THING_TRAIN_IDS
from gbw_panoptic.data.datasets.layout import cityscapes_paths, synthia_paths
from gbw_panoptic.data.prepare.synthetic import RARE_TARGET_CLASSES, generate_synthetic

SMALL = dict(num_source=2, num_source_val=1, num_target_train=1, num_target_val=1, height=64, width=128)


def _files(folder: str):
    return sorted(os.path.relpath(p, folder) for p in glob.glob(os.path.join(folder, "**", "*.*"), recursive=True))


def test_generation_is_deterministic_and_independent_of_workers(tmp_path):
    generate_synthetic(str(tmp_path / "a"), seed=5, workers=1, **SMALL)
    generate_synthetic(str(tmp_path / "b"), seed=5, workers=2, **SMALL)
    generate_synthetic(str(tmp_path / "c"), seed=6, workers=1, **SMALL)
    files = _files(str(tmp_path / "a"))
    # source and source val: RGB image + label PNG; target: image, polygons JSON, labelIds and
    # instanceIds PNGs; plus generation.json.
    assert len(files) == 3 * 2 + 2 * 4 + 1
    assert files == _files(str(tmp_path / "b"))
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert mismatch == [] and errors == []
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "c", files, shallow=False)
    assert len(mismatch) == len(files)


def test_regeneration_writes_only_missing_images_and_refuses_other_settings(tmp_path):
    out = str(tmp_path / "synthetic")
    generate_synthetic(out, seed=5, **SMALL)
    image = tmp_path / "synthetic" / "source" / "RGB" / "0000001.png"
    content = image.read_bytes()
    image.unlink()
    untouched = tmp_path / "synthetic" / "source" / "RGB" / "0000000.png"
    mtime = untouched.stat().st_mtime_ns
    generate_synthetic(out, seed=5, **SMALL)
    assert image.read_bytes() == content and untouched.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="generated with"):
        generate_synthetic(out, seed=6, **SMALL)


def test_a_folder_of_another_generator_design_is_refused(tmp_path):
    out = tmp_path / "synthetic"
    generate_synthetic(str(out), seed=5, **SMALL)
    settings = json.loads((out / "generation.json").read_text())
    settings["design"] -= 1  # as written by the previous scene generator
    (out / "generation.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="'design': %d" % settings["design"]):
        generate_synthetic(str(out), seed=5, **SMALL)


def test_target_polygons_rasterise_to_the_label_images(synthetic_datasets):
    gt_dir = synthetic_datasets / "synthetic" / "target" / "gtFine"
    polygon_files = sorted(glob.glob(str(gt_dir / "*" / "*" / "*_gtFine_polygons.json")))
    assert len(polygon_files) == 14
    for polygon_file in polygon_files[:4]:
        annotation = Annotation()
        annotation.fromJsonFile(polygon_file)
        label_ids = np.asarray(Image.open(polygon_file.replace("_polygons.json", "_labelIds.png")))
        instance_ids = np.asarray(Image.open(polygon_file.replace("_polygons.json", "_instanceIds.png")))
        np.testing.assert_array_equal(np.asarray(createLabelImage(annotation, "ids")), label_ids)
        np.testing.assert_array_equal(np.asarray(createInstanceImage(annotation, "ids")), instance_ids)


def test_source_uses_the_synthia_label_encoding(synthetic_datasets):
    label_files = glob.glob(str(synthetic_datasets / "synthetic" / "source" / "GT" / "LABELS" / "???????.png"))
    assert len(label_files) == 16
    labels = cv2.imread(label_files[0], cv2.IMREAD_UNCHANGED)
    assert labels.dtype == np.uint16 and labels.shape == (128, 256, 3)
    # RGB channel 0 (OpenCV's last) holds SYNTHIA class ids, RGB channel 2 is unused.
    assert set(np.unique(labels[..., 2])) <= set(SYNTHIA_TO_LABEL_ID) | {0}
    assert np.all(labels[..., 0] == 0)
    assert labels[..., 1].max() > 0  # instance ids


def _frequencies(root: Path):
    source = synthia_paths(str(root / "synthetic" / "source"))["frequencies"]
    target = cityscapes_paths(str(root / "synthetic" / "target"), "train")["frequencies"]
    with open(source) as f, open(target) as g:
        return json.load(f), json.load(g)


def test_benchmark_has_many_classes_rare_classes_and_a_label_shift(synthetic_datasets):
    source, target = _frequencies(synthetic_datasets)
    source_fraction, target_fraction = np.array(source["pixel_fraction"]), np.array(target["pixel_fraction"])
    assert (source_fraction > 0).sum() >= 14 and (target_fraction > 0).sum() >= 14
    for fraction in (source_fraction, target_fraction):
        rare = (fraction > 0) & (fraction <= 0.01)
        assert rare.sum() >= 3, fraction  # e.g. traffic light, traffic sign, rider / bicycle
    # Different class frequencies between the domains (total variation distance).
    assert 0.5 * np.abs(source_fraction - target_fraction).sum() > 0.08
    assert source_fraction[9] == 0 and target_fraction[9] > 0  # terrain only in the target


def test_several_thing_classes_with_several_instances_per_image(synthetic_datasets):
    paths = synthia_paths(str(synthetic_datasets / "synthetic" / "source"))
    with open(paths["panoptic_json"]) as f:
        annotations = json.load(f)["annotations"]
    instances = np.zeros(19)
    for annotation in annotations:
        for segment in annotation["segments_info"]:
            if segment["id"] >= 1000:
                instances[LABEL_ID_TO_TRAIN_ID[segment["category_id"]]] += 1
    per_image = instances / len(annotations)
    assert (per_image[THING_TRAIN_IDS] >= 1.5).sum() >= 3, per_image


def _pixels(image_files, label_file_of):
    colours, labels = [], []
    for image_file in image_files:
        colours.append(np.asarray(Image.open(image_file), dtype=np.float64).reshape(-1, 3))
        labels.append(np.asarray(Image.open(label_file_of(image_file))).ravel())
    # Every 5th pixel is plenty for class means and accuracies.
    colours, labels = np.concatenate(colours)[::5], np.concatenate(labels)[::5]
    keep = labels != 255
    return colours[keep], labels[keep]


def test_appearance_gap_between_domains(synthetic_datasets):
    """A nearest-class-mean colour classifier fit on the source is accurate on the source only."""
    source_dir = synthetic_datasets / "synthetic" / "source"
    target_dir = synthetic_datasets / "synthetic" / "target"
    source = _pixels(
        sorted(glob.glob(str(source_dir / "RGB" / "*.png"))),
        lambda f: f.replace(os.sep + "RGB" + os.sep, os.sep + os.path.join("GT", "LABELS") + os.sep).replace(
            ".png", "_labelTrainIds.png"
        ),
    )
    target = _pixels(
        sorted(glob.glob(str(target_dir / "leftImg8bit" / "val" / "*" / "*.png"))),
        lambda f: f.replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png"),
    )
    classes = np.unique(source[1])
    means = np.stack([source[0][source[1] == c].mean(axis=0) for c in classes])

    def accuracy(colours, labels):
        distances = ((colours[:, None, :] - means[None]) ** 2).sum(axis=-1)
        return (classes[distances.argmin(axis=1)] == labels).mean()

    source_accuracy, target_accuracy = accuracy(*source), accuracy(*target)
    assert source_accuracy > 0.7
    assert target_accuracy < source_accuracy - 0.3


def _target_train(folder):
    """Per target train image: label ids, image (HxWx3) and the polygon objects."""
    images = {}
    for label_file in sorted(glob.glob(os.path.join(folder, "target", "gtFine", "train", "*", "*_labelIds.png"))):
        image_file = label_file.replace("gtFine", "leftImg8bit", 1).replace("_gtFine_labelIds", "_leftImg8bit")
        with open(label_file.replace("_labelIds.png", "_polygons.json")) as f:
            objects = json.load(f)["objects"]
        images[os.path.basename(image_file)] = (np.asarray(Image.open(label_file)), np.asarray(Image.open(image_file)), objects)
    return images


def test_rare_frequency_thins_the_rare_target_objects_and_keeps_the_rest_of_each_image(tmp_path):
    sizes = dict(num_source=1, num_source_val=1, num_target_train=24, num_target_val=1, height=64, width=128)
    for name, fraction in (("all", 1.0), ("0.3", 0.3), ("0.1", 0.1)):
        generate_synthetic(str(tmp_path / name), seed=0, rare_frequency=fraction, **sizes)
    # A different benchmark for the experiment runner; the standard one's settings as before the option.
    assert "rare_frequency" not in json.loads((tmp_path / "all" / "generation.json").read_text())
    assert json.loads((tmp_path / "0.1" / "generation.json").read_text())["rare_frequency"] == 0.1
    # The source splits and target val do not change.
    unchanged = [f for f in _files(str(tmp_path / "all")) if "train" not in f.split(os.sep) and f != "generation.json"]
    assert len(unchanged) == 2 + 2 + 4  # source and source val: image + labels; target val: 4 files
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "all", tmp_path / "0.1", unchanged, shallow=False)
    assert mismatch == [] and errors == []

    rare_ids = [name2label[name].id for name in RARE_TARGET_CLASSES]
    everything, tenth, third = (_target_train(str(tmp_path / name)) for name in ("all", "0.1", "0.3"))
    pixels = {name: sum(np.isin(labels, rare_ids).sum() for labels, _, _ in images.values())
              for name, images in (("all", everything), ("0.1", tenth), ("0.3", third))}
    # About 10x and 3x fewer (each object is kept with that probability; seeds 0-3 of this size: 0.06-0.14 and
    # 0.25-0.36 of the pixels).
    assert 0.03 < pixels["0.1"] / pixels["all"] < 0.2 and 0.15 < pixels["0.3"] / pixels["all"] < 0.5, pixels

    def rare_objects(objects):
        return [obj for obj in objects if obj["label"] in RARE_TARGET_CLASSES]

    for key, (labels, image, objects) in everything.items():
        # Those kept at 0.1 are kept at 0.3.
        kept = rare_objects(tenth[key][2])
        assert kept == [obj for obj in rare_objects(third[key][2]) if obj in kept]
        for thinned_labels, thinned_image, thinned_objects in (tenth[key], third[key]):
            # The same polygons but for the rare objects dropped.
            assert [obj for obj in thinned_objects if obj["label"] not in RARE_TARGET_CLASSES] == [
                obj for obj in objects if obj["label"] not in RARE_TARGET_CLASSES]
            # Only the pixels of removed rare objects change label; the image changes only near them (blur σ 1
            # px), kept objects keep their colours.
            changed = labels != thinned_labels
            assert np.isin(labels[changed], rare_ids).all()
            near = cv2.dilate(changed.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
            np.testing.assert_array_equal(image[~near], thinned_image[~near])
    with pytest.raises(ValueError, match="rare_frequency=0 must lie in"):
        generate_synthetic(str(tmp_path / "none"), seed=0, rare_frequency=0, **sizes)
