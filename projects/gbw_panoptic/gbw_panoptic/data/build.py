"""Data loaders of UDA training and evaluation, built on Detectron2's loader machinery.

- :func:`build_source_train_loader`: labelled source images (``DATASETS.TRAIN``), drawn by rare
  class sampling when ``DATALOADER.RCS.ENABLED``, else by Detectron2's ``TrainingSampler``;
  ``SOLVER.IMS_PER_BATCH`` images per step in total over all processes.
- :func:`build_target_train_loader`: unlabelled target images (``DATASETS.TARGET_TRAIN``),
  ``DATASETS.TARGET_IMS_PER_BATCH`` per step in total.
- :func:`build_uda_train_loader`: both, zipped into an infinite stream of
  ``(source_batch, target_batch)`` pairs (lists of mapped dicts, this process's share).
- :func:`build_test_loader`: one evaluation image at a time, for a labelled target dataset.
"""
import logging
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data.sampler import Sampler

from detectron2.config import CfgNode
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.samplers import TrainingSampler

from .mapper import GBWPanopticDatasetMapper
from .rcs import RareClassSampler, load_class_pixel_counts

__all__ = [
    "UDATrainLoader",
    "build_rcs_sampler",
    "build_source_train_loader",
    "build_target_train_loader",
    "build_uda_train_loader",
    "build_test_loader",
]

logger = logging.getLogger(__name__)


def _dataset_dicts(names: Sequence[str], config_key: str) -> List[Dict[str, Any]]:
    if not names:
        raise ValueError(f"{config_key} is empty; name at least one registered dataset")
    return get_detection_dataset_dicts(list(names), filter_empty=False)


def build_rcs_sampler(cfg: CfgNode, dataset_names: Sequence[str], seed: Optional[int] = None) -> RareClassSampler:
    """Rare class sampler over the concatenation of ``dataset_names`` (in order).

    Each dataset's metadata must name its ``class_stats_file``. ``seed`` None: a random seed shared
    by all processes (reproducible once Detectron2's ``default_setup`` has seeded NumPy with
    ``cfg.SEED``), as Detectron2's ``TrainingSampler``.
    """
    counts = []
    for name in dataset_names:
        meta = MetadataCatalog.get(name)
        stats_file = meta.get("class_stats_file")
        if not stats_file:
            raise KeyError(
                f"Rare class sampling needs the metadata 'class_stats_file' of dataset '{name}' "
                "(written by its datasets/prepare_*.py script); set DATALOADER.RCS.ENABLED False "
                "to sample uniformly"
            )
        dicts = get_detection_dataset_dicts(name, filter_empty=False)
        counts.append(load_class_pixel_counts(stats_file, dicts, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES))
    return RareClassSampler(
        np.concatenate(counts), cfg.DATALOADER.RCS.TEMPERATURE, cfg.DATALOADER.RCS.MIN_PIXELS, seed
    )


def _train_loader(
    cfg: CfgNode, dicts: List[Dict[str, Any]], mapper: GBWPanopticDatasetMapper, sampler: Sampler, batch_size: int
):
    return build_detection_train_loader(
        dicts,
        mapper=mapper,
        sampler=sampler,
        total_batch_size=batch_size,
        aspect_ratio_grouping=False,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )


def build_source_train_loader(cfg: CfgNode):
    """Infinite loader of labelled source batches (lists of ``SOLVER.IMS_PER_BATCH / world`` dicts)."""
    dicts = _dataset_dicts(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
    if cfg.DATALOADER.RCS.ENABLED:
        sampler = build_rcs_sampler(cfg, cfg.DATASETS.TRAIN)
    else:
        sampler = TrainingSampler(len(dicts))
    logger.info(f"Source training sampler: {type(sampler).__name__} over {len(dicts)} images")
    mapper = GBWPanopticDatasetMapper(cfg, is_train=True, load_labels=True)
    return _train_loader(cfg, dicts, mapper, sampler, cfg.SOLVER.IMS_PER_BATCH)


def build_target_train_loader(cfg: CfgNode):
    """Infinite loader of unlabelled target batches (``DATASETS.TARGET_IMS_PER_BATCH / world`` dicts)."""
    dicts = _dataset_dicts(cfg.DATASETS.TARGET_TRAIN, "DATASETS.TARGET_TRAIN")
    mapper = GBWPanopticDatasetMapper(cfg, is_train=True, load_labels=False)
    return _train_loader(cfg, dicts, mapper, TrainingSampler(len(dicts)), cfg.DATASETS.TARGET_IMS_PER_BATCH)


class UDATrainLoader:
    """Infinite iterable of ``(source_batch, target_batch)``: one batch of each loader per step."""

    def __init__(self, source_loader, target_loader):
        """
        Args:
            source_loader, target_loader: infinite iterables of batches (lists of dicts).
        """
        self.source_loader = source_loader
        self.target_loader = target_loader

    def __iter__(self) -> Iterator[Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]]:
        return zip(self.source_loader, self.target_loader)


def build_uda_train_loader(cfg: CfgNode) -> UDATrainLoader:
    """The UDA training loader: paired source and target batches (see the module docstring)."""
    return UDATrainLoader(build_source_train_loader(cfg), build_target_train_loader(cfg))


def build_test_loader(cfg: CfgNode, dataset_name: str, load_labels: bool = False):
    """Loader of ``dataset_name`` for evaluation: batches of one mapped dict, every image once.

    Args:
        cfg: the project config.
        dataset_name: a registered (labelled) dataset.
        load_labels: also emit the label tensors (evaluators read the ground truth files
            themselves, so this is only needed to compute losses on the evaluation set).
    """
    dicts = get_detection_dataset_dicts(dataset_name, filter_empty=False)
    mapper = GBWPanopticDatasetMapper(cfg, is_train=False, load_labels=load_labels, dataset_name=dataset_name)
    return build_detection_test_loader(dicts, mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS)
