"""The prepare scripts end to end on the synthetic benchmark: outputs, validity for panopticapi,
idempotence, corrupt input handling, atomic writes, --help."""
import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gbw_panoptic.data.datasets.builtin_meta import LABEL_DIVISOR, label_id_to_train_id_lut
from gbw_panoptic.data.datasets.layout import cityscapes_paths, synthia_paths
from gbw_panoptic.data.prepare import cityscapes, synthetic, synthia
from gbw_panoptic.data.prepare.conversion import ConversionReport


def _panoptic_ids(path: str) -> np.ndarray:
    from panopticapi.utils import rgb2id

    return rgb2id(np.asarray(Image.open(path), dtype=np.uint32))


def _target_dir(root: Path) -> str:
    return str(root / "synthetic" / "target")


def _source_dir(root: Path) -> str:
    return str(root / "synthetic" / "source")


@pytest.mark.parametrize("split", ["train", "val"])
def test_cityscapes_outputs_agree_with_label_and_instance_images(synthetic_datasets, split):
    paths = cityscapes_paths(_target_dir(synthetic_datasets), split)
    with open(paths["panoptic_json"]) as f:
        panoptic = json.load(f)
    with open(paths["class_stats"]) as f:
        stats = json.load(f)["images"]
    lut = label_id_to_train_id_lut()
    assert len(panoptic["annotations"]) == {"train": 8, "val": 6}[split]
    for annotation in panoptic["annotations"]:
        image_id = annotation["image_id"]
        city = image_id.split("_")[0]
        prefix = os.path.join(paths["label_dir"], city, image_id)
        label_ids = np.asarray(Image.open(f"{prefix}_gtFine_labelIds.png"))
        instance_ids = np.asarray(Image.open(f"{prefix}_gtFine_instanceIds.png")).astype(np.int64)
        train_ids = np.asarray(Image.open(f"{prefix}_gtFine_labelTrainIds.png"))
        # createTrainIdLabelImgs (from the polygons) agrees with the labelIds rasterisation.
        np.testing.assert_array_equal(train_ids, lut[label_ids])
        assert stats[image_id] == np.bincount(train_ids.ravel(), minlength=256)[:19].tolist()

        pan = _panoptic_ids(os.path.join(paths["panoptic_dir"], annotation["file_name"]))
        segments = {s["id"]: s for s in annotation["segments_info"]}
        assert set(np.unique(pan)) - {0} == set(segments)
        for segment_id, segment in segments.items():
            mask = pan == segment_id
            assert segment["area"] == int(mask.sum())
            # Panoptic ids are the Cityscapes instance ids; category = labelId.
            assert np.all(instance_ids[mask] == segment_id)
            assert segment["category_id"] == (segment_id // LABEL_DIVISOR if segment_id >= LABEL_DIVISOR else segment_id)
        # Void (ignored) pixels are exactly the pixels without a train id.
        np.testing.assert_array_equal(pan == 0, train_ids == 255)


def test_synthia_outputs_agree_with_source_labels(synthetic_datasets):
    paths = synthia_paths(_source_dir(synthetic_datasets))
    with open(paths["panoptic_json"]) as f:
        panoptic = json.load(f)
    assert len(panoptic["annotations"]) == 16
    for annotation in panoptic["annotations"]:
        class_ids, instances = synthia.read_synthia_labels(
            os.path.join(paths["label_dir"], f"{annotation['image_id']}.png")
        )
        train_ids = np.asarray(
            Image.open(os.path.join(paths["label_dir"], f"{annotation['image_id']}_labelTrainIds.png"))
        )
        pan = _panoptic_ids(os.path.join(paths["panoptic_dir"], annotation["file_name"]))
        np.testing.assert_array_equal(pan == 0, train_ids == 255)
        things = [s for s in annotation["segments_info"] if s["id"] >= LABEL_DIVISOR]
        assert things, "every synthetic source image has thing instances"
        for segment in things:
            mask = pan == segment["id"]
            # One instance id of the source label file per thing segment.
            assert len(np.unique(instances[mask])) == 1 and instances[mask][0] > 0


def _pq_of_ground_truth_against_itself(panoptic_json: str, panoptic_dir: str):
    from panopticapi.evaluation import pq_compute

    return pq_compute(panoptic_json, panoptic_json, panoptic_dir, panoptic_dir)


@pytest.mark.parametrize("dataset", ["source", "target_val"])
def test_panopticapi_pq_of_ground_truth_is_100(synthetic_datasets, dataset):
    if dataset == "source":
        paths = synthia_paths(_source_dir(synthetic_datasets))
    else:
        paths = cityscapes_paths(_target_dir(synthetic_datasets), "val")
    results = _pq_of_ground_truth_against_itself(paths["panoptic_json"], paths["panoptic_dir"])
    with open(paths["panoptic_json"]) as f:
        annotations = json.load(f)["annotations"]
    present = {s["category_id"] for a in annotations for s in a["segments_info"] if not s["iscrowd"]}
    assert len(present) >= 10
    # panopticapi averages over the categories that occur; absent ones are listed with PQ 0.
    assert results["All"]["n"] == len(present)
    for category_id in present:
        assert results["per_class"][category_id]["pq"] == pytest.approx(1.0), category_id
    assert results["All"]["pq"] == pytest.approx(1.0)


def test_rerun_converts_nothing_and_keeps_files(synthetic_datasets):
    source = _source_dir(synthetic_datasets)
    paths = synthia_paths(source)
    outputs = sorted(glob.glob(os.path.join(paths["panoptic_dir"], "*.png")))
    mtimes = [os.stat(path).st_mtime_ns for path in outputs]
    with open(paths["panoptic_json"]) as f:
        before = json.load(f)
    report = synthia.prepare_synthia(source)
    assert (report.converted, report.skipped, report.failures) == (0, 16, [])
    assert [os.stat(path).st_mtime_ns for path in outputs] == mtimes
    with open(paths["panoptic_json"]) as f:
        assert json.load(f) == before

    report = cityscapes.prepare_cityscapes(_target_dir(synthetic_datasets), "val")
    assert (report.converted, report.skipped, report.failures) == (0, 6, [])


def _small_benchmark(tmp_path: Path) -> dict:
    return synthetic.generate_synthetic(
        str(tmp_path / "synthetic"), seed=3, num_source=4, num_target_train=0, num_target_val=3, height=64, width=128,
        num_source_val=0,
    )


def _temporary_files(folder: str):
    return glob.glob(os.path.join(folder, "**", ".*.tmp*"), recursive=True)


def test_corrupt_synthia_label_is_reported_rest_converted(tmp_path, capsys):
    folders = _small_benchmark(tmp_path)
    paths = synthia_paths(folders["source"])
    corrupt = os.path.join(paths["label_dir"], "0000002.png")
    with open(corrupt, "r+b") as f:
        f.truncate(100)
    missing = os.path.join(paths["label_dir"], "0000003.png")
    os.remove(missing)

    assert synthia.main([folders["source"], "--workers", "1"]) == 1
    output = capsys.readouterr().out
    assert "2 converted" in output and "2 failed" in output
    assert corrupt in output and missing in output
    with open(paths["panoptic_json"]) as f:
        assert [a["image_id"] for a in json.load(f)["annotations"]] == ["0000000", "0000001"]
    assert not _temporary_files(folders["source"])

    # Repairing the inputs (the generator rewrites missing files) and re-running converts exactly
    # the two failed images.
    os.remove(corrupt)
    _small_benchmark(tmp_path)
    report = synthia.prepare_synthia(folders["source"])
    assert (report.converted, report.skipped, report.failures) == (2, 2, [])


def test_corrupt_cityscapes_inputs_are_reported_rest_converted(tmp_path, capsys):
    folders = _small_benchmark(tmp_path)
    paths = cityscapes_paths(folders["target"], "val")
    polygons = sorted(glob.glob(os.path.join(paths["label_dir"], "*", "*_gtFine_polygons.json")))
    with open(polygons[0], "w") as f:
        f.write('{"imgHeight": 64, "imgWidth": 128, "objects": [{"label": "no such class", "polygon": [[0,0],[5,0],[5,5]]}]}')
    instance_file = polygons[1].replace("_polygons.json", "_instanceIds.png")
    with open(instance_file, "wb") as f:
        f.write(b"not a png")

    assert cityscapes.main([folders["target"], "--splits", "val", "--workers", "1"]) == 1
    output = capsys.readouterr().out
    assert "1 converted" in output and "2 failed" in output
    assert polygons[0] in output and instance_file in output
    assert "Label 'no such class' not known" in output
    with open(paths["panoptic_json"]) as f:
        assert len(json.load(f)["annotations"]) == 1
    assert not _temporary_files(folders["target"])


def test_parallel_conversion_matches_serial(tmp_path):
    folders = _small_benchmark(tmp_path)
    serial = synthia.prepare_synthia(folders["source"], workers=1)
    paths = synthia_paths(folders["source"])
    serial_pngs = {p: np.asarray(Image.open(p)) for p in glob.glob(os.path.join(paths["panoptic_dir"], "*.png"))}
    for path in serial_pngs:
        os.remove(path)
    parallel = synthia.prepare_synthia(folders["source"], workers=2)
    assert isinstance(parallel, ConversionReport) and parallel.converted == 4
    assert [r.annotation for r in parallel.records] == [r.annotation for r in serial.records]
    for path, array in serial_pngs.items():
        np.testing.assert_array_equal(np.asarray(Image.open(path)), array)


def test_missing_input_folder_exits_with_clear_error(tmp_path, capsys):
    assert synthia.main([str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere' / 'RGB'}/<id>.png" in capsys.readouterr().err
    assert cityscapes.main([str(tmp_path), "--splits", "val"]) == 2
    assert "_gtFine_polygons.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "module, expected",
    [
        (synthia, "GT/LABELS/<id>.png"),
        (cityscapes, "_gtFine_polygons.json"),
        (synthetic, "--num-source"),
    ],
)
def test_help_explains_layout(module, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert expected in capsys.readouterr().out


@pytest.mark.slow
def test_command_line_scripts_end_to_end(tmp_path, repo_root):
    """``datasets/prepare_synthetic.py`` as users run it, with worker processes, twice."""
    import subprocess
    import sys

    command = [
        sys.executable,
        str(repo_root / "datasets" / "prepare_synthetic.py"),
        str(tmp_path / "synthetic"),
        "--num-source", "3", "--num-target-train", "2", "--num-target-val", "2",
        "--height", "64", "--width", "128", "--workers", "2",
    ]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "synthetic source: 3 converted" in first.stdout
    assert "synthetic target val: 2 converted" in first.stdout
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "synthetic source: 0 converted, 3 already valid" in second.stdout

    assert "% pixels" in first.stdout  # the class frequency tables
