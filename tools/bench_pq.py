#!/usr/bin/env python
"""Benchmark gbw_panoptic's pq_compute against panopticapi's on the same generated panoptic sets.

Generates a Cityscapes-like COCO panoptic set (ground truth and a perturbed prediction: shifted
boundaries, missed, split and mislabelled instances, VOID holes, crowd regions), then, for each set
size (the first N images), runs ``panopticapi.evaluation.pq_compute`` (a worker process per CPU),
``gbw_panoptic.evaluation.pq_compute`` (default: a thread per CPU) and the latter with one thread,
checks that all results agree to 1e-9, prints a table of times and ratios and writes a JSON report.
The ground-truth PNGs are written by Pillow (as cityscapesScripts writes Cityscapes panoptic ground
truth), the predicted ones as gbw_panoptic's evaluator writes them (OpenCV).

Example (sizes up to Cityscapes val, then a set of small images):
    python tools/bench_pq.py --sizes 1 2 8 32 500 --out output/bench/bench_pq.json
    python tools/bench_pq.py --sizes 1 2 8 40 --height 256 --width 512 --out output/bench/bench_pq_small.json
"""
import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np
from PIL import Image
from tabulate import tabulate
from tqdm import tqdm

from gbw_panoptic.evaluation.panoptic_io import id_to_rgb, write_panoptic_png
from gbw_panoptic.evaluation.pq import pq_compute
from gbw_panoptic.utils.io import atomic_write, write_json

# Cityscapes labelIds of the 19 evaluated classes; 24..33 are things.
STUFF_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23]
THING_LABEL_IDS = [24, 25, 26, 27, 28, 31, 32, 33]


def _random_polygon(rng: np.random.Generator, height: int, width: int, size: float) -> np.ndarray:
    """A random star-shaped polygon (int32, Nx2 xy) of roughly ``size`` pixels radius."""
    center = rng.uniform([0, 0], [width, height])
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(5, 12))))
    radii = size * rng.uniform(0.5, 1.0, size=len(angles))
    points = center + np.stack([np.cos(angles), np.sin(angles)], axis=1) * radii[:, None]
    return points.astype(np.int32)


def generate_ground_truth(rng: np.random.Generator, height: int, width: int) -> Tuple[np.ndarray, Dict[int, Tuple[int, bool]]]:
    """A Cityscapes-like panoptic id map (int32, HxW) and {segment id: (category id, is crowd)}."""
    ids = np.zeros((height, width), dtype=np.int32)
    segments: Dict[int, Tuple[int, bool]] = {}
    # Horizontal stuff bands (sky, buildings, road ...) with wavy borders, then stuff blobs.
    borders = np.sort(rng.uniform(0, height, size=5)).astype(int)
    band_labels = rng.choice(STUFF_LABEL_IDS, size=len(borders) + 1, replace=False)
    columns = np.arange(width)
    previous = np.zeros(width, dtype=int)
    for border, label in zip(list(borders) + [height], band_labels):
        wave = (border + 20 * np.sin(columns / rng.uniform(50, 300) + rng.uniform(0, 6))).astype(int)
        wave = np.clip(wave, 0, height) if border < height else np.full(width, height)
        rows = np.arange(height)[:, None]
        ids[(rows >= previous[None, :]) & (rows < wave[None, :])] = label
        segments[int(label)] = (int(label), False)
        previous = np.maximum(previous, wave)
    for label in rng.choice(STUFF_LABEL_IDS, size=6):
        for _ in range(int(rng.integers(1, 4))):
            cv2.fillPoly(ids, [_random_polygon(rng, height, width, rng.uniform(0.02, 0.15) * height)], int(label))
        segments[int(label)] = (int(label), False)
    # Thing instances: 10-40 polygons of various sizes; some categories get a crowd region.
    instance_count: Dict[int, int] = {}
    for _ in range(int(rng.integers(10, 41))):
        label = int(rng.choice(THING_LABEL_IDS))
        index = instance_count.get(label, 0)
        instance_count[label] = index + 1
        segment_id = label * 1000 + index
        cv2.fillPoly(ids, [_random_polygon(rng, height, width, rng.uniform(0.01, 0.12) * height)], segment_id)
        segments[segment_id] = (label, False)
    for label in rng.choice(THING_LABEL_IDS, size=2, replace=False):  # crowd: id = labelId
        cv2.fillPoly(ids, [_random_polygon(rng, height, width, 0.05 * height)], int(label))
        segments[int(label)] = (int(label), True)
    # VOID: a border strip and random holes (ego vehicle, unlabelled).
    ids[int(0.92 * height) :, :] = 0
    for _ in range(3):
        cv2.fillPoly(ids, [_random_polygon(rng, height, width, 0.03 * height)], 0)
    return ids, segments


