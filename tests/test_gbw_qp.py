"""The GBW quadratic program: exact simplex projection vs cvxopt, KKT conditions, lambda modes."""
from typing import Optional

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gbw_panoptic.gbw import CVXOPT_REFERENCE_OPTIONS, effective_lambda, project_to_scaled_simplex, qp_class_weights

# The reference tolerances (1e-4, 20 iterations) leave cvxopt's answer up to ~1e-2 away from the
# optimum on large, spread-out g^2; the agreement tests run cvxopt to convergence instead.
CVXOPT_CONVERGED = {"abstol": 1e-12, "reltol": 1e-12, "feastol": 1e-12, "maxiters": 100}
AGREEMENT_TOL = 1e-5


def _assert_kkt(weights: torch.Tensor, sq_norms: torch.Tensor, lam_eff: float, active: torch.Tensor) -> None:
    """KKT of min lam||w-1||^2 - w.g^2 on the scaled simplex: w = max(0, v - tau), v = 1 + g^2/(2 lam)."""
    weights = weights.double()
    num_active = int(active.sum())
    assert torch.all(weights >= 0)
    assert torch.all(weights[~active] == 0)
    assert abs(float(weights.sum()) - num_active) <= 1e-9 * max(num_active, 1)
    if lam_eff == 0:
        assert torch.all(weights[active] == 1)
        return
    values = 1 + sq_norms.double() / (2 * lam_eff)
    support = active & (weights > 0)
    taus = (values - weights)[support]
    tau = float(taus.mean())
    scale = max(1.0, float(values[active].abs().max()))
    assert float((taus - tau).abs().max()) <= 1e-9 * scale  # stationarity on the support
    assert torch.all(values[active & ~support] <= tau + 1e-9 * scale)  # dual feasibility


def _weights_both_solvers(sq_norms: torch.Tensor, lam: float, lam_mode: str, active: Optional[torch.Tensor]):
    ours = qp_class_weights(sq_norms, lam, lam_mode, "projection", active)
    reference = qp_class_weights(sq_norms, lam, lam_mode, "cvxopt", active, cvxopt_options=CVXOPT_CONVERGED)
    return ours, reference


sq_norm_values = st.one_of(
    st.floats(0.0, 1.0),
    st.floats(0.0, 1e6),
    st.floats(0.0, 1e-6),
    st.sampled_from([0.0, 1e-12, 1e-5, 0.5, 1.0, 1e3]),  # ties
)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(sq_norm_values, min_size=2, max_size=200),
    lam=st.sampled_from([1e-3, 0.1, 1.0, 10.0]),
    lam_mode=st.sampled_from(["absolute", "relative"]),
)
def test_projection_matches_cvxopt_and_kkt(values, lam: float, lam_mode: str) -> None:
    sq_norms = torch.tensor(values, dtype=torch.float64)
    ours, reference = _weights_both_solvers(sq_norms, lam, lam_mode, None)
    torch.testing.assert_close(ours, reference, rtol=0, atol=AGREEMENT_TOL)
    active = torch.ones(len(values), dtype=torch.bool)
    _assert_kkt(ours, sq_norms, float(effective_lambda(sq_norms, lam, lam_mode)), active)


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(sq_norm_values, min_size=2, max_size=60),
    data=st.data(),
)
def test_projection_with_active_mask_matches_cvxopt(values, data) -> None:
    mask = data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values)))
    sq_norms = torch.tensor(values, dtype=torch.float64)
    active = torch.tensor(mask, dtype=torch.bool)
    ours, reference = _weights_both_solvers(sq_norms, 1.0, "relative", active)
    torch.testing.assert_close(ours, reference, rtol=0, atol=AGREEMENT_TOL)
    _assert_kkt(ours, sq_norms, float(effective_lambda(sq_norms, 1.0, "relative", active)), active)


