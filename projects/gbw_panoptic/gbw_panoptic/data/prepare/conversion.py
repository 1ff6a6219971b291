"""Machinery shared by the ``datasets/prepare_*.py`` converters.

Every converter turns one input image at a time into the same outputs: a train-id label PNG
(``*_labelTrainIds.png``), a COCO-panoptic PNG with its ``segments_info``, and the per-class pixel
counts used by rare class sampling. This module runs such per-image conversions in parallel with a
progress bar, skips images whose inputs and outputs are complete and intact (every image file checked,
:func:`~gbw_panoptic.data.image_io.image_decode_error`; JSON inputs parsed), collects failures instead of
stopping, and writes the dataset-level files atomically:

- the COCO panoptic JSON (``images``, ``annotations``, ``categories``, ``info``); ``category_id`` are
  Cityscapes label ids, as written by cityscapesScripts' ``createPanopticImgs``;
- the class statistics JSON (``class_stats_file`` in the dataset metadata)::

      {"classes": [19 names], "images": {image_id: [19 pixel counts, indexed by train id]}}

- a class frequency summary JSON (pixel fraction and image fraction of each class), also printed.

While it runs, each finished image's record is appended to a progress file next to the panoptic JSON
(``.<panoptic json name>.progress``); a run that is interrupted (killed, Ctrl-C) and started again keeps
those images (when their files are still valid) instead of converting them again. The progress file is
removed once the dataset-level files are written.

Panoptic PNGs of every dataset are produced by cityscapesScripts' own ``convert2panoptic`` from a
Cityscapes-style instance-id image (``labelId`` for stuff and crowd pixels, ``labelId * 1000 + k`` for
instance ``k``), so SYNTHIA, GTA5 and Cityscapes follow identical conventions.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image
from tabulate import tabulate
from tqdm import tqdm

from ...utils.io import atomic_path, atomic_write, write_json
from ...utils.parallel import parallel_map
from ..datasets.builtin_meta import CLASS_NAMES, LABEL_DIVISOR, NUM_CLASSES, label_id_to_train_id_lut
from ..datasets.layout import datasets_root
from ..image_io import image_decode_error

__all__ = [
    "ImageRecord",
    "ConversionJob",
    "ConversionReport",
    "ImageLabelSizeMismatch",
    "data_file_error",
    "save_png",
    "read_png_size",
    "train_id_pixel_counts",
    "instance_ids_from_labels",
    "panoptic_from_instance_ids",
    "write_label_outputs",
    "image_record",
    "flat_layout_jobs",
    "run_conversion",
    "panoptic_categories",
    "default_workers",
    "class_frequencies",
    "format_class_frequencies",
    "print_report",
    "conversion_parser",
    "exit_code_on_missing_input",
]


@dataclass
class ImageRecord:
    """What one converted image contributes to the dataset-level files.

    Attributes:
        image: COCO ``images`` entry ``{"id", "file_name", "height", "width"}``.
        annotation: COCO panoptic ``annotations`` entry ``{"image_id", "file_name", "segments_info"}``.
        pixel_counts: labelled pixels of each train id (length 19).
    """

    image: Dict[str, Any]
    annotation: Dict[str, Any]
    pixel_counts: List[int]


@dataclass
class ConversionJob:
    """One image to convert.

    Attributes:
        image_id: unique id of the image inside its dataset.
        inputs: input files (reported when the conversion fails).
        outputs: files the conversion writes; all must be valid PNGs for the job to be skipped.
        options: dataset-specific parameters passed through to the conversion function.
    """

    image_id: str
    inputs: List[str]
    outputs: List[str]
    options: Dict[str, Any] = field(default_factory=dict)


class ImageLabelSizeMismatch(ValueError):
    """An image and its label image differ in size (:func:`write_label_outputs`); a known defect of some
    releases (``run_conversion(..., known_size_mismatch=...)`` excludes such images instead of failing)."""


@dataclass
class ConversionReport:
    """Outcome of :func:`run_conversion`.

    ``excluded`` holds the images left out for a known defect of the release (``excluded_reason``); they
    do not count as failures, so they do not change the exit code."""

    records: List[ImageRecord]
    converted: int
    skipped: int
    failures: List[Tuple[str, str]]  # (input files, error message)
    frequencies: Dict[str, Any]  # what :func:`class_frequencies` returns for ``records``
    excluded: List[Tuple[str, str]] = field(default_factory=list)  # (input files, error message)
    excluded_reason: str = ""

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0

    def summary(self, name: str) -> str:
        excluded = f"{len(self.excluded)} excluded ({self.excluded_reason}), " if self.excluded else ""
        lines = [
            f"{name}: {self.converted} converted, {self.skipped} already valid (skipped), {excluded}"
            f"{len(self.failures)} failed."
        ]
        lines += [f"  EXCLUDED {inputs}: {message}" for inputs, message in self.excluded]
        lines += [f"  FAILED {inputs}: {message}" for inputs, message in self.failures]
        return "\n".join(lines)


def default_workers() -> int:
    """Number of worker processes used when ``--workers`` is not given."""
    return max(1, min(8, os.cpu_count() or 1))


def save_png(path: str, array: np.ndarray) -> None:
    """Atomically write ``array`` (HxW uint8/uint16 or HxWx3 uint8) as a PNG (fast compression)."""
    with atomic_write(path) as f:
        Image.fromarray(array).save(f, format="PNG", compress_level=1)


def read_png_size(path: str) -> Optional[Tuple[int, int]]:
    """``(height, width)`` of a valid PNG file (chunk checksums verified), or None if missing/corrupt."""
    try:
        with Image.open(path) as image:
            image.verify()
            width, height = image.size
        return height, width
    except (OSError, SyntaxError, ValueError):
        return None


def train_id_pixel_counts(train_ids: np.ndarray) -> List[int]:
    """Pixels of each of the 19 train ids in a train-id label map (255 and other values ignored)."""
    counts = np.bincount(train_ids.ravel(), minlength=256)[:NUM_CLASSES]
    return [int(c) for c in counts]


def instance_ids_from_labels(
    label_ids: np.ndarray, instance_map: np.ndarray, thing_label_ids: Sequence[int]
) -> np.ndarray:
    """Cityscapes-style instance-id image from a label-id map and an instance map.

    Args:
        label_ids: HxW Cityscapes label ids.
        instance_map: HxW integer instance ids (0 = no instance); ids need only be unique within
            a class. Ignored on stuff pixels.
        thing_label_ids: label ids of the thing classes.

    Returns:
        HxW int32: ``labelId * 1000 + k`` (k = 0, 1, ... in order of the instance ids of that class)
        on thing pixels with an instance, ``labelId`` everywhere else (crowd for thing classes).
    """
    if label_ids.shape != instance_map.shape:
        raise ValueError(
            f"label map {label_ids.shape} and instance map {instance_map.shape} differ in shape"
        )
    label_ids = label_ids.astype(np.int64)
    result = label_ids.copy()
    is_instance = np.isin(label_ids, list(thing_label_ids)) & (instance_map > 0)
    keys = label_ids[is_instance] * (1 << 32) + instance_map[is_instance].astype(np.int64)
    unique_keys, inverse = np.unique(keys, return_inverse=True)
    unique_labels = unique_keys >> 32
    # Rank of each instance among the instances of its class (unique_keys are sorted by class first).
    first_of_class = np.searchsorted(unique_labels, unique_labels, side="left")
    ranks = np.arange(len(unique_keys)) - first_of_class
    if len(ranks) and ranks.max() >= LABEL_DIVISOR:
        raise ValueError(f"more than {LABEL_DIVISOR} instances of one class in an image")
    result[is_instance] = (unique_labels * LABEL_DIVISOR + ranks)[inverse]
    return result.astype(np.int32)


def panoptic_from_instance_ids(
    instance_ids: Union[np.ndarray, str], panoptic_path: str
) -> List[Dict[str, Any]]:
    """Run cityscapesScripts' ``convert2panoptic`` on one Cityscapes-style instance-id image.

    The converter's COCO-panoptic PNG (id = R + 256 G + 256^2 B) is moved atomically to
    ``panoptic_path``.

    Args:
        instance_ids: an ``*_gtFine_instanceIds.png`` file, or the HxW integer array of such a file
            (``labelId`` for stuff and crowd pixels, ``labelId * 1000 + k`` for instance k).
        panoptic_path: where the panoptic PNG goes.

    Returns:
        The ``segments_info`` of the image (``category_id`` = Cityscapes label id; void classes
        left out).
    """
    from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic

    output_dir = os.path.dirname(os.path.abspath(panoptic_path))
    os.makedirs(output_dir, exist_ok=True)
    # Inside the output folder, so that the final move is an atomic rename.
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=output_dir) as tmp:
        city_dir = os.path.join(tmp, "gtFine", "image", "image")
        os.makedirs(city_dir)
        instance_file = os.path.join(city_dir, "image_gtFine_instanceIds.png")
        if isinstance(instance_ids, str):
            os.symlink(os.path.abspath(instance_ids), instance_file)
        else:
            if instance_ids.min() < 0 or instance_ids.max() >= 1 << 16:
                raise ValueError(
                    f"instance ids must lie in [0, 65535], got {instance_ids.min()}..{instance_ids.max()}"
                )
            Image.fromarray(instance_ids.astype(np.uint16)).save(instance_file, compress_level=0)
        with contextlib.redirect_stdout(io.StringIO()):
            convert2panoptic(os.path.join(tmp, "gtFine"), tmp, useTrainId=False, setNames=["image"])
        with open(os.path.join(tmp, "cityscapes_panoptic_image.json")) as f:
            (annotation,) = json.load(f)["annotations"]
        with atomic_path(panoptic_path) as tmp_path:
            os.replace(os.path.join(tmp, "cityscapes_panoptic_image", annotation["file_name"]), tmp_path)
    return annotation["segments_info"]


def write_label_outputs(job: ConversionJob, label_ids: np.ndarray, instance_ids: np.ndarray) -> ImageRecord:
    """Write the train-id PNG and the panoptic PNG of a source image given its label maps.

    Args:
        job: ``inputs[0]`` is the RGB image, ``outputs`` = (train-id PNG, panoptic PNG).
        label_ids: HxW Cityscapes label ids.
        instance_ids: HxW Cityscapes-style instance ids (see :func:`instance_ids_from_labels`).
    """
    image_path = job.inputs[0]
    train_id_path, panoptic_path = job.outputs
    image_size = read_png_size(image_path)
    if image_size is None:
        raise ValueError(f"{image_path}: image missing or corrupt")
    if label_ids.shape != image_size:
        raise ImageLabelSizeMismatch(
            f"{job.inputs[1]}: label size {label_ids.shape} differs from image size {image_size}"
        )
    train_ids = label_id_to_train_id_lut()[label_ids]
    segments_info = panoptic_from_instance_ids(instance_ids, panoptic_path)
    save_png(train_id_path, train_ids)
    return image_record(job, train_ids, segments_info)


def image_record(
    job: ConversionJob, train_ids: np.ndarray, segments_info: List[Dict[str, Any]]
) -> ImageRecord:
    """The record of a converted image (``job.inputs[0]`` is the RGB image, ``job.outputs[1]`` the
    panoptic PNG)."""
    height, width = train_ids.shape
    return ImageRecord(
        image={
            "id": job.image_id,
            "file_name": os.path.basename(job.inputs[0]),
            "height": height,
            "width": width,
        },
        annotation={
            "image_id": job.image_id,
            "file_name": os.path.basename(job.outputs[1]),
            "segments_info": segments_info,
        },
        pixel_counts=train_id_pixel_counts(train_ids),
    )


def flat_layout_jobs(
    paths: Dict[str, str], dataset: str, options: Optional[Dict[str, Any]] = None
) -> List[ConversionJob]:
    """Jobs of a dataset with one image folder and one label folder (SYNTHIA, GTA5 layouts).

    Every ``image_dir/<id>.png`` pairs with ``label_dir/<id>.png``; the outputs are
    ``label_dir/<id>_labelTrainIds.png`` and ``panoptic_dir/<id>_panoptic.png``.
    """
    image_files = sorted(glob.glob(os.path.join(paths["image_dir"], "*.png")))
    if not image_files:
        raise FileNotFoundError(f"no {dataset} images found: expected {paths['image_dir']}/<id>.png")
    jobs = []
    for image_file in image_files:
        image_id = os.path.splitext(os.path.basename(image_file))[0]
        jobs.append(
            ConversionJob(
                image_id=image_id,
                inputs=[image_file, os.path.join(paths["label_dir"], f"{image_id}.png")],
                outputs=[
                    os.path.join(paths["label_dir"], f"{image_id}_labelTrainIds.png"),
                    os.path.join(paths["panoptic_dir"], f"{image_id}_panoptic.png"),
                ],
                options=dict(options or {}),
            )
        )
    return jobs


def panoptic_categories() -> List[Dict[str, Any]]:
    """COCO ``categories`` of the panoptic JSONs: the Cityscapes classes evaluated, by label id."""
    from cityscapesscripts.helpers.labels import labels

    return [
        {
            "id": label.id,
            "name": label.name,
            "color": list(label.color),
            "supercategory": label.category,
            "isthing": int(label.hasInstances),
        }
        for label in labels
        if not label.ignoreInEval
    ]


def _load_previous_records(
    panoptic_json: str, class_stats_json: str, info: Dict[str, Any]
) -> Dict[str, ImageRecord]:
    """Records of an earlier run with the same ``info`` (empty if missing, unreadable or different)."""
    try:
        with open(panoptic_json) as f:
            panoptic = json.load(f)
        if panoptic.get("info") != info:
            return {}
        with open(class_stats_json) as f:
            stats = json.load(f)["images"]
        images = {image["id"]: image for image in panoptic["images"]}
        return {
            annotation["image_id"]: ImageRecord(
                images[annotation["image_id"]], annotation, stats[annotation["image_id"]]
            )
            for annotation in panoptic["annotations"]
        }
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _progress_file(panoptic_json: str) -> str:
    folder, name = os.path.split(panoptic_json)
    return os.path.join(folder, f".{name}.progress")


def _load_progress(path: str, info: Dict[str, Any]) -> Dict[str, ImageRecord]:
    """Records of an interrupted run with the same ``info`` from its progress file (a torn last line of a
    killed run is skipped)."""
    records: Dict[str, ImageRecord] = {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return records
    if not lines or lines[0] != json.dumps({"info": info}, sort_keys=True):
        return records
    for line in lines[1:]:
        try:
            entry = json.loads(line)
            records[entry["image"]["id"]] = ImageRecord(entry["image"], entry["annotation"], entry["pixel_counts"])
        except (ValueError, KeyError, TypeError):
            continue
    return records


class _ProgressLog:
    """Appends each finished record to the progress file (one JSON line each, flushed at once)."""

    def __init__(self, path: str, info: Dict[str, Any], records: Sequence[ImageRecord]):
        """Start the file (atomically) with ``info`` and the ``records`` already valid, then append."""
        lines = [json.dumps({"info": info}, sort_keys=True)] + [self._line(record) for record in records]
        with atomic_write(path, "w") as f:
            f.write("".join(line + "\n" for line in lines))
        self._file = open(path, "a")

    @staticmethod
    def _line(record: ImageRecord) -> str:
        return json.dumps({"image": record.image, "annotation": record.annotation, "pixel_counts": record.pixel_counts})

    def add(self, record: ImageRecord) -> None:
        self._file.write(self._line(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def data_file_error(path: str) -> Optional[str]:
    """None when a dataset file is usable: an image that is complete and intact, a JSON that parses;
    else why not (naming the file)."""
    if path.endswith(".json"):
        try:
            with open(path) as f:
                json.load(f)
        except (OSError, ValueError) as e:
            return f"{path}: unreadable JSON ({e})"
        return None
    return image_decode_error(path)


def _is_done(job: ConversionJob, previous: Dict[str, ImageRecord]) -> bool:
    """The job has a record, its outputs are intact PNGs of the record's size and its inputs are intact."""
    record = previous.get(job.image_id)
    if record is None:
        return False
    expected = (record.image["height"], record.image["width"])
    return all(read_png_size(path) == expected for path in job.outputs) and not any(map(data_file_error, job.inputs))


