"""Fast exact panoptic quality (PQ), a drop-in replacement for ``panopticapi.evaluation.pq_compute``.

The matching rules are panopticapi's, to the letter:

- a ground-truth (GT) segment and a predicted segment of the same category match when
  IoU > 0.5, where the union leaves out the predicted pixels that fall on GT VOID (id 0) and the
  GT area is the ``area`` field of the GT JSON;
- crowd GT segments (``iscrowd`` 1) never match; an unmatched predicted segment is not a false
  positive when more than half of it lies on GT VOID plus the (last listed) crowd segment of its
  category;
- unmatched non-crowd GT segments are false negatives;
- a category enters the averages only when it has at least one TP, FP or FN.

What differs is the speed: both PNGs of an image are decoded by OpenCV, the pixels become runs of
equal (GT id, predicted id) pairs (panoptic maps are piecewise constant), and one weighted
``bincount`` over the runs gives the whole GT x prediction intersection matrix. Images are
processed by a pool of threads (OpenCV's decoding and NumPy's pixel passes release the GIL, the
Python part is a few hundred segments): no process to start, so no start-up cost on small sets and
nothing that can hang (a script without ``if __name__ == "__main__":`` works). Their results are
accumulated in order, so the result does not depend on the number of threads. Invalid
predictions raise :class:`~gbw_panoptic.evaluation.panoptic_io.PanopticFormatError` naming the
image, the file and the segment. The one deliberate difference on valid input: where panopticapi
divides by zero (no category counted in a group, e.g. no thing segment at all), the group's ``pq``,
``sq`` and ``rq`` are NaN with ``n`` 0.
"""
import concurrent.futures
import functools
import json
import logging
import os
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from .panoptic_io import PanopticFormatError, read_panoptic_png

__all__ = ["PQStats", "pq_compute", "pq_image_stats"]

logger = logging.getLogger(__name__)

VOID = 0
# Statistics of one category: [iou sum, tp, fp, fn].
CategoryStats = List[float]


class PQStats:
    """Per-category sums of matched IoU, TP, FP and FN, accumulated image by image."""

    def __init__(self) -> None:
        self.per_category: Dict[int, CategoryStats] = {}

    def add(self, image_stats: Mapping[int, Sequence[float]]) -> None:
        """Add the statistics of one image (category id -> [iou, tp, fp, fn])."""
        for category_id, (iou, tp, fp, fn) in image_stats.items():
            total = self.per_category.setdefault(category_id, [0.0, 0, 0, 0])
            total[0] += iou
            total[1] += tp
            total[2] += fp
            total[3] += fn

    def category_result(self, category_id: int) -> Dict[str, float]:
        """PQ, SQ, RQ, TP, FP, FN and IoU sum of one category (zeros when it never appeared)."""
        iou, tp, fp, fn = self.per_category.get(category_id, [0.0, 0, 0, 0])
        result: Dict[str, float] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
        if tp + fp + fn > 0:
            denominator = tp + 0.5 * fp + 0.5 * fn
            result = {"pq": iou / denominator, "sq": iou / tp if tp != 0 else 0, "rq": tp / denominator}
        result.update({"tp": tp, "fp": fp, "fn": fn, "iou": iou})
        return result

    def average(
        self, categories: Mapping[int, Mapping[str, Any]], isthing: Optional[bool]
    ) -> Tuple[Dict[str, float], Dict[int, Dict[str, float]]]:
        """Mean PQ/SQ/RQ over the categories (all, things only or stuff only) that appeared.

        Returns ``({"pq", "sq", "rq", "n"}, {category_id: per-category result})`` like
        panopticapi's ``PQStat.pq_average``; the means are NaN when ``n`` is 0.
        """
        pq = sq = rq = 0.0
        n = 0
        per_class: Dict[int, Dict[str, float]] = {}
        for category_id, info in categories.items():
            if isthing is not None and (info["isthing"] == 1) != isthing:
                continue
            result = self.category_result(category_id)
            per_class[category_id] = result
            if result["tp"] + result["fp"] + result["fn"] == 0:
                continue
            n += 1
            pq += result["pq"]
            sq += result["sq"]
            rq += result["rq"]
        if n == 0:
            return {"pq": float("nan"), "sq": float("nan"), "rq": float("nan"), "n": 0}, per_class
        return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class


