"""The GBW quadratic program: class weights from squared gradient norms.

    w* = argmin_w  lam * ||w - 1||^2 - sum_c w_c g_c^2   s.t.  w >= 0,  sum_c w_c = K

over the K active classes (inactive classes get weight 0). Completing the square, w* is the
Euclidean projection of ``1 + g^2 / (2 lam)`` onto the scaled simplex ``{w >= 0, sum w = K}``,
which :func:`project_to_scaled_simplex` computes exactly (sort, cumulative sum, threshold) on the
input's device without host synchronisation. ``solver="cvxopt"`` solves the same QP with
``cvxopt.solvers.qp`` on the host, as the authors' code does.
"""
from typing import Any, Dict, Optional

import numpy as np
import torch

__all__ = [
    "qp_class_weights",
    "project_to_scaled_simplex",
    "effective_lambda",
    "CVXOPT_REFERENCE_OPTIONS",
    "LAMBDA_MODES",
    "SOLVERS",
]

LAMBDA_MODES = ("absolute", "relative")
SOLVERS = ("projection", "cvxopt")

# Solver settings of the authors' code: 20 interior-point iterations, tolerances 1e-4.
CVXOPT_REFERENCE_OPTIONS: Dict[str, Any] = {
    "show_progress": False,
    "maxiters": 20,
    "abstol": 1e-4,
    "reltol": 1e-4,
    "feastol": 1e-4,
}


def _active_mask(sq_norms: torch.Tensor, active: Optional[torch.Tensor]) -> torch.Tensor:
    if active is None:
        return torch.ones_like(sq_norms, dtype=torch.bool)
    if active.dtype != torch.bool or active.shape != sq_norms.shape:
        raise ValueError(
            f"active must be a bool tensor of shape {tuple(sq_norms.shape)}, "
            f"got dtype {active.dtype} and shape {tuple(active.shape)}"
        )
    return active.to(sq_norms.device)


