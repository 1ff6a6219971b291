"""Evaluation: fast exact PQ, panoptic and semantic Detectron2 evaluators, result files.

The names below are imported on first use, so that importing ``gbw_panoptic.evaluation.pq`` or
``.panoptic_io`` (NumPy and OpenCV only) does not import Detectron2 and PyTorch.
"""
import importlib
from typing import Any

__all__ = ["build_evaluators", "GBWPanopticEvaluator", "GBWSemSegEvaluator", "pq_compute"]

_MODULE_OF = {
    "build_evaluators": ".build",
    "GBWPanopticEvaluator": ".panoptic_evaluation",
    "GBWSemSegEvaluator": ".sem_seg_evaluation",
    "pq_compute": ".pq",
}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(list(globals()) + __all__)
