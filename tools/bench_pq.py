#!/usr/bin/env python
"""Benchmark gbw_panoptic's pq_compute against panopticapi's on the same generated panoptic set.

Generates a Cityscapes-like COCO panoptic set (ground truth and a perturbed prediction: shifted
boundaries, missed, split and mislabelled instances, VOID holes, crowd regions), then runs
``panopticapi.evaluation.pq_compute`` (its own worker pool, one process per CPU) and
``gbw_panoptic.evaluation.pq_compute`` on it, checks that the results agree to 1e-9, prints a
table and writes a JSON report. A third row times reading the same PNGs the way gbw_panoptic's
pq_compute reads them (``read_panoptic_runs``), with the same worker count and nothing else: the
part of its time that goes to the PNGs.

The predicted PNGs are written as gbw_panoptic's evaluator writes them (``write_panoptic_png``:
OpenCV, every row Sub filtered). ``--gt-writer`` picks how the ground-truth PNGs are written:
``pillow`` (``PIL.Image.fromarray(rgb).save(path)``, as cityscapesScripts' createPanopticImgs
writes Cityscapes panoptic ground truth: adaptive row filters), ``opencv`` (like the predictions)
or ``both`` (the default): the same id maps written both ways, each timed and checked in the same
run, the repeats interleaved; the headline speed-up is the Pillow one. With ``--data-dir`` the set
is written to ``gt.json``, ``pred.json``, ``pred/`` and one ``gt_<writer>/`` folder per writer.

Example:
    python tools/bench_pq.py --num-images 200 --height 1024 --width 2048 --output bench_pq.json
"""
import argparse
import contextlib
import io
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image
from tabulate import tabulate
from tqdm import tqdm

from gbw_panoptic.evaluation.panoptic_io import id_to_rgb, read_panoptic_runs, write_panoptic_png
from gbw_panoptic.evaluation.pq import init_worker, pq_compute
from gbw_panoptic.utils.io import write_json

# Cityscapes labelIds of the 19 evaluated classes; 24..33 are things.
STUFF_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23]
THING_LABEL_IDS = [24, 25, 26, 27, 28, 31, 32, 33]
# How the ground-truth PNGs can be written; the headline speed-up is the first one's.
GT_WRITERS = ("pillow", "opencv")


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


def write_ground_truth_png(path: Path, ids: np.ndarray, writer: str) -> None:
    """Write a ground-truth id map with ``writer``: "opencv" (write_panoptic_png) or "pillow"
    (``Image.fromarray(rgb).save(path)``, as cityscapesScripts writes ground truth)."""
    if writer == "opencv":
        write_panoptic_png(path, ids)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(id_to_rgb(ids)).save(path)


def generate_set(root: Path, num_images: int, height: int, width: int, seed: int, gt_writers: Sequence[str] = GT_WRITERS) -> Tuple[Path, Path]:
    """Write ``root/gt.json``, ``root/pred{.json,/}`` and the ground-truth PNGs once per writer in
    ``root/gt_<writer>/`` (the same id maps); returns the two JSON paths."""
    rng = np.random.default_rng(seed)
    categories = [
        {"id": label, "name": f"label{label}", "isthing": int(label in THING_LABEL_IDS), "color": [0, 0, 0]}
        for label in STUFF_LABEL_IDS + THING_LABEL_IDS
    ]
    gt_json: Dict[str, Any] = {"images": [], "annotations": [], "categories": categories}
    pred_json: Dict[str, Any] = {"images": [], "annotations": [], "categories": categories}
    for index in tqdm(range(num_images), desc="generate", unit="img"):
        gt_ids, segments = generate_ground_truth(rng, height, width)
        pred_ids, pred_categories = perturb_prediction(rng, gt_ids, segments)
        name = f"image_{index:05d}.png"
        for writer in gt_writers:
            write_ground_truth_png(root / f"gt_{writer}" / name, gt_ids, writer)
        write_panoptic_png(root / "pred" / name, pred_ids)
        image = {"id": name[:-4], "file_name": name, "height": height, "width": width}
        gt_categories = {segment_id: category for segment_id, (category, _) in segments.items()}
        crowd = {segment_id: is_crowd for segment_id, (_, is_crowd) in segments.items()}
        for document, ids, cats, crowds in ((gt_json, gt_ids, gt_categories, crowd), (pred_json, pred_ids, pred_categories, {})):
            document["images"].append(image)
            document["annotations"].append(
                {"image_id": image["id"], "file_name": name, "segments_info": _segments_info(ids, cats, crowds)}
            )
    write_json(root / "gt.json", gt_json)
    write_json(root / "pred.json", pred_json)
    return root / "gt.json", root / "pred.json"


def _decode_pair(paths: Tuple[str, str]) -> int:
    return sum(len(read_panoptic_runs(path).ids) for path in paths)