def effective_lambda(
    sq_norms: torch.Tensor, lam: float, lam_mode: str, active: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The regularisation strength actually used, as a 0-dim float64 tensor on the input's device.

    ``"absolute"``: ``lam`` itself (the reference, 1.0). ``"relative"``: ``lam * mean_c g_c^2``
    over the active classes, which makes the weights invariant to a common scale of g^2 (image
    size, batch size). It is 0 when every active g^2 is 0 (then the weights are uniform).
    """
    if lam_mode not in LAMBDA_MODES:
        raise ValueError(f"lam_mode must be one of {LAMBDA_MODES}, got {lam_mode!r}")
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    if lam_mode == "absolute":
        return torch.full((), float(lam), dtype=torch.float64, device=sq_norms.device)
    mask = _active_mask(sq_norms, active)
    sq = sq_norms.double() * mask
    return lam * sq.sum() / mask.sum().clamp(min=1)


def project_to_scaled_simplex(
    values: torch.Tensor, active: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Euclidean projection of ``values`` onto ``{w >= 0, sum w = K}``, K = number of active entries.

    Exact (sort, cumulative sum, threshold tau, ``w = max(0, v - tau)``), O(C log C), computed in
    float64 on the input's device with no host synchronisation. Inactive entries get 0.

    Args:
        values: float tensor [C].
        active: optional bool tensor [C]; None means all entries are active.

    Returns:
        float64 tensor [C].
    """
    mask = _active_mask(values, active)
    num_active = mask.sum()
    total = num_active.double()
    values = values.double()
    # Inactive entries sort last; they are excluded from the threshold search by rank <= K.
    sorted_values = torch.sort(torch.where(mask, values, -torch.inf), descending=True)[0]
    sorted_values = torch.where(torch.isfinite(sorted_values), sorted_values, 0.0)
    cumulative = torch.cumsum(sorted_values, dim=0)
    rank = torch.arange(1, values.numel() + 1, device=values.device)
    support = (sorted_values - (cumulative - total) / rank > 0) & (rank <= num_active)
    support_size = support.sum().clamp(min=1)
    tau = (cumulative.gather(0, (support_size - 1).unsqueeze(0)) - total) / support_size
    return torch.where(mask, (values - tau).clamp(min=0.0), 0.0)


def _solve_cvxopt(values: torch.Tensor, mask: torch.Tensor, options: Dict[str, Any]) -> torch.Tensor:
    """``min ||w - v||^2`` on the scaled simplex of the active entries with ``cvxopt.solvers.qp``.

    This is the QP of the module docstring divided by lambda, with the constant ``1 + max g^2/(2 lam)``
    taken out of the linear term (a constant times ``sum w = K``): the same minimiser, but well
    conditioned. Posed literally (``P = 2 lam I``, ``q = -(g^2 + lam)``) cvxopt stops up to ~2e-5
    away from the optimum, or fails, when g^2 / lam spans many orders of magnitude.

    Args:
        values: float64 [C] CPU tensor ``v = (g^2 - max g^2) / (2 lam)``.
        mask: bool [C] CPU tensor of active entries.
    """
    from cvxopt import matrix, solvers

    weights = np.zeros(values.numel())
    keep = mask.numpy()
    size = int(keep.sum())
    if size == 0:
        return torch.from_numpy(weights)
    eye = np.eye(size)
    solution = solvers.qp(
        matrix(2.0 * eye),
        matrix(-2.0 * values.numpy()[keep]),
        matrix(-eye),
        matrix(np.zeros(size)),
        matrix(np.ones((1, size))),
        matrix(float(size)),
        options=options,
    )
    weights[keep] = np.asarray(solution["x"]).ravel()
    return torch.from_numpy(weights)


def qp_class_weights(
    sq_norms: torch.Tensor,
    lam: float = 1.0,
    lam_mode: str = "absolute",
    solver: str = "projection",
    active: Optional[torch.Tensor] = None,
    cvxopt_options: Optional[Dict[str, Any]] = None,
) -> torch.Tensor:
    """GBW class weights: the solution of the QP of the module docstring.

    Args:
        sq_norms: float tensor [C], the squared gradient norms g_c^2 (>= 0).
        lam: regularisation strength lambda (> 0).
        lam_mode: ``"absolute"`` (lambda as given) or ``"relative"`` (``lam * mean_c g_c^2``).
        solver: ``"projection"`` (exact, on device, no host sync) or ``"cvxopt"`` (the reference
            interior-point solver on the host; its result is copied back to the input's device).
        active: optional bool tensor [C]: classes that share the simplex; the others get 0.
        cvxopt_options: overrides of :data:`CVXOPT_REFERENCE_OPTIONS` (e.g. tighter tolerances).

    Returns:
        tensor [C] (float32, or float64 for float64 input), ``w >= 0``, ``sum(w) == K`` where K is
        the number of active classes; the mean weight of the active classes is 1.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if sq_norms.dim() != 1:
        raise ValueError(f"sq_norms must have shape [C], got {tuple(sq_norms.shape)}")
    out_dtype = torch.promote_types(sq_norms.dtype, torch.float32)
    mask = _active_mask(sq_norms, active)
    lam_eff = effective_lambda(sq_norms, lam, lam_mode, mask)
    sq = sq_norms.double()
    # Both solvers are invariant to a constant shift of v = 1 + g^2 / (2 lam): subtract the largest
    # active value so that the values near the threshold keep their precision for huge g^2. A zero
    # (relative) lambda means all g^2 are 0: the objective is flat and the weights uniform.
    top = torch.where(mask, sq, 0.0).max()
    safe_lam = torch.where(lam_eff > 0, lam_eff, 1.0)
    values = torch.where(lam_eff > 0, (sq - top) / (2.0 * safe_lam), 0.0)
    if solver == "cvxopt":
        options = {**CVXOPT_REFERENCE_OPTIONS, **(cvxopt_options or {})}
        weights = _solve_cvxopt(values.cpu(), mask.cpu(), options)
    else:
        weights = project_to_scaled_simplex(values, mask)
    return weights.to(device=sq_norms.device, dtype=out_dtype)