def perturb_prediction(rng: np.random.Generator, gt_ids: np.ndarray, segments: Dict[int, Tuple[int, bool]]) -> Tuple[np.ndarray, Dict[int, int]]:
    """A prediction (int32 id map, {segment id: category id}) derived from the ground truth."""
    height, width = gt_ids.shape
    dy, dx = rng.integers(-6, 7, size=2)
    pred = np.roll(gt_ids, (int(dy), int(dx)), axis=(0, 1))
    categories = {}
    new_id = 900000
    for segment_id, (category_id, _crowd) in segments.items():
        mask = pred == segment_id
        if not mask.any():
            continue
        roll = rng.random()
        if category_id in THING_LABEL_IDS and roll < 0.1:  # missed instance, absorbed by road
            pred[mask] = STUFF_LABEL_IDS[0]
            categories[STUFF_LABEL_IDS[0]] = STUFF_LABEL_IDS[0]
            continue
        if roll < 0.2:  # wrong class
            category_id = int(rng.choice(THING_LABEL_IDS if category_id in THING_LABEL_IDS else STUFF_LABEL_IDS))
        if category_id in THING_LABEL_IDS and roll > 0.9:  # split in two
            ys, xs = np.nonzero(mask)
            half = mask & (np.arange(width)[None, :] > np.median(xs))
            pred[half] = new_id
            categories[new_id] = category_id
            new_id += 1
        pred[pred == segment_id] = new_id
        categories[new_id] = category_id
        new_id += 1
    for _ in range(int(rng.integers(0, 8))):  # false positives
        category_id = int(rng.choice(THING_LABEL_IDS))
        cv2.fillPoly(pred, [_random_polygon(rng, height, width, rng.uniform(0.01, 0.05) * height)], new_id)
        categories[new_id] = category_id
        new_id += 1
    present = set(np.unique(pred).tolist()) - {0}
    return pred, {segment_id: categories[segment_id] for segment_id in present}


def _segments_info(ids: np.ndarray, categories: Dict[int, int], crowd: Dict[int, bool]) -> List[Dict[str, Any]]:
    values, areas = np.unique(ids, return_counts=True)
    info = []
    for segment_id, area in zip(values.tolist(), areas.tolist()):
        if segment_id == 0:
            continue
        x, y, w, h = cv2.boundingRect((ids == segment_id).astype(np.uint8))
        info.append(
            {
                "id": segment_id,
                "category_id": categories[segment_id],
                "area": area,
                "bbox": [x, y, w, h],
                "iscrowd": int(crowd.get(segment_id, False)),
            }
        )
    return info


def generate_set(root: Path, num_images: int, height: int, width: int, seed: int) -> Tuple[Path, Path]:
    """Write ``root/gt.json`` with ``root/gt/`` (PNGs written by Pillow, as cityscapesScripts writes
    Cityscapes panoptic ground truth) and ``root/pred.json`` with ``root/pred/`` (written as
    gbw_panoptic's evaluator writes predictions: ``write_panoptic_png``, OpenCV); returns the JSON paths."""
    rng = np.random.default_rng(seed)
    categories = [
        {"id": label, "name": f"label{label}", "isthing": int(label in THING_LABEL_IDS), "color": [0, 0, 0]}
        for label in STUFF_LABEL_IDS + THING_LABEL_IDS
    ]
    gt_json: Dict[str, Any] = {"images": [], "annotations": [], "categories": categories}
    pred_json: Dict[str, Any] = {"images": [], "annotations": [], "categories": categories}
    (root / "gt").mkdir(parents=True, exist_ok=True)
    for index in tqdm(range(num_images), desc="generate", unit="img"):
        gt_ids, segments = generate_ground_truth(rng, height, width)
        pred_ids, pred_categories = perturb_prediction(rng, gt_ids, segments)
        name = f"image_{index:05d}.png"
        with atomic_write(root / "gt" / name) as f:
            Image.fromarray(id_to_rgb(gt_ids)).save(f, format="PNG")
        write_panoptic_png(root / "pred" / name, pred_ids)
        image = {"id": name[:-4], "file_name": name, "height": height, "width": width}
        gt_categories = {segment_id: category for segment_id, (category, _) in segments.items()}
        crowd = {segment_id: is_crowd for segment_id, (_, is_crowd) in segments.items()}
        for document, ids, cats, crowds in ((gt_json, gt_ids, gt_categories, crowd), (pred_json, pred_ids, pred_categories, {})):
            document["images"].append(image)
            document["annotations"].append(
                {"image_id": image["id"], "file_name": name, "segments_info": _segments_info(ids, cats, crowds)}
            )
    write_json(root / "gt.json", gt_json, indent=None)
    write_json(root / "pred.json", pred_json, indent=None)
    return root / "gt.json", root / "pred.json"