def _structured_case(kind: str, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "random":
        return rng.random(num_classes) * 10.0 ** rng.integers(-8, 4)
    if kind == "ties":
        return rng.choice([0.0, 0.3, 2.0], size=num_classes)
    if kind == "dominant":
        values = rng.random(num_classes) * 1e-4
        values[rng.integers(num_classes)] = 1e4
        return values
    if kind == "zeros":
        return np.zeros(num_classes)
    if kind == "huge":
        return 1e6 * (1 + rng.random(num_classes))
    return 1e-12 * rng.random(num_classes)  # tiny


@pytest.mark.parametrize("num_classes", [2, 3, 19, 200])
@pytest.mark.parametrize("kind", ["random", "ties", "dominant", "zeros", "huge", "tiny"])
@pytest.mark.parametrize("lam_mode", ["absolute", "relative"])
def test_structured_inputs_agree(num_classes: int, kind: str, lam_mode: str) -> None:
    rng = np.random.default_rng(num_classes)
    sq_norms = torch.from_numpy(_structured_case(kind, num_classes, rng))
    ours, reference = _weights_both_solvers(sq_norms, 1.0, lam_mode, None)
    torch.testing.assert_close(ours, reference, rtol=0, atol=AGREEMENT_TOL)
    _assert_kkt(ours, sq_norms, float(effective_lambda(sq_norms, 1.0, lam_mode)), torch.ones(num_classes, dtype=bool))


def test_known_solutions() -> None:
    # All equal -> uniform; one dominant class with a tiny lambda -> all mass on it.
    assert torch.equal(qp_class_weights(torch.full((5,), 0.7)), torch.ones(5))
    dominant = qp_class_weights(torch.tensor([0.0, 0.0, 100.0]), lam=1e-3)
    assert torch.equal(dominant, torch.tensor([0.0, 0.0, 3.0]))
    # Interior solution: w = 1 + (g^2 - mean g^2) / (2 lam).
    sq_norms = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    torch.testing.assert_close(qp_class_weights(sq_norms), 1 + (sq_norms - 0.2) / 2)


def test_relative_lambda_is_scale_invariant() -> None:
    sq_norms = torch.rand(19, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e-4
    base = qp_class_weights(sq_norms, lam=0.5, lam_mode="relative")
    for factor in (1e-6, 1e-2, 1e3, 1e8):
        torch.testing.assert_close(qp_class_weights(sq_norms * factor, lam=0.5, lam_mode="relative"), base)
    # The absolute mode is not: with the reference lambda, tiny g^2 leave the weights at ~1.
    assert float((qp_class_weights(sq_norms) - 1).abs().max()) < 1e-4
    assert float((base - 1).abs().max()) > 0.1


def test_inactive_classes_get_zero_and_active_sum_to_their_count() -> None:
    active = torch.tensor([True, False, True, True, False])
    weights = qp_class_weights(torch.tensor([1.0, 50.0, 2.0, 3.0, 0.0]), active=active)
    assert torch.all(weights[~active] == 0)
    assert float(weights.sum()) == pytest.approx(3.0)
    assert torch.equal(qp_class_weights(torch.ones(3), active=torch.zeros(3, dtype=torch.bool)), torch.zeros(3))


def test_all_zero_norms_give_uniform_weights_in_both_modes() -> None:
    for lam_mode in ("absolute", "relative"):
        for solver in ("projection", "cvxopt"):
            weights = qp_class_weights(torch.zeros(7), lam_mode=lam_mode, solver=solver)
            assert torch.allclose(weights, torch.ones(7))
            assert weights.dtype == torch.float32


def test_reference_cvxopt_settings_are_close_to_exact() -> None:
    """With the authors' settings (20 iterations, tolerances 1e-4) cvxopt is close, not exact."""
    assert CVXOPT_REFERENCE_OPTIONS["maxiters"] == 20 and CVXOPT_REFERENCE_OPTIONS["abstol"] == 1e-4
    sq_norms = torch.rand(19, generator=torch.Generator().manual_seed(3))
    reference = qp_class_weights(sq_norms, solver="cvxopt")
    torch.testing.assert_close(reference, qp_class_weights(sq_norms), rtol=0, atol=1e-3)


def test_projection_of_generic_vector() -> None:
    values = torch.tensor([3.0, -1.0, 0.5, 0.4])
    projected = project_to_scaled_simplex(values)
    # tau solves sum max(0, v - tau) = 4: support {0, 2, 3}, 3.9 - 3 tau = 4, tau = -1/30.
    expected = torch.tensor([3.0, -1.0, 0.5, 0.4], dtype=torch.float64) + 1 / 30
    expected[1] = 0.0
    torch.testing.assert_close(projected, expected)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="solver must be one of"):
        qp_class_weights(torch.ones(3), solver="scipy")
    with pytest.raises(ValueError, match="lam_mode must be one of"):
        qp_class_weights(torch.ones(3), lam_mode="auto")
    with pytest.raises(ValueError, match="lam must be > 0"):
        qp_class_weights(torch.ones(3), lam=0.0)
    with pytest.raises(ValueError, match="active must be a bool tensor"):
        qp_class_weights(torch.ones(3), active=torch.ones(3))
    with pytest.raises(ValueError, match=r"sq_norms must have shape \[C\]"):
        qp_class_weights(torch.ones(3, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_projection_runs_on_cuda_without_host_sync() -> None:
    sq_norms = torch.rand(19, device="cuda")
    active = torch.rand(19, device="cuda") > 0.3
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        weights = qp_class_weights(sq_norms, lam=0.1, lam_mode="relative", active=active)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert weights.device.type == "cuda"
    torch.testing.assert_close(weights.cpu(), qp_class_weights(sq_norms.cpu(), 0.1, "relative", active=active.cpu()))
