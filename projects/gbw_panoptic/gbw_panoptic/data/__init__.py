"""Datasets and data pipeline: registration, mappers, panoptic targets, rare class sampling, loaders.

Importing this package registers the builtin datasets (``datasets/``) under
``$DETECTRON2_DATASETS`` (default ``./datasets``).
"""
from . import datasets  # noqa: F401  (registers the builtin datasets)
from .build import (
    UDATrainLoader,
    build_rcs_sampler,
    build_source_train_loader,
    build_target_train_loader,
    build_test_loader,
    build_uda_train_loader,
)
from .mapper import GBWPanopticDatasetMapper, build_augmentations, build_target_generator
from .panoptic_target import PanopticTargetGenerator
from .rcs import RareClassSampler, load_class_pixel_counts, rcs_class_probabilities
from .stream import IndexStream, ShuffledIndexStream, TrainStream, build_stream_loader

__all__ = [
    "GBWPanopticDatasetMapper",
    "IndexStream",
    "PanopticTargetGenerator",
    "RareClassSampler",
    "ShuffledIndexStream",
    "TrainStream",
    "UDATrainLoader",
    "build_augmentations",
    "build_rcs_sampler",
    "build_source_train_loader",
    "build_stream_loader",
    "build_target_generator",
    "build_target_train_loader",
    "build_test_loader",
    "build_uda_train_loader",
    "load_class_pixel_counts",
    "rcs_class_probabilities",
]