def _max_difference(a: Dict[str, Any], b: Dict[str, Any]) -> float:
    differences = [abs(a[group][key] - b[group][key]) for group in ("All", "Things", "Stuff") for key in ("pq", "sq", "rq")]
    for category_id, values in b["per_class"].items():
        differences += [abs(a["per_class"][category_id][key] - values[key]) for key in ("pq", "sq", "rq")]
    return max(differences)


def _subset(gt_json_file: Path, pred_json_file: Path, num_images: int) -> Tuple[Path, Path]:
    """JSON files of the first ``num_images`` images of the set, next to the full set's."""
    paths = []
    for path in (gt_json_file, pred_json_file):
        document = json.loads(path.read_text())
        document["annotations"] = document["annotations"][:num_images]
        document["images"] = document["images"][:num_images]
        subset = path.with_name(f"{path.stem}_{num_images}.json")
        write_json(subset, document, indent=None)
        paths.append(subset)
    return paths[0], paths[1]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 8, 32, 500], help="set sizes (images) to time; the set is generated once for the largest (default 1 2 8 32 500: up to Cityscapes val)")
    parser.add_argument("--height", type=int, default=1024, help="image height in pixels (default 1024)")
    parser.add_argument("--width", type=int, default=2048, help="image width in pixels (default 2048)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the generated set")
    parser.add_argument("--repeats", type=int, default=1, help="time each implementation this many times per size (interleaved), keep the fastest")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where to write the generated set: gt.json, pred.json, gt/ and pred/ (default: a temporary folder, removed afterwards)",
    )
    parser.add_argument(
        "--out", "--output", type=Path, default=Path("output/bench/bench_pq.json"),
        help="JSON report path (--output: its former name, still accepted)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    sizes = sorted(set(args.sizes))

    from panopticapi.evaluation import pq_compute as panopticapi_pq_compute

    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    implementations = {
        "panopticapi": lambda gt, pred, folders: panopticapi_pq_compute(str(gt), str(pred), *folders),
        "gbw_panoptic": lambda gt, pred, folders: pq_compute(gt, pred, *folders, progress=False),
        "gbw_panoptic, 1 thread": lambda gt, pred, folders: pq_compute(gt, pred, *folders, num_workers=1, progress=False),
    }
    timings: Dict[int, Dict[str, float]] = {size: {} for size in sizes}
    differences: Dict[int, float] = {}
    pq_all: Dict[int, float] = {}
    with contextlib.ExitStack() as stack:
        root = args.data_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_pq_")))
        gt_json_file, pred_json_file = generate_set(root, sizes[-1], args.height, args.width, args.seed)
        folders = (str(root / "gt"), str(root / "pred"))
        for size in sizes:
            gt_subset, pred_subset = _subset(gt_json_file, pred_json_file, size)
            results = {}
            for _ in range(args.repeats):
                for name, run in implementations.items():
                    start = time.perf_counter()
                    with contextlib.redirect_stdout(io.StringIO()):  # panopticapi prints its progress
                        results[name] = run(gt_subset, pred_subset, folders)
                    timings[size][name] = min(timings[size].get(name, float("inf")), time.perf_counter() - start)
            reference = results["panopticapi"]
            differences[size] = max(_max_difference(result, reference) for result in results.values())
            pq_all[size] = reference["All"]["pq"]

    rows = [
        [size, name, f"{seconds:.3f}", f"{1000 * seconds / size:.1f}", f"{timings[size]['panopticapi'] / seconds:.2f}x"]
        for size in sizes
        for name, seconds in timings[size].items()
    ]
    print(f"sets of 1-{sizes[-1]} images of {args.height}x{args.width}, {cpus} CPUs ({platform.processor() or platform.machine()}); "
          "ground truth written by Pillow, predictions by OpenCV")
    print(tabulate(rows, headers=["images", "implementation", "seconds", "ms / image", "speed vs panopticapi"], tablefmt="github"))
    print(f"largest difference of any PQ/SQ/RQ (All/Things/Stuff/per class): {max(differences.values()):.3g}")
    report = {
        "sizes": sizes,
        "height": args.height,
        "width": args.width,
        "seed": args.seed,
        "repeats": args.repeats,
        "cpus": cpus,
        "machine": platform.platform(),
        # 1/5/15-minute load averages when the run started and ended.
        "load_average": {"start": load_at_start, "end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "seconds": {str(size): timings[size] for size in sizes},
        "speedup": {str(size): timings[size]["panopticapi"] / timings[size]["gbw_panoptic"] for size in sizes},
        "max_abs_difference": max(differences.values()),
        "pq_all": {str(size): pq_all[size] for size in sizes},
    }
    write_json(args.out, report)
    print(f"wrote {args.out}")
    if max(differences.values()) > 1e-9:
        print("ERROR: the implementations disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
