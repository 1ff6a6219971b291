"""gbw_panoptic.evaluation.pq_compute against the real panopticapi on random panoptic sets."""
import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from panopticapi import evaluation as panopticapi_evaluation

from gbw_panoptic.evaluation.panoptic_io import (
    PanopticFormatError,
    id_to_rgb,
    read_panoptic_png,
    rgb_to_id,
    write_panoptic_png,
)
from gbw_panoptic.evaluation.pq import pq_compute


def _segments_info(ids: np.ndarray, category_of: Dict[int, int], crowd: set) -> List[dict]:
    segments = []
    values, counts = np.unique(ids, return_counts=True)
    for segment_id, area in zip(values.tolist(), counts.tolist()):
        if segment_id == 0 or segment_id not in category_of:
            continue
        ys, xs = np.nonzero(ids == segment_id)
        segments.append(
            {
                "id": segment_id,
                "category_id": category_of[segment_id],
                "area": area,
                "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)],
                "iscrowd": int(segment_id in crowd),
            }
        )
    return segments


def _random_image(rng: np.random.Generator, categories: List[dict]) -> Tuple[np.ndarray, list, np.ndarray, list]:
    """One GT and one prediction (id maps + segments_info) with overlapping, perturbed segments."""
    height, width = rng.integers(4, 40, size=2)
    category_ids = [c["id"] for c in categories]
    num_gt = int(rng.integers(1, 10))
    gt_segment_ids = rng.choice(np.arange(1, 256**3), size=num_gt, replace=False)
    if rng.random() < 0.5:  # Cityscapes-like ids: labelId * 1000 + k
        gt_segment_ids = np.unique(rng.integers(1, 40, size=num_gt) * 1000 + rng.integers(0, 3, size=num_gt))
    gt_category_of = {}
    for segment_id in gt_segment_ids.tolist():
        # Occasionally a GT category outside the category list (panopticapi counts but never averages it).
        gt_category_of[segment_id] = int(rng.choice(category_ids)) if rng.random() > 0.05 else 999
    crowd = {s for s in gt_segment_ids.tolist() if rng.random() < 0.2}

    # Blocky GT map with VOID, upsampled from a coarse grid, plus pixel noise.
    block = int(rng.integers(1, 6))
    coarse = rng.choice(np.concatenate([[0], gt_segment_ids]), size=(height // block + 1, width // block + 1))
    gt = np.kron(coarse, np.ones((block, block), dtype=np.int64))[:height, :width]
    noise = rng.random(gt.shape) < rng.uniform(0, 0.15)
    gt[noise] = rng.choice(np.concatenate([[0], gt_segment_ids]), size=int(noise.sum()))
    if rng.random() < 0.1:  # an id in the GT PNG that its JSON does not list
        gt[0, 0] = 255**3
    gt_segments = _segments_info(gt, gt_category_of, crowd)
    if rng.random() < 0.1:  # a GT segment listed in JSON but absent from the PNG
        gt_segments.append({"id": 77, "category_id": category_ids[0], "area": 0, "bbox": [0, 0, 0, 0], "iscrowd": 0})

    # Prediction: relabel GT segments (sometimes merged), change categories, paint rectangles, void.
    pred_id_of = {s: int(v) for s, v in zip(gt_segment_ids.tolist(), rng.choice(np.arange(1, 5000), size=num_gt, replace=False))}
    for s in list(pred_id_of):
        if rng.random() < 0.15:
            pred_id_of[s] = pred_id_of[int(rng.choice(gt_segment_ids))]
    pred = np.zeros_like(gt)
    for s, p in pred_id_of.items():
        pred[gt == s] = p
    for _ in range(int(rng.integers(0, 4))):
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        pred[y0 : y0 + rng.integers(1, height), x0 : x0 + rng.integers(1, width)] = rng.integers(5000, 6000)
    flip = rng.random(pred.shape) < rng.uniform(0, 0.2)
    pred[flip] = rng.choice(np.concatenate([[0], np.unique(pred)]), size=int(flip.sum()))
    pred_category_of = {}
    gt_category_by_pred = {p: gt_category_of[s] for s, p in pred_id_of.items()}
    for p in np.unique(pred).tolist():
        category = gt_category_by_pred.get(p, 999)
        if category == 999 or rng.random() < 0.15:
            category = int(rng.choice(category_ids))
        pred_category_of[p] = category
    pred_segments = _segments_info(pred, pred_category_of, set())
    for segment in pred_segments:
        del segment["iscrowd"]
        if rng.random() < 0.5:
            del segment["area"]  # predictions need no area: it is measured on the PNG
    return gt, gt_segments, pred, pred_segments


def _write_set(root: Path, seed: int, num_images: int) -> Tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    num_categories = int(rng.integers(1, 8))
    categories = [
        {"id": int(c), "name": f"class{c}", "isthing": int(rng.random() < 0.5), "color": [0, 0, 0]}
        for c in rng.choice(np.arange(1, 60), size=num_categories, replace=False)
    ]
    gt_json = {"images": [], "annotations": [], "categories": categories}
    pred_json = {"annotations": []}
    (root / "gt").mkdir(parents=True)
    (root / "pred").mkdir(parents=True)
    for index in range(num_images):
        gt, gt_segments, pred, pred_segments = _random_image(rng, categories)
        name = f"img{index}.png"
        write_panoptic_png(root / "gt" / name, gt)
        write_panoptic_png(root / "pred" / name, pred)
        gt_json["images"].append({"id": f"img{index}", "file_name": name, "height": gt.shape[0], "width": gt.shape[1]})
        gt_json["annotations"].append({"image_id": f"img{index}", "file_name": name, "segments_info": gt_segments})
        pred_json["annotations"].append({"image_id": f"img{index}", "file_name": name, "segments_info": pred_segments})
    pred_json["annotations"].reverse()  # matched by image_id, not by position
    (root / "gt.json").write_text(json.dumps(gt_json))
    (root / "pred.json").write_text(json.dumps(pred_json))
    return root / "gt.json", root / "pred.json"


def _panopticapi_results(gt_json_file: Path, pred_json_file: Path) -> dict:
    """panopticapi's own per-image routine and averaging (its multi-core wrapper only adds a Pool)."""
    gt_json = json.loads(gt_json_file.read_text())
    pred_json = json.loads(pred_json_file.read_text())
    categories = {c["id"]: c for c in gt_json["categories"]}
    pred_by_image = {a["image_id"]: a for a in pred_json["annotations"]}
    pairs = [(a, pred_by_image[a["image_id"]]) for a in gt_json["annotations"]]
    stat = panopticapi_evaluation.pq_compute_single_core(
        0, pairs, str(gt_json_file.parent / "gt"), str(gt_json_file.parent / "pred"), categories
    )
    results = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        try:
            results[name], per_class = stat.pq_average(categories, isthing=isthing)
        except ZeroDivisionError:  # no category counted: every per-class result is zero
            results[name] = {"pq": math.nan, "sq": math.nan, "rq": math.nan, "n": 0}
            per_class = {c: {"pq": 0.0, "sq": 0.0, "rq": 0.0} for c in categories}
        if name == "All":
            results["per_class"] = per_class
            results["counts"] = {c: (stat[c].tp, stat[c].fp, stat[c].fn, stat[c].iou) for c in categories}
    return results


def _assert_same(ours: dict, reference: dict) -> None:
    for name in ("All", "Things", "Stuff"):
        assert ours[name]["n"] == reference[name]["n"], name
        for key in ("pq", "sq", "rq"):
            if reference[name]["n"] == 0:
                assert math.isnan(ours[name][key])
            else:
                assert ours[name][key] == pytest.approx(reference[name][key], abs=1e-9, rel=0), (name, key)
    assert set(ours["per_class"]) == set(reference["per_class"])
    for category_id, values in reference["per_class"].items():
        for key in ("pq", "sq", "rq"):
            assert ours["per_class"][category_id][key] == pytest.approx(values[key], abs=1e-9, rel=0)
        tp, fp, fn, iou = reference["counts"][category_id]
        mine = ours["per_class"][category_id]
        assert (mine["tp"], mine["fp"], mine["fn"]) == (tp, fp, fn)
        assert mine["iou"] == pytest.approx(iou, abs=1e-9, rel=0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), num_images=st.integers(1, 4))
def test_pq_equals_panopticapi_on_random_sets(tmp_path_factory, seed, num_images):
    root = tmp_path_factory.mktemp("pq")
    gt_json_file, pred_json_file = _write_set(root, seed, num_images)
    ours = pq_compute(gt_json_file, pred_json_file, root / "gt", root / "pred", num_workers=1, progress=False)
    _assert_same(ours, _panopticapi_results(gt_json_file, pred_json_file))


def test_threads_give_the_serial_result_and_default_folders(tmp_path):
    gt_json_file, pred_json_file = _write_set(tmp_path, seed=12345, num_images=24)
    reference = _panopticapi_results(gt_json_file, pred_json_file)
    serial = pq_compute(gt_json_file, pred_json_file, tmp_path / "gt", tmp_path / "pred", num_workers=1, progress=False)
    threaded = pq_compute(gt_json_file, pred_json_file, tmp_path / "gt", tmp_path / "pred", num_workers=3, progress=False)
    assert reference["All"]["n"] > 0
    _assert_same(serial, reference)
    assert serial == threaded  # same accumulation order: bit-identical whatever the thread count
    # The default folders are the JSON paths without ".json", as in panopticapi.
    (tmp_path / "gt.json").rename(tmp_path / "gt_copy.json")
    (tmp_path / "gt").rename(tmp_path / "gt_copy")
    defaults = pq_compute(tmp_path / "gt_copy.json", pred_json_file, progress=False)
    assert defaults == serial


def test_script_without_main_guard_computes_pq(tmp_path):
    """As with panopticapi, a script without ``if __name__ == "__main__":`` works (no worker
    process imports it again); run with a timeout so that a hang fails the test."""
    gt_json_file, pred_json_file = _write_set(tmp_path, seed=7, num_images=6)
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import json, sys\n"
        "from gbw_panoptic.evaluation.pq import pq_compute\n"
        f"results = pq_compute({str(gt_json_file)!r}, {str(pred_json_file)!r}, num_workers=2, progress=False)\n"
        "print(json.dumps(results['All']))\n"
    )
    completed = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=_subprocess_env(), cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stderr
    expected = _panopticapi_results(gt_json_file, pred_json_file)["All"]
    assert json.loads(completed.stdout) == pytest.approx(expected, nan_ok=True)