def decode_only(root: Path, gt_folder: Path, num_workers: int) -> None:
    """Read every PNG of ``gt_folder`` and ``root/pred`` as pq_compute does, with ``num_workers``
    processes set up as pq_compute's workers."""
    pairs = [(str(path), str(root / "pred" / path.name)) for path in sorted(gt_folder.glob("*.png"))]
    with multiprocessing.Pool(num_workers, initializer=init_worker) as pool:
        for _ in pool.imap(_decode_pair, pairs, chunksize=max(1, len(pairs) // (4 * num_workers))):
            pass


def _max_difference(a: Dict[str, Any], b: Dict[str, Any]) -> float:
    differences = [abs(a[group][key] - b[group][key]) for group in ("All", "Things", "Stuff") for key in ("pq", "sq", "rq")]
    for category_id, values in b["per_class"].items():
        differences += [abs(a["per_class"][category_id][key] - values[key]) for key in ("pq", "sq", "rq")]
    return max(differences)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=200, help="images in the generated set (default 200)")
    parser.add_argument("--height", type=int, default=1024, help="image height in pixels (default 1024)")
    parser.add_argument("--width", type=int, default=2048, help="image width in pixels (default 2048)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the generated set")
    parser.add_argument(
        "--gt-writer",
        choices=("both",) + GT_WRITERS,
        default="both",
        help="how the ground-truth PNGs are written: pillow (Image.fromarray(rgb).save, as cityscapesScripts writes "
        "real ground truth: adaptive row filters), opencv (write_panoptic_png, as the predictions: Sub rows) or both "
        "(default: the same set written both ways, each timed in the same run; the headline speed-up is Pillow's)",
    )
    parser.add_argument("--workers", type=int, default=None, help="worker processes of gbw_panoptic's pq_compute (default: all CPUs, as panopticapi)")
    parser.add_argument("--repeats", type=int, default=1, help="time each implementation this many times, keep the fastest")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where to write the generated set: gt.json, pred.json, pred/ and gt_<writer>/ per ground-truth writer, "
        "rewritten on every run (default: a temporary folder, removed afterwards)",
    )
    parser.add_argument("--output", type=Path, default=Path("bench_pq.json"), help="JSON report path (default bench_pq.json)")
    args = parser.parse_args(argv)
    writers = GT_WRITERS if args.gt_writer == "both" else (args.gt_writer,)

    from panopticapi.evaluation import pq_compute as panopticapi_pq_compute

    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None

    with contextlib.ExitStack() as stack:
        root = args.data_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_pq_")))
        gt_json_file, pred_json_file = generate_set(root, args.num_images, args.height, args.width, args.seed, writers)
        timings: Dict[str, Dict[str, float]] = {writer: {} for writer in writers}
        results: Dict[str, Dict[str, Dict[str, Any]]] = {writer: {} for writer in writers}
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        for _ in range(args.repeats):
            for writer in writers:
                gt_folder = root / f"gt_{writer}"
                folders = (str(gt_json_file), str(pred_json_file), str(gt_folder), str(root / "pred"))
                for name in ("panopticapi", "gbw_panoptic", "PNG decoding only"):
                    start = time.perf_counter()
                    if name == "panopticapi":
                        with contextlib.redirect_stdout(io.StringIO()):
                            results[writer][name] = panopticapi_pq_compute(*folders)
                    elif name == "gbw_panoptic":
                        results[writer][name] = pq_compute(*folders, num_workers=args.workers, progress=False)
                    else:
                        decode_only(root, gt_folder, args.workers or cpus)
                    timings[writer][name] = min(timings[writer].get(name, float("inf")), time.perf_counter() - start)

    # Every result against panopticapi's on the first writer's PNGs (the same id maps whatever the writer).
    reference = results[writers[0]]["panopticapi"]
    differences = {writer: max(_max_difference(result, reference) for result in results[writer].values()) for writer in writers}
    speedups = {writer: timings[writer]["panopticapi"] / timings[writer]["gbw_panoptic"] for writer in writers}
    rows = [
        [writer, name, f"{seconds:.2f}", f"{1000 * seconds / args.num_images:.1f}", f"{timings[writer]['panopticapi'] / seconds:.2f}x",
         f"{100 * results[writer][name]['All']['pq']:.3f}" if name in results[writer] else "-"]
        for writer in writers
        for name, seconds in timings[writer].items()
    ]
    print(f"{args.num_images} images of {args.height}x{args.width}, {cpus} CPUs ({platform.processor() or platform.machine()}); "
          "predictions written by OpenCV")
    print(tabulate(rows, headers=["GT written by", "implementation", "seconds", "ms / image", "speed vs panopticapi", "PQ (All)"], tablefmt="github"))
    print(f"largest difference of any PQ/SQ/RQ (All/Things/Stuff/per class): {max(differences.values()):.3g}")
    report = {
        "num_images": args.num_images,
        "height": args.height,
        "width": args.width,
        "seed": args.seed,
        "cpus": cpus,
        "machine": platform.platform(),
        # 1/5/15-minute load averages when the run started and ended (its own workers included).
        "load_average": {"start": load_at_start, "end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "prediction_writer": "opencv",
        "gt_writer": writers[0],
        "seconds": timings[writers[0]],
        "speedup": speedups[writers[0]],
        "max_abs_difference": max(differences.values()),
        "pq": {name: result["All"] for name, result in results[writers[0]].items()},
        "by_gt_writer": {
            writer: {
                "seconds": timings[writer],
                "speedup": speedups[writer],
                "max_abs_difference": differences[writer],
                "pq": {name: result["All"] for name, result in results[writer].items()},
            }
            for writer in writers
        },
    }
    write_json(args.output, report)
    print(f"wrote {args.output}")
    if max(differences.values()) > 1e-9:
        print("ERROR: the implementations disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
