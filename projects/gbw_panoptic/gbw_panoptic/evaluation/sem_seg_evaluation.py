"""Semantic segmentation evaluator: confusion matrix, IoU, recall, precision and pixel accuracy."""
import logging
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator

from ..data.image_io import read_image
from .distributed import gather_on_main
from ..utils.io import atomic_write
from .report import class_subsets, markdown_table, subset_means, subset_notes, write_report

__all__ = ["GBWSemSegEvaluator", "confusion_matrix", "semantic_metrics"]

logger = logging.getLogger(__name__)


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_label: int) -> np.ndarray:
    """Pixel counts (int64, C x C): rows ground-truth class, columns predicted class.

    Args:
        gt: ground-truth class ids (HxW, ``ignore_label`` = not counted).
        pred: predicted class ids (HxW, in [0, C)).
    """
    valid = gt != ignore_label
    pairs = gt[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
    return np.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def semantic_metrics(matrix: np.ndarray) -> Dict[str, np.ndarray]:
    """Per-class IoU, recall and precision (NaN where undefined) from a confusion matrix.

    Returns arrays of length C in [0, 1] plus ``gt_pixels`` and ``pred_pixels`` counts and the
    scalar ``pixel_accuracy``.
    """
    matrix = matrix.astype(np.float64)
    true_positive = np.diag(matrix)
    gt_pixels = matrix.sum(axis=1)
    pred_pixels = matrix.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "iou": true_positive / (gt_pixels + pred_pixels - true_positive),
            "recall": true_positive / gt_pixels,
            "precision": true_positive / pred_pixels,
            "gt_pixels": gt_pixels,
            "pred_pixels": pred_pixels,
            "pixel_accuracy": true_positive.sum() / matrix.sum(),
        }