def _subprocess_env() -> dict:
    """This process's environment, with the package on PYTHONPATH as pytest imports it."""
    import gbw_panoptic

    package_root = str(Path(gbw_panoptic.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}


def test_perfect_prediction_scores_one(tmp_path):
    ids = np.zeros((8, 10), dtype=np.int64)
    ids[:4] = 7
    ids[4:, :5] = 26001
    ids[4:, 5:] = 26002
    segments = _segments_info(ids, {7: 7, 26001: 26, 26002: 26}, set())
    categories = [{"id": 7, "name": "road", "isthing": 0}, {"id": 26, "name": "car", "isthing": 1}]
    for role in ("gt", "pred"):
        write_panoptic_png(tmp_path / role / "a.png", ids)
        annotation = {"image_id": "a", "file_name": "a.png", "segments_info": segments}
        (tmp_path / f"{role}.json").write_text(json.dumps({"annotations": [annotation], "categories": categories}))
    results = pq_compute(tmp_path / "gt.json", tmp_path / "pred.json", num_workers=1, progress=False)
    assert results["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}
    assert results["per_class"][26]["tp"] == 2 and results["Things"]["n"] == 1


def test_png_id_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256**3, size=(5, 7))
    write_panoptic_png(tmp_path / "x.png", ids)
    assert np.array_equal(read_panoptic_png(tmp_path / "x.png"), ids)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "x.png").st_mode) == 0o666 & ~umask  # not mkstemp's 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temporary file left
    assert np.array_equal(rgb_to_id(id_to_rgb(ids)), ids)
    with pytest.raises(PanopticFormatError, match=r"\[0, 16777215\]"):
        id_to_rgb(np.array([256**3]))