_CONVERT_FN: Optional[Callable[[ConversionJob], ImageRecord]] = None


def _init_worker(convert: Callable[[ConversionJob], ImageRecord]) -> None:
    global _CONVERT_FN
    _CONVERT_FN = convert


def _convert_one(job: ConversionJob) -> Tuple[ConversionJob, Optional[ImageRecord], str, bool]:
    """(job, its record or None, the error message, whether the error is an image/label size mismatch)."""
    assert _CONVERT_FN is not None
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            return job, _CONVERT_FN(job), "", False
    except SystemExit:
        # cityscapesScripts prints "ERROR: <reason>" (e.g. an unknown label) and calls sys.exit.
        errors = [line for line in printed.getvalue().splitlines() if line.startswith("ERROR")]
        return job, None, "; ".join(errors) or "the cityscapesScripts converter exited", False
    except Exception as e:
        return job, None, f"{type(e).__name__}: {e}", isinstance(e, ImageLabelSizeMismatch)


def run_conversion(
    jobs: Sequence[ConversionJob],
    convert: Callable[[ConversionJob], ImageRecord],
    *,
    paths: Dict[str, str],
    info: Dict[str, Any],
    workers: int = 1,
    description: str = "converting",
    known_size_mismatch: str = "",
) -> ConversionReport:
    """Convert ``jobs`` with ``convert`` and write the dataset-level files.

    Images whose outputs are valid and which appear in the existing panoptic JSON and class
    statistics (written with the same ``info``) are skipped; failed images are reported and left
    out of the JSONs (a re-run retries them). ``convert`` must be a module-level function (it runs in worker processes).

    Args:
        jobs: the images to convert.
        convert: per-image conversion; raises on bad input with a message naming the file.
        paths: the dataset-level outputs ``panoptic_json``, ``class_stats`` and ``frequencies``.
        info: the ``info`` entry of the panoptic JSON (e.g. ``{"has_instances": True}``).
        workers: worker processes (1 = run in this process).
        description: progress bar label.
        known_size_mismatch: why images whose label differs in size from the image are expected in this
            dataset (a known defect of its release): they are excluded and reported, not failures. Empty:
            such an image is a failure.
    """
    panoptic_json, class_stats_json = paths["panoptic_json"], paths["class_stats"]
    previous = _load_previous_records(panoptic_json, class_stats_json, info)
    progress_file = _progress_file(panoptic_json)
    previous.update(_load_progress(progress_file, info))
    records: Dict[str, ImageRecord] = {}
    todo: List[ConversionJob] = []
    for job in jobs:
        if _is_done(job, previous):
            records[job.image_id] = previous[job.image_id]
        else:
            todo.append(job)
    skipped = len(records)
    failures: List[Tuple[str, str]] = []
    excluded: List[Tuple[str, str]] = []
    progress = _ProgressLog(progress_file, info, list(records.values()))

    def collect(results) -> None:
        for job, record, error, size_mismatch in tqdm(results, total=len(todo), desc=description, disable=not todo):
            if record is None:
                (excluded if size_mismatch and known_size_mismatch else failures).append((", ".join(job.inputs), error))
            else:
                records[job.image_id] = record
                progress.add(record)

    if workers <= 1 or len(todo) <= 1:
        _init_worker(convert)
        collect(map(_convert_one, todo))
    else:
        collect(
            parallel_map(
                _convert_one,
                todo,
                workers,
                ordered=False,
                chunksize=4,
                preload=[__name__],
                initializer=_init_worker,
                initargs=(convert,),
            )
        )

    ordered = [records[image_id] for image_id in sorted(records)]
    write_json(
        panoptic_json,
        {
            "info": info,
            "images": [record.image for record in ordered],
            "annotations": [record.annotation for record in ordered],
            "categories": panoptic_categories(),
        },
        indent=None,
    )
    write_json(
        class_stats_json,
        {"classes": CLASS_NAMES, "images": {r.image["id"]: r.pixel_counts for r in ordered}},
        indent=None,
    )
    frequencies = class_frequencies(ordered)
    write_json(paths["frequencies"], frequencies, indent=None)
    progress.close()
    os.remove(progress_file)
    converted = len(todo) - len(failures) - len(excluded)
    return ConversionReport(
        ordered, converted, skipped, sorted(failures), frequencies, sorted(excluded), known_size_mismatch
    )