class GBWSemSegEvaluator(DatasetEvaluator):
    """Semantic segmentation metrics of a dataset in the contract of gbw_panoptic's datasets.

    Accumulates a confusion matrix while the model runs (``process``), sums it over processes
    (``evaluate``) and reports, in percent: mIoU over the dataset's ``evaluation_classes`` and each
    class subset (see :func:`~gbw_panoptic.evaluation.report.class_subsets`), per-class IoU, recall
    and precision, mean recall (``mACC``), frequency-weighted IoU and pixel accuracy. Classes with
    no ground-truth and no predicted pixel (IoU undefined) are left out of the means. Writes
    ``sem_seg.{json,md,csv}`` to ``output_dir``.
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        *,
        distributed: bool = True,
        extra_class_subset: Optional[Sequence[int]] = None,
    ):
        """
        Args:
            dataset_name: a registered dataset with ``sem_seg_file_name`` (trainId PNGs) per image.
            output_dir: where to write the result files (None: write nothing).
            distributed: sum the confusion matrices of all processes.
            extra_class_subset: another list of class ids to average over (e.g. the classes of
                a SYNTHIA source).
        """
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        metadata = MetadataCatalog.get(dataset_name)
        self._class_names: List[str] = list(metadata.stuff_classes)
        self._num_classes = len(self._class_names)
        self._ignore_label = int(metadata.ignore_label)
        self._subsets = class_subsets(metadata, extra_class_subset)
        self._gt_file_of_image: Optional[Dict[str, str]] = None
        self.reset()

    def reset(self) -> None:
        self._matrix = np.zeros((self._num_classes, self._num_classes), dtype=np.int64)

    def _gt_file(self, inputs: Dict[str, Any]) -> str:
        if "sem_seg_file_name" in inputs:
            return inputs["sem_seg_file_name"]
        if self._gt_file_of_image is None:
            self._gt_file_of_image = {
                record["file_name"]: record.get("sem_seg_file_name")
                for record in DatasetCatalog.get(self._dataset_name)
            }
        gt_file = self._gt_file_of_image.get(inputs["file_name"])
        if gt_file is None:
            raise KeyError(
                f"no 'sem_seg_file_name' for image {inputs['file_name']} in dataset "
                f"{self._dataset_name!r}: the semantic evaluator needs trainId label PNGs"
            )
        return gt_file

    def process(self, inputs: List[Dict[str, Any]], outputs: List[Dict[str, Any]]) -> None:
        """Add each image's pixels to the confusion matrix.

        ``outputs[i]["sem_seg"]`` is C x H x W (scores or logits) at the image's original size.
        """
        for record, output in zip(inputs, outputs):
            scores: torch.Tensor = output["sem_seg"]
            if scores.dim() != 3 or scores.shape[0] != self._num_classes:
                raise ValueError(
                    f"sem_seg of {record['file_name']} has shape {tuple(scores.shape)}, expected "
                    f"({self._num_classes}, H, W)"
                )
            pred = scores.argmax(dim=0).to("cpu").numpy()
            gt_file = self._gt_file(record)
            gt = read_image(gt_file).astype(np.int64)
            if gt.shape != pred.shape:
                raise ValueError(
                    f"prediction for {record['file_name']} is {pred.shape[0]}x{pred.shape[1]} but its "
                    f"labels {gt_file} are {gt.shape[0]}x{gt.shape[1]} (HxW)"
                )
            invalid = (gt != self._ignore_label) & ((gt < 0) | (gt >= self._num_classes))
            if invalid.any():
                raise ValueError(
                    f"labels {gt_file} contain class id(s) {np.unique(gt[invalid])[:10].tolist()}; "
                    f"expected train ids 0..{self._num_classes - 1} or {self._ignore_label} (ignore)"
                )
            self._matrix += confusion_matrix(gt, pred, self._num_classes, self._ignore_label)

    def evaluate(self) -> "OrderedDict[str, Dict[str, float]]":
        """``{"sem_seg": {metric: value in percent}}``; empty on processes other than the main one."""
        gathered = gather_on_main(self._matrix, self._distributed)
        if gathered is None:
            return OrderedDict()
        matrix = np.sum(gathered, axis=0)
        if matrix.sum() == 0:
            logger.warning("%s: no labelled pixel was evaluated", self._dataset_name)
        metrics = semantic_metrics(matrix)
        summary: "OrderedDict[str, float]" = OrderedDict()
        summary.update(subset_means("IoU", 100 * metrics["iou"], self._subsets))
        summary.update(subset_means("ACC", 100 * metrics["recall"], self._subsets))
        frequency = metrics["gt_pixels"] / max(metrics["gt_pixels"].sum(), 1)
        summary["fwIoU"] = float(100 * np.nansum(frequency * metrics["iou"]))
        summary["pACC"] = float(100 * metrics["pixel_accuracy"])
        per_class = []
        for class_id, name in enumerate(self._class_names):
            summary[f"IoU-{name}"] = float(100 * metrics["iou"][class_id])
            summary[f"recall-{name}"] = float(100 * metrics["recall"][class_id])
            summary[f"precision-{name}"] = float(100 * metrics["precision"][class_id])
            per_class.append(
                {
                    "class_id": class_id,
                    "name": name,
                    "IoU": float(100 * metrics["iou"][class_id]),
                    "recall": float(100 * metrics["recall"][class_id]),
                    "precision": float(100 * metrics["precision"][class_id]),
                    "gt_pixels": int(metrics["gt_pixels"][class_id]),
                    "pred_pixels": int(metrics["pred_pixels"][class_id]),
                    "evaluated": [size for size, ids in self._subsets.items() if class_id in ids],
                }
            )
        columns = ["class_id", "name", "IoU", "recall", "precision", "gt_pixels", "pred_pixels"]
        logger.info("Semantic segmentation of %s per class:\n%s", self._dataset_name, markdown_table(per_class, columns))
        if self._output_dir:
            write_report(
                self._output_dir,
                "sem_seg",
                f"Semantic segmentation: {self._dataset_name}",
                {key: value for key, value in summary.items() if "-" not in key},
                per_class,
                columns,
                notes=subset_notes("IoU", self._subsets),
            )
            with atomic_write(os.path.join(self._output_dir, "sem_seg_confusion_matrix.npy")) as f:
                np.save(f, matrix)
        return OrderedDict([("sem_seg", summary)])

