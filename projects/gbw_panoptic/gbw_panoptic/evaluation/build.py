"""Evaluators of a dataset from the config (what ``Trainer.build_evaluator`` returns)."""
from typing import List, Optional

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators

from .panoptic_evaluation import GBWPanopticEvaluator
from .sem_seg_evaluation import GBWSemSegEvaluator

__all__ = ["build_evaluators"]


def _source_classes(cfg: CfgNode) -> Optional[List[int]]:
    """The evaluated classes of the (first) training source, e.g. SYNTHIA's 16, if registered."""
    for name in cfg.DATASETS.TRAIN:
        metadata = MetadataCatalog.get(name)
        if hasattr(metadata, "evaluation_classes"):
            return list(metadata.evaluation_classes)
    return None


def build_evaluators(cfg: CfgNode, dataset_name: str, output_dir: Optional[str] = None) -> DatasetEvaluators:
    """Semantic evaluator, plus the panoptic one when the model predicts instances (the center/offset
    head, ``MODEL.INS_EMBED_HEAD.ENABLED``, or the top-down model's Mask R-CNN, ``MODEL.MASK_ON``).

    Besides the dataset's own ``evaluation_classes``, both average over the classes of the
    training source when they differ (mIoU16 / mPQ16 for SYNTHIA -> Cityscapes).
    """
    metadata = MetadataCatalog.get(dataset_name)
    evaluator_type = getattr(metadata, "evaluator_type", None)
    if evaluator_type != "gbw_panoptic":
        raise NotImplementedError(
            f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; build_evaluators "
            f"handles datasets registered by gbw_panoptic.data (evaluator_type 'gbw_panoptic')"
        )
    extra = _source_classes(cfg)
    evaluators: List[DatasetEvaluator] = [
        GBWSemSegEvaluator(dataset_name, output_dir, extra_class_subset=extra)
    ]
    if cfg.MODEL.INS_EMBED_HEAD.ENABLED or cfg.MODEL.MASK_ON:
        evaluators.append(GBWPanopticEvaluator(dataset_name, output_dir, extra_class_subset=extra))
    return DatasetEvaluators(evaluators)