def class_frequencies(records: Sequence[ImageRecord]) -> Dict[str, Any]:
    """Per-class pixel fraction and fraction of images containing the class."""
    counts = np.array([record.pixel_counts for record in records], dtype=np.int64).reshape(
        -1, NUM_CLASSES
    )
    total = max(int(counts.sum()), 1)
    return {
        "num_images": len(records),
        "classes": CLASS_NAMES,
        "pixel_counts": [int(c) for c in counts.sum(axis=0)],
        "pixel_fraction": [float(c) / total for c in counts.sum(axis=0)],
        "image_fraction": [float(f) for f in (counts > 0).sum(axis=0) / max(len(records), 1)],
    }


def format_class_frequencies(frequencies: Dict[str, Any]) -> str:
    """The class frequency summary as a table (percent of labelled pixels / of images)."""
    rows = [
        (name, f"{100 * pixels:.2f}", f"{100 * images:.1f}")
        for name, pixels, images in zip(
            frequencies["classes"], frequencies["pixel_fraction"], frequencies["image_fraction"]
        )
    ]
    return tabulate(rows, headers=["class", "% pixels", "% images"], tablefmt="github")


def print_report(report: ConversionReport, name: str) -> int:
    """Print the class frequency table and the conversion summary; return the exit code."""
    print(f"{name}: class frequencies of {report.frequencies['num_images']} images")
    print(format_class_frequencies(report.frequencies))
    print(report.summary(name))
    return report.exit_code


def conversion_parser(description: str, dataset_dir: str) -> argparse.ArgumentParser:
    """Command-line parser shared by the converters: ``ROOT`` and ``--workers``.

    Args:
        description: help text explaining the expected input layout and the outputs.
        dataset_dir: folder name under the datasets root used when ``ROOT`` is omitted.
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "root",
        nargs="?",
        default=os.path.join(datasets_root(), dataset_dir),
        help=f"dataset folder (default: $DETECTRON2_DATASETS/{dataset_dir}, or ./datasets/{dataset_dir})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="worker processes converting images in parallel (default: %(default)s)",
    )
    return parser


def exit_code_on_missing_input(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a converter's ``main``: a missing input folder prints the error and returns 2."""

    @functools.wraps(main)
    def wrapper(argv: Optional[Sequence[str]] = None) -> int:
        try:
            return main(argv)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapper
