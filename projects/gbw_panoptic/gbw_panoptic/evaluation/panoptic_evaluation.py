"""Panoptic segmentation evaluator: COCO panoptic predictions, PQ/SQ/RQ and class-subset means."""
import json
import logging
import os
import tempfile
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator

from ..utils.io import atomic_write, write_json
from .distributed import gather_on_main
from .panoptic_io import id_to_rgb
from .pq import pq_compute
from .report import class_subsets, markdown_table, subset_means, subset_notes, write_report

__all__ = ["GBWPanopticEvaluator"]

logger = logging.getLogger(__name__)


class GBWPanopticEvaluator(DatasetEvaluator):
    """Panoptic quality of a dataset in the contract of gbw_panoptic's datasets.

    ``process`` turns each output's ``panoptic_seg`` into a COCO panoptic PNG (kept encoded in
    memory) with dataset category ids; ``evaluate`` gathers them on the main process, writes
    ``panoptic_predictions/*.png`` and ``panoptic_predictions.json`` to ``output_dir``, runs
    :func:`~gbw_panoptic.evaluation.pq.pq_compute` against the dataset's ``panoptic_json`` /
    ``panoptic_root`` (restricted to the evaluated images) and reports, in percent, PQ/SQ/RQ for
    all classes, things and stuff, per class, and mPQ/mSQ/mRQ over each class subset (see
    :func:`~gbw_panoptic.evaluation.report.class_subsets`); classes that never appear (no TP, FP
    or FN) are left out of the means. Writes ``panoptic_seg.{json,md,csv}``.
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        *,
        distributed: bool = True,
        extra_class_subset: Optional[Sequence[int]] = None,
        num_workers: Optional[int] = None,
    ):
        """
        Args:
            dataset_name: a registered panoptic dataset (metadata ``panoptic_json``,
                ``panoptic_root``, ``label_divisor``, ``thing_dataset_id_to_contiguous_id``,
                ``stuff_dataset_id_to_contiguous_id``, ``stuff_classes``, ``evaluation_classes``).
            output_dir: where to write predictions and results (None: a temporary folder).
            distributed: gather the predictions of all processes.
            extra_class_subset: another list of contiguous class ids to average over.
            num_workers: threads of ``pq_compute`` (default: one per CPU).
        """
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        self._num_workers = num_workers
        self._metadata = MetadataCatalog.get(dataset_name)
        for key in ("panoptic_json", "panoptic_root", "label_divisor", "stuff_classes"):
            if not hasattr(self._metadata, key):
                raise KeyError(f"metadata of dataset {dataset_name!r} has no {key!r}, needed for PQ")
        self._class_names: List[str] = list(self._metadata.stuff_classes)
        thing_map = self._metadata.thing_dataset_id_to_contiguous_id
        stuff_map = self._metadata.stuff_dataset_id_to_contiguous_id
        self._thing_dataset_id = {contiguous: dataset for dataset, contiguous in thing_map.items()}
        self._stuff_dataset_id = {contiguous: dataset for dataset, contiguous in stuff_map.items()}
        self._subsets = class_subsets(self._metadata, extra_class_subset)
        self.reset()

    def reset(self) -> None:
        self._predictions: List[Dict[str, Any]] = []

    def _dataset_category(self, contiguous_id: int, isthing: Optional[bool], file_name: str) -> int:
        if isthing is None:
            isthing = contiguous_id in self._thing_dataset_id
        table = self._thing_dataset_id if isthing else self._stuff_dataset_id
        if contiguous_id not in table:
            kind = "thing" if isthing else "stuff"
            raise KeyError(
                f"panoptic_seg of {file_name}: {kind} segment with class {contiguous_id}, which is not "
                f"a {kind} class of dataset {self._dataset_name!r} (valid: {sorted(table)})"
            )
        return table[contiguous_id]

    def _coco_prediction(self, record: Dict[str, Any], output: Dict[str, Any]) -> Dict[str, Any]:
        """One image's prediction as an encoded COCO panoptic PNG and its segments_info."""
        panoptic, segments_info = output["panoptic_seg"]
        if isinstance(panoptic, torch.Tensor):
            panoptic = panoptic.to("cpu").numpy()
        panoptic = np.asarray(panoptic, dtype=np.int64)
        file_name = record["file_name"]
        if segments_info is None:
            # Panoptic-DeepLab form: id = class * label_divisor + instance, VOID = -1.
            label_divisor = self._metadata.label_divisor
            segments_info = [
                {"id": int(segment_id), "category_id": int(segment_id) // label_divisor}
                for segment_id in np.unique(panoptic)
                if segment_id >= 0
            ]
        if len(segments_info) == 0:
            compact = np.zeros(panoptic.shape, dtype=np.int64)
        else:
            low = min(int(panoptic.min()), min(s["id"] for s in segments_info))
            high = max(int(panoptic.max()), max(s["id"] for s in segments_info))
            if high - low >= 1 << 26:
                raise ValueError(f"panoptic_seg of {file_name}: segment ids span [{low}, {high}], too wide")
            # Compact COCO ids 1..K (0 = VOID: every pixel whose id is not listed).
            lookup = np.zeros(high - low + 1, dtype=np.int64)
            for index, segment in enumerate(segments_info):
                lookup[segment["id"] - low] = index + 1
            compact = lookup[panoptic - low]
        areas = np.bincount(compact.ravel(), minlength=len(segments_info) + 1)
        coco_segments = []
        for index, segment in enumerate(segments_info):
            if areas[index + 1] == 0:
                continue
            category = self._dataset_category(int(segment["category_id"]), segment.get("isthing"), file_name)
            coco_segments.append(
                {"id": index + 1, "category_id": int(category), "area": int(areas[index + 1]), "iscrowd": 0}
            )
        ok, png = cv2.imencode(".png", np.ascontiguousarray(id_to_rgb(compact)[..., ::-1]))
        if not ok:
            raise RuntimeError(f"cannot encode the panoptic PNG of {file_name}")
        png_name = os.path.splitext(os.path.basename(file_name))[0] + ".png"
        return {"image_id": record["image_id"], "file_name": png_name, "segments_info": coco_segments, "png": png.tobytes()}

    def process(self, inputs: List[Dict[str, Any]], outputs: List[Dict[str, Any]]) -> None:
        """Keep each output's ``panoptic_seg`` ``(HxW ids, segments_info or None)``.

        ``segments_info`` entries have ``id``, ``category_id`` (contiguous class id) and optionally
        ``isthing``; pixels with unlisted ids are VOID. With ``segments_info`` None, ids are
        ``class * label_divisor + instance`` and -1 is VOID (Panoptic-DeepLab).
        """
        for record, output in zip(inputs, outputs):
            self._predictions.append(self._coco_prediction(record, output))

    def _ground_truth_subset(self, image_ids: List[Any], path: str) -> None:
        """Write the dataset's panoptic JSON restricted to ``image_ids`` to ``path``."""
        with open(self._metadata.panoptic_json) as f:
            gt_json = json.load(f)
        annotations = {annotation["image_id"]: annotation for annotation in gt_json["annotations"]}
        missing = [image_id for image_id in image_ids if image_id not in annotations]
        if missing:
            raise KeyError(
                f"image_id(s) {missing[:5]} of the evaluated inputs are not in {self._metadata.panoptic_json} "
                f"(dataset {self._dataset_name!r})"
            )
        wanted = set(image_ids)
        gt_json["annotations"] = [annotations[image_id] for image_id in image_ids]
        if "images" in gt_json:
            gt_json["images"] = [image for image in gt_json["images"] if image["id"] in wanted]
        write_json(path, gt_json)

    def evaluate(self) -> "OrderedDict[str, Dict[str, float]]":
        """``{"panoptic_seg": {metric: value in percent}}``; empty on processes other than the main one."""
        gathered = gather_on_main(self._predictions, self._distributed)
        if gathered is None:
            return OrderedDict()
        predictions = [prediction for part in gathered for prediction in part]
        if not predictions:
            logger.warning("%s: no prediction to evaluate", self._dataset_name)
            return OrderedDict()
        predictions = sorted(predictions, key=lambda prediction: str(prediction["image_id"]))
        if self._output_dir:
            return self._evaluate_in(self._output_dir, predictions)
        with tempfile.TemporaryDirectory(prefix="panoptic_eval_") as output_dir:
            return self._evaluate_in(output_dir, predictions)

    def _evaluate_in(self, output_dir: str, predictions: List[Dict[str, Any]]) -> "OrderedDict[str, Dict[str, float]]":
        pred_folder = os.path.join(output_dir, "panoptic_predictions")
        os.makedirs(pred_folder, exist_ok=True)
        for prediction in predictions:
            with atomic_write(os.path.join(pred_folder, prediction["file_name"])) as f:
                f.write(prediction["png"])
        pred_json_file = os.path.join(output_dir, "panoptic_predictions.json")
        annotations = [{key: p[key] for key in ("image_id", "file_name", "segments_info")} for p in predictions]
        write_json(pred_json_file, {"annotations": annotations})
        gt_json_file = os.path.join(output_dir, "panoptic_ground_truth.json")
        self._ground_truth_subset([p["image_id"] for p in predictions], gt_json_file)
        results = pq_compute(
            gt_json_file,
            pred_json_file,
            gt_folder=self._metadata.panoptic_root,
            pred_folder=pred_folder,
            num_workers=self._num_workers,
        )
        summary, per_class = self._summarise(results)
        columns = ["class_id", "name", "isthing", "PQ", "SQ", "RQ", "TP", "FP", "FN"]
        logger.info("Panoptic segmentation of %s per class:\n%s", self._dataset_name, markdown_table(per_class, columns))
        write_report(
            output_dir,
            "panoptic_seg",
            f"Panoptic segmentation: {self._dataset_name}",
            {key: value for key, value in summary.items() if "-" not in key},
            per_class,
            columns,
            notes=subset_notes("PQ", self._subsets)
            + ["PQ/SQ/RQ (All, _th, _st): panopticapi's averages over the categories of the ground-truth JSON"],
        )
        return OrderedDict([("panoptic_seg", summary)])

    def _summarise(self, results: Dict[str, Any]) -> Tuple["OrderedDict[str, float]", List[Dict[str, Any]]]:
        summary: "OrderedDict[str, float]" = OrderedDict()
        for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            for metric in ("pq", "sq", "rq"):
                summary[metric.upper() + suffix] = 100 * results[group][metric]
        num_classes = len(self._class_names)
        values = {metric: np.full(num_classes, np.nan) for metric in ("PQ", "SQ", "RQ")}
        per_class = []
        for class_id, name in enumerate(self._class_names):
            dataset_id = self._thing_dataset_id.get(class_id, self._stuff_dataset_id.get(class_id))
            result = results["per_class"].get(dataset_id)
            row: Dict[str, Any] = {"class_id": class_id, "name": name, "isthing": class_id in self._thing_dataset_id}
            if result is not None and result["tp"] + result["fp"] + result["fn"] > 0:
                for metric in ("PQ", "SQ", "RQ"):
                    values[metric][class_id] = 100 * result[metric.lower()]
            for metric in ("PQ", "SQ", "RQ"):
                row[metric] = float(values[metric][class_id])
            for count in ("TP", "FP", "FN"):
                row[count] = int(result[count.lower()]) if result is not None else 0
            per_class.append(row)
        for metric in ("PQ", "SQ", "RQ"):
            summary.update(subset_means(metric, values[metric], self._subsets))
        for row in per_class:
            summary[f"PQ-{row['name']}"] = row["PQ"]
        return summary, per_class
