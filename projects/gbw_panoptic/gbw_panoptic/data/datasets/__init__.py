"""Builtin datasets: class metadata, the folder layout of prepared datasets, and their registration
in Detectron2's catalogs (the converters that prepare them are in :mod:`gbw_panoptic.data.prepare`).

Importing this package registers every builtin dataset under ``$DETECTRON2_DATASETS`` (default
``./datasets``); call :func:`register_all` with another root to re-register them there.
"""
from .builtin import DATASET_NAMES, register_all
from .builtin_meta import CLASS_NAMES, SYNTHIA_EVAL_TRAIN_IDS, SYNTHIA_TO_LABEL_ID, panoptic_metadata

__all__ = [
    "CLASS_NAMES",
    "DATASET_NAMES",
    "SYNTHIA_EVAL_TRAIN_IDS",
    "SYNTHIA_TO_LABEL_ID",
    "panoptic_metadata",
    "register_all",
]

register_all()
