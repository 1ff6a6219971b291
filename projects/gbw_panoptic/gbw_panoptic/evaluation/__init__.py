"""Evaluation: fast exact PQ, panoptic and semantic Detectron2 evaluators, result files."""
from .build import build_evaluators
from .panoptic_evaluation import GBWPanopticEvaluator
from .pq import pq_compute
from .sem_seg_evaluation import GBWSemSegEvaluator

__all__ = ["build_evaluators", "GBWPanopticEvaluator", "GBWSemSegEvaluator", "pq_compute"]