def _error_set(tmp_path: Path, pred_ids: np.ndarray, pred_segments: list) -> Tuple[Path, Path]:
    gt_ids = np.full((6, 6), 7, dtype=np.int64)
    gt_ids[:3, :3] = 26001
    write_panoptic_png(tmp_path / "gt" / "a.png", gt_ids)
    write_panoptic_png(tmp_path / "pred" / "a.png", pred_ids)
    gt_segments = _segments_info(gt_ids, {7: 7, 26001: 26}, set())
    categories = [{"id": 7, "name": "road", "isthing": 0}, {"id": 26, "name": "car", "isthing": 1}]
    (tmp_path / "gt.json").write_text(json.dumps({"annotations": [{"image_id": "a", "file_name": "a.png", "segments_info": gt_segments}], "categories": categories}))
    (tmp_path / "pred.json").write_text(json.dumps({"annotations": [{"image_id": "a", "file_name": "a.png", "segments_info": pred_segments}]}))
    return tmp_path / "gt.json", tmp_path / "pred.json"


@pytest.mark.parametrize(
    "pred_shape, pred_segments, message",
    [
        ((6, 6), [{"id": 7, "category_id": 3}], r"image 'a'.*segment 7 has category_id 3.*valid ids: \[7, 26\]"),
        ((6, 6), [], r"image 'a': segment id\(s\) \[7\] appear in the predicted PNG .*a\.png but not in its segments_info"),
        ((6, 6), [{"id": 7, "category_id": 7}, {"id": 9, "category_id": 7}], r"image 'a': segment id\(s\) \[9\] are listed .* not appear in the PNG"),
        ((6, 6), [{"id": 7, "category_id": 7}, {"id": 7, "category_id": 26}], r"segment id 7 is listed twice"),
        ((6, 6), [{"id": 0, "category_id": 7}, {"id": 7, "category_id": 7}], r"segment id 0 is reserved for VOID"),
        ((5, 6), [{"id": 7, "category_id": 7}], r"image 'a': prediction .*a\.png is 5x6 \(HxW\) but the ground truth .* is 6x6"),
    ],
)
def test_invalid_predictions_name_image_and_segment(tmp_path, pred_shape, pred_segments, message):
    gt_json_file, pred_json_file = _error_set(tmp_path, np.full(pred_shape, 7), pred_segments)
    with pytest.raises(PanopticFormatError, match=message):
        pq_compute(gt_json_file, pred_json_file, num_workers=1, progress=False)


def test_missing_prediction_and_corrupt_png(tmp_path):
    gt_json_file, pred_json_file = _error_set(tmp_path, np.full((6, 6), 7), [{"id": 7, "category_id": 7}])
    (tmp_path / "pred" / "a.png").write_bytes(b"not a png")
    with pytest.raises(PanopticFormatError, match=r"cannot decode panoptic PNG .*a\.png"):
        pq_compute(gt_json_file, pred_json_file, num_workers=1, progress=False)
    pred_json_file.write_text(json.dumps({"annotations": []}))
    with pytest.raises(PanopticFormatError, match=r"no prediction for image 'a'"):
        pq_compute(gt_json_file, pred_json_file, num_workers=1, progress=False)
    pred_json_file.write_text(json.dumps({"segments": []}))
    with pytest.raises(PanopticFormatError, match=r"pred\.json has no \['annotations'\] list"):
        pq_compute(gt_json_file, pred_json_file, num_workers=1, progress=False)


def test_bench_pq_runs_and_agrees_on_a_tiny_set(tmp_path):
    """The benchmark runs in its own process (panopticapi forks workers: never from the test process,
    whose threads could hold a lock at the fork), with a timeout."""
    bench = Path(__file__).resolve().parents[1] / "tools" / "bench_pq.py"
    argv = ["--sizes", "1", "3", "--height", "96", "--width", "192", "--data-dir", str(tmp_path / "set"), "--out", str(tmp_path / "bench.json")]
    completed = subprocess.run(
        [sys.executable, str(bench), *argv], capture_output=True, text=True, timeout=300, env=_subprocess_env()
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["max_abs_difference"] <= 1e-9 and report["sizes"] == [1, 3]
    assert set(report["seconds"]["3"]) == {"panopticapi", "gbw_panoptic", "gbw_panoptic, 1 thread"}
    assert "speed vs panopticapi" in completed.stdout
    gt = json.loads((tmp_path / "set" / "gt.json").read_text())
    assert any(s["iscrowd"] for a in gt["annotations"] for s in a["segments_info"])  # crowd regions are exercised
    assert len(json.loads((tmp_path / "set" / "gt_3.json").read_text())["annotations"]) == 3