def _segments(annotation: Mapping[str, Any], role: str, png_path: str) -> List[Mapping[str, Any]]:
    """The ``segments_info`` of an annotation, checked for duplicate and VOID ids."""
    segments = annotation.get("segments_info")
    if segments is None:
        raise PanopticFormatError(
            f"{role} annotation of image {annotation.get('image_id')!r} ({png_path}) has no "
            f"'segments_info' list"
        )
    seen = set()
    for segment in segments:
        segment_id = segment["id"]
        if segment_id == VOID:
            raise PanopticFormatError(
                f"{role} image {annotation['image_id']!r} ({png_path}): segment id 0 is reserved "
                f"for VOID (unlabelled pixels) and cannot be listed in segments_info"
            )
        if segment_id in seen:
            raise PanopticFormatError(
                f"{role} image {annotation['image_id']!r} ({png_path}): segment id {segment_id} "
                f"is listed twice in segments_info"
            )
        seen.add(segment_id)
    return segments


def _pixel_runs(gt_ids: np.ndarray, pred_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal (GT id, predicted id) pairs along the flattened id maps (both HxW).

    Panoptic maps are piecewise constant, so a 1024x2048 image has some 10^4 runs instead of 2·10^6
    pixels; everything after this works on runs. Returns (GT id, predicted id, length) per run.
    """
    gt_flat, pred_flat = gt_ids.ravel(), pred_ids.ravel()
    first = np.empty(gt_flat.size, dtype=bool)  # True where a pixel starts a run
    first[:1] = True
    np.not_equal(gt_flat[1:], gt_flat[:-1], out=first[1:])
    first[1:] |= pred_flat[1:] != pred_flat[:-1]
    starts = np.flatnonzero(first)
    return gt_flat[starts], pred_flat[starts], np.diff(starts, append=gt_flat.size)


def _compact_index(ids: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """Position of each id in the sorted ``segment_ids`` (intp).

    VOID (0) maps to ``len(segment_ids)``, ids missing from ``segment_ids`` to ``len(segment_ids) + 1``.
    """
    num_segments = len(segment_ids)
    index = np.full(ids.shape, num_segments + 1, dtype=np.intp)
    if num_segments:
        position = np.minimum(np.searchsorted(segment_ids, ids), num_segments - 1)
        found = segment_ids[position] == ids
        index[found] = position[found]
    index[ids == VOID] = num_segments
    return index


def pq_image_stats(
    gt_annotation: Mapping[str, Any],
    pred_annotation: Mapping[str, Any],
    gt_folder: str,
    pred_folder: str,
    categories: Mapping[int, Any],
) -> Dict[int, CategoryStats]:
    """PQ statistics of one image: category id -> [iou sum, tp, fp, fn].

    Args:
        gt_annotation, pred_annotation: COCO panoptic annotations (``image_id``, ``file_name``,
            ``segments_info``) of the same image.
        gt_folder, pred_folder: folders holding their PNGs.
        categories: the valid category ids (keys).
    """
    image_id = gt_annotation["image_id"]
    gt_path = os.path.join(gt_folder, gt_annotation["file_name"])
    pred_path = os.path.join(pred_folder, pred_annotation["file_name"])
    gt_ids = read_panoptic_png(gt_path)
    pred_ids = read_panoptic_png(pred_path)
    if gt_ids.shape != pred_ids.shape:
        raise PanopticFormatError(
            f"image {image_id!r}: prediction {pred_path} is {pred_ids.shape[0]}x{pred_ids.shape[1]} "
            f"(HxW) but the ground truth {gt_path} is {gt_ids.shape[0]}x{gt_ids.shape[1]}"
        )
    gt_segments = _segments(gt_annotation, "ground-truth", gt_path)
    pred_segments = _segments(pred_annotation, "predicted", pred_path)
    for segment in pred_segments:
        if segment["category_id"] not in categories:
            raise PanopticFormatError(
                f"image {image_id!r} ({pred_path}): predicted segment {segment['id']} has category_id "
                f"{segment['category_id']}, which is not a category of the ground truth; valid ids: "
                f"{sorted(categories)}"
            )

    # Sorted ids, so that within an image matches are visited in panopticapi's order.
    gt_order = sorted(range(len(gt_segments)), key=lambda i: gt_segments[i]["id"])
    pred_order = sorted(range(len(pred_segments)), key=lambda i: pred_segments[i]["id"])
    gt_sorted = [gt_segments[i] for i in gt_order]
    pred_sorted = [pred_segments[i] for i in pred_order]
    gt_segment_ids = np.array([s["id"] for s in gt_sorted], dtype=np.int64)
    pred_segment_ids = np.array([s["id"] for s in pred_sorted], dtype=np.int64)
    num_gt, num_pred = len(gt_sorted), len(pred_sorted)

    # Intersection counts. Rows: GT segments, VOID, ids missing from the GT JSON. Columns:
    # predicted segments, VOID, ids missing from the predicted JSON.
    run_gt, run_pred, run_length = _pixel_runs(gt_ids, pred_ids)
    pred_index = _compact_index(run_pred, pred_segment_ids)
    num_columns = num_pred + 2
    pair_index = _compact_index(run_gt, gt_segment_ids) * num_columns + pred_index
    counts = np.bincount(pair_index, weights=run_length, minlength=(num_gt + 2) * num_columns)
    counts = counts.astype(np.int64).reshape(num_gt + 2, num_columns)
    pred_area = counts.sum(axis=0)

    if pred_area[num_pred + 1] > 0:
        unknown = np.unique(run_pred[pred_index == num_pred + 1])
        raise PanopticFormatError(
            f"image {image_id!r}: segment id(s) {unknown[:10].tolist()} appear in the predicted PNG "
            f"{pred_path} but not in its segments_info"
        )
    missing = pred_segment_ids[pred_area[:num_pred] == 0]
    if len(missing):
        raise PanopticFormatError(
            f"image {image_id!r}: segment id(s) {missing.tolist()} are listed in the predicted "
            f"segments_info but do not appear in the PNG {pred_path}"
        )

    intersection = counts[:num_gt, :num_pred].astype(np.float64)
    pred_void = counts[num_gt, :num_pred]
    gt_area = np.array([s["area"] for s in gt_sorted], dtype=np.float64)
    gt_category = np.array([s["category_id"] for s in gt_sorted], dtype=np.int64)
    gt_crowd = np.array([s.get("iscrowd", 0) == 1 for s in gt_sorted], dtype=bool)
    pred_category = np.array([s["category_id"] for s in pred_sorted], dtype=np.int64)

    candidate = (intersection > 0) & ~gt_crowd[:, None]
    candidate &= gt_category[:, None] == pred_category[None, :]
    union = pred_area[None, :num_pred] + gt_area[:, None] - intersection - pred_void[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(candidate, intersection / np.where(candidate, union, 1.0), 0.0)
    matched = candidate & (iou > 0.5)

    stats: Dict[int, CategoryStats] = {}

    def _category(category_id: int) -> CategoryStats:
        return stats.setdefault(int(category_id), [0.0, 0, 0, 0])

    for gt_row, pred_column in zip(*np.nonzero(matched)):
        entry = _category(gt_category[gt_row])
        entry[0] += float(iou[gt_row, pred_column])
        entry[1] += 1

    gt_matched = matched.any(axis=1)
    # Unmatched GT: crowd segments are ignored (the last one listed per category is remembered for
    # the false-positive test), the others are false negatives. Visited in JSON order.
    sorted_row = {original: row for row, original in enumerate(gt_order)}
    crowd_row_of_category: Dict[int, int] = {}
    for original in range(num_gt):
        row = sorted_row[original]
        if gt_matched[row]:
            continue
        if gt_crowd[row]:
            crowd_row_of_category[int(gt_category[row])] = row
            continue
        _category(gt_category[row])[3] += 1

    pred_matched = matched.any(axis=0)
    for column in range(num_pred):
        if pred_matched[column]:
            continue
        category_id = int(pred_category[column])
        ignored = int(pred_void[column])
        if category_id in crowd_row_of_category:
            ignored += int(counts[crowd_row_of_category[category_id], column])
        if ignored / pred_area[column] > 0.5:
            continue
        _category(category_id)[2] += 1
    return stats


def _matched_annotations(
    gt_json: Mapping[str, Any], pred_json: Mapping[str, Any], pred_json_file: str
) -> List[Tuple[Mapping[str, Any], Mapping[str, Any]]]:
    pred_annotations = {annotation["image_id"]: annotation for annotation in pred_json["annotations"]}
    pairs = []
    for gt_annotation in gt_json["annotations"]:
        image_id = gt_annotation["image_id"]
        if image_id not in pred_annotations:
            raise PanopticFormatError(
                f"no prediction for image {image_id!r} in {pred_json_file} (every ground-truth image "
                f"needs an annotation with the same image_id)"
            )
        pairs.append((gt_annotation, pred_annotations[image_id]))
    return pairs


def _load_json(path: str, keys: Sequence[str]) -> Dict[str, Any]:
    with open(path) as f:
        document = json.load(f)
    missing = [key for key in keys if key not in document]
    if missing:
        raise PanopticFormatError(f"{path} has no {missing} list: not a COCO panoptic JSON")
    return document


def _stats_of_pair(
    pair: Tuple[Mapping[str, Any], Mapping[str, Any]],
    gt_folder: str,
    pred_folder: str,
    categories: Mapping[int, Any],
) -> Dict[int, CategoryStats]:
    return pq_image_stats(pair[0], pair[1], gt_folder, pred_folder, categories)


def _default_num_workers() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _image_stats_stream(
    pairs: Sequence[Tuple[Mapping[str, Any], Mapping[str, Any]]],
    gt_folder: str,
    pred_folder: str,
    categories: Mapping[int, Any],
    num_threads: int,
) -> Iterator[Dict[int, CategoryStats]]:
    """Per-image statistics in the order of ``pairs``, computed by ``num_threads`` threads."""
    compute = functools.partial(
        _stats_of_pair, gt_folder=gt_folder, pred_folder=pred_folder, categories=categories
    )
    if num_threads <= 1 or len(pairs) <= 1:
        yield from map(compute, pairs)
        return
    with concurrent.futures.ThreadPoolExecutor(min(num_threads, len(pairs)), thread_name_prefix="pq") as pool:
        yield from pool.map(compute, pairs)


def pq_compute(
    gt_json_file: str,
    pred_json_file: str,
    gt_folder: Optional[str] = None,
    pred_folder: Optional[str] = None,
    *,
    num_workers: Optional[int] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Panoptic quality of the predictions in ``pred_json_file`` against ``gt_json_file``.

    Args:
        gt_json_file, pred_json_file: COCO panoptic JSON files.
        gt_folder, pred_folder: folders of the PNGs; default: the JSON path without ``.json``.
        num_workers: threads that read and match the images (1: this thread only; default: one
            per CPU this process may use).
        progress: show a tqdm progress bar.

    Returns:
        ``{"All": {"pq", "sq", "rq", "n"}, "Things": {...}, "Stuff": {...}, "per_class":
        {category_id: {"pq", "sq", "rq", "tp", "fp", "fn", "iou"}}}``, the structure of
        panopticapi's ``pq_compute`` (with tp/fp/fn/iou added per class). PQ, SQ, RQ in [0, 1].
    """
    gt_json_file = os.fspath(gt_json_file)
    pred_json_file = os.fspath(pred_json_file)
    gt_json = _load_json(gt_json_file, ("annotations", "categories"))
    pred_json = _load_json(pred_json_file, ("annotations",))
    gt_folder = os.fspath(gt_folder) if gt_folder is not None else gt_json_file.replace(".json", "")
    pred_folder = (
        os.fspath(pred_folder) if pred_folder is not None else pred_json_file.replace(".json", "")
    )
    for role, folder in (("ground-truth", gt_folder), ("prediction", pred_folder)):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{role} segmentation folder {folder} does not exist")
    categories = OrderedDict((category["id"], category) for category in gt_json["categories"])
    pairs = _matched_annotations(gt_json, pred_json, pred_json_file)

    stats = PQStats()
    workers = num_workers if num_workers is not None else _default_num_workers()
    stream = _image_stats_stream(pairs, gt_folder, pred_folder, categories, workers)
    for image_stats in tqdm(stream, total=len(pairs), desc="PQ", unit="img", disable=not progress):
        stats.add(image_stats)

    results: Dict[str, Any] = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        results[name], per_class = stats.average(categories, isthing=isthing)
        if name == "All":
            results["per_class"] = per_class
    logger.info(
        "PQ of %d images: All %.1f, Things %.1f, Stuff %.1f",
        len(pairs),
        100 * results["All"]["pq"],
        100 * results["Things"]["pq"],
        100 * results["Stuff"]["pq"],
    )
    return results

