"""Gradient-based class Weighting (GBW), pure PyTorch (no Detectron2 import).

Public API:

- :func:`ce_grad_sq_norms` / :func:`regression_grad_sq_norms`: squared per-class norms g_c^2 of
  the gradient of the per-class mean losses w.r.t. the network output, in closed form.
- :func:`qp_class_weights`: the class weights solving the GBW quadratic program (exact simplex
  projection on the device, or the reference ``cvxopt`` solver).
- :class:`GBWCrossEntropyLoss` / :class:`GBWRegressionLoss`: drop-in loss modules applying them.
- :func:`median_frequency_weights`: static class weights from class frequencies (the classical
  baseline GBW is compared with).
"""
from .frequency import median_frequency_weights
from .grad_norms import ce_grad_sq_norms, regression_grad_sq_norms
from .losses import GBWCrossEntropyLoss, GBWRegressionLoss
from .qp import CVXOPT_REFERENCE_OPTIONS, effective_lambda, project_to_scaled_simplex, qp_class_weights

__all__ = [
    "ce_grad_sq_norms",
    "regression_grad_sq_norms",
    "qp_class_weights",
    "project_to_scaled_simplex",
    "effective_lambda",
    "CVXOPT_REFERENCE_OPTIONS",
    "GBWCrossEntropyLoss",
    "GBWRegressionLoss",
    "median_frequency_weights",
]
