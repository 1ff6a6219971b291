"""Data loaders of UDA training and evaluation, built on Detectron2's loader machinery.

- :func:`build_source_train_loader`: labelled source images (``DATASETS.TRAIN``), drawn by rare
  class sampling when ``DATALOADER.RCS.ENABLED``, else shuffled anew each epoch;
  ``SOLVER.IMS_PER_BATCH`` images per step in total over all processes.
- :func:`build_target_train_loader`: unlabelled target images (``DATASETS.TARGET_TRAIN``),
  ``DATASETS.TARGET_IMS_PER_BATCH`` per step in total.
- :func:`build_uda_train_loader`: both, zipped into an infinite stream of
  ``(source_batch, target_batch)`` pairs (lists of mapped dicts, this process's share).
- :func:`build_test_loader`: one evaluation image at a time, for a labelled target dataset.

The training loaders are seeded streams (:mod:`gbw_panoptic.data.stream`): the data of step ``s``
depend only on the stream's seed and ``s``, so a resumed run starts its loaders at its first step
(:meth:`UDATrainLoader.seek`) instead of replaying the earlier ones.
"""
import logging
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import DataLoader

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog, build_detection_test_loader, get_detection_dataset_dicts
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm

from .mapper import RCS_CLASS_KEY, GBWPanopticDatasetMapper
from .rcs import RareClassSampler, load_class_pixel_counts
from .stream import IndexStream, ShuffledIndexStream, TrainStream, build_stream_loader

__all__ = [
    "UDATrainLoader",
    "build_rcs_sampler",
    "dataset_class_pixels",
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


def dataset_class_pixels(dataset_names: Sequence[str], num_classes: int, used_for: str) -> np.ndarray:
    """int64 (N, C) labelled pixels of each class in each image of the concatenation of
    ``dataset_names`` (in order), from each dataset's ``class_stats_file`` (metadata) written by its
    ``datasets/prepare_*.py`` script; ``used_for`` names the feature (and its switch) in the error
    raised when a dataset has no such file."""
    counts = []
    for name in dataset_names:
        meta = MetadataCatalog.get(name)
        stats_file = meta.get("class_stats_file")
        if not stats_file:
            raise KeyError(
                f"{used_for} needs the metadata 'class_stats_file' of dataset '{name}' "
                "(written by its datasets/prepare_*.py script)"
            )
        dicts = get_detection_dataset_dicts(name, filter_empty=False)
        counts.append(load_class_pixel_counts(stats_file, dicts, num_classes))
    return np.concatenate(counts)


def build_rcs_sampler(cfg: CfgNode, dataset_names: Sequence[str]) -> RareClassSampler:
    """Rare class sampler over the concatenation of ``dataset_names`` (in order); with
    ``DATALOADER.RCS.MIN_CROP_RATIO`` > 0 its items carry the drawn class for the mapper's crop.

    Each dataset's metadata must name its ``class_stats_file``.
    """
    counts = dataset_class_pixels(
        dataset_names,
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
        "Rare class sampling (set DATALOADER.RCS.ENABLED False to sample uniformly)",
    )
    return RareClassSampler(
        counts,
        cfg.DATALOADER.RCS.TEMPERATURE,
        cfg.DATALOADER.RCS.MIN_PIXELS,
        class_key=RCS_CLASS_KEY if cfg.DATALOADER.RCS.MIN_CROP_RATIO > 0 else None,
    )


def _train_loader(
    cfg: CfgNode,
    dicts: List[Dict[str, Any]],
    mapper: GBWPanopticDatasetMapper,
    index_stream: IndexStream,
    total_batch_size: int,
    seed: Optional[int],
) -> DataLoader:
    """``seed`` None: a random seed shared by all processes (reproducible once Detectron2's
    ``default_setup`` has seeded NumPy with ``cfg.SEED``)."""
    seed = int(comm.shared_random_seed() if seed is None else seed)
    # Serialized into one buffer, so that worker processes do not copy the dicts page by page.
    stream = TrainStream(DatasetFromList(dicts, copy=False), mapper, index_stream, total_batch_size, seed)
    return build_stream_loader(stream, cfg.DATALOADER.NUM_WORKERS)


def build_source_train_loader(cfg: CfgNode, seed: Optional[int] = None) -> DataLoader:
    """Infinite loader of labelled source batches (lists of ``SOLVER.IMS_PER_BATCH / world`` dicts);
    ``seed``: that of the stream (None: see :func:`_train_loader`)."""
    dicts = _dataset_dicts(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
    if cfg.DATALOADER.RCS.ENABLED:
        index_stream: IndexStream = build_rcs_sampler(cfg, cfg.DATASETS.TRAIN)
    else:
        index_stream = ShuffledIndexStream(len(dicts))
    logger.info(f"Source training indices: {type(index_stream).__name__} over {len(dicts)} images")
    mapper = GBWPanopticDatasetMapper(cfg, is_train=True, load_labels=True, domain="source")
    return _train_loader(cfg, dicts, mapper, index_stream, cfg.SOLVER.IMS_PER_BATCH, seed)


def build_target_train_loader(cfg: CfgNode, seed: Optional[int] = None) -> DataLoader:
    """Infinite loader of unlabelled target batches (``DATASETS.TARGET_IMS_PER_BATCH / world`` dicts)."""
    dicts = _dataset_dicts(cfg.DATASETS.TARGET_TRAIN, "DATASETS.TARGET_TRAIN")
    mapper = GBWPanopticDatasetMapper(cfg, is_train=True, load_labels=False, domain="target")
    return _train_loader(
        cfg, dicts, mapper, ShuffledIndexStream(len(dicts)), cfg.DATASETS.TARGET_IMS_PER_BATCH, seed
    )


class UDATrainLoader:
    """Infinite iterable of ``(source_batch, target_batch)``: one batch of each loader per step;
    ``target_loader`` None: target batches are empty lists (methods that use no target images)."""

    def __init__(self, source_loader: DataLoader, target_loader: Optional[DataLoader] = None):
        """
        Args:
            source_loader, target_loader: loaders of :class:`~gbw_panoptic.data.stream.TrainStream`.
        """
        self.source_loader = source_loader
        self.target_loader = target_loader

    @property
    def streams(self) -> List[TrainStream]:
        """The seeded streams behind the loaders (source first)."""
        loaders = [self.source_loader] + ([self.target_loader] if self.target_loader is not None else [])
        return [loader.dataset for loader in loaders]

    def seek(self, step: int) -> None:
        """Make the next iteration start at training step ``step`` (0: the beginning)."""
        for stream in self.streams:
            stream.start_step = step

    def __iter__(self) -> Iterator[Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]]:
        if self.target_loader is None:
            return ((source_batch, []) for source_batch in self.source_loader)
        return zip(self.source_loader, self.target_loader)


def build_uda_train_loader(cfg: CfgNode, uses_target: bool = True) -> UDATrainLoader:
    """The UDA training loader: paired source and target batches (see the module docstring), or
    source batches with empty target batches when not ``uses_target``."""
    source_loader = build_source_train_loader(cfg)
    return UDATrainLoader(source_loader, build_target_train_loader(cfg) if uses_target else None)


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
