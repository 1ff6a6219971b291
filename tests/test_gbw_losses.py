"""GBW loss modules: reduction, equality with the plain losses when off, edge cases, training."""
from typing import Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.projects.deeplab.loss import DeepLabCE
from torch import nn

from gbw_panoptic.gbw import (
    CVXOPT_REFERENCE_OPTIONS,
    GBWCrossEntropyLoss,
    GBWRegressionLoss,
    ce_grad_sq_norms,
    qp_class_weights,
)

IGNORE = 255
NUM_CLASSES = 19
THING_CLASSES = list(range(11, 19))


def _semantic_batch(seed: int = 0, batch: int = 2, size: int = 16):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, NUM_CLASSES, size, size, generator=generator).requires_grad_()
    # Long-tailed labels: class 0 everywhere, a few rare classes in blocks, an ignored border.
    labels = torch.zeros(batch, size, size, dtype=torch.long)
    labels[:, 4:8, 4:8] = 11
    labels[:, 10:12, 2:4] = 5
    labels[0, 0] = IGNORE
    pixel_weights = torch.rand(batch, size, size, generator=generator)
    pixel_weights[:, -2:] = 0.0  # e.g. pseudo-label rows left out
    return logits, labels, pixel_weights


@pytest.mark.parametrize("use_pixel_weights", [False, True])
def test_disabled_equals_deeplab_ce_bit_for_bit(use_pixel_weights: bool) -> None:
    logits, labels, pixel_weights = _semantic_batch()
    weights = pixel_weights if use_pixel_weights else None
    loss_module = GBWCrossEntropyLoss(NUM_CLASSES, enabled=False)
    ours = loss_module(logits, labels, weights)
    reference = DeepLabCE(ignore_label=IGNORE, top_k_percent_pixels=1.0)(logits, labels, weights)
    assert torch.equal(ours, reference)
    assert loss_module.last_weights is None
    (grad_ours,) = torch.autograd.grad(ours, logits)
    (grad_reference,) = torch.autograd.grad(reference, logits)
    assert torch.equal(grad_ours, grad_reference)


@pytest.mark.parametrize("mode", ["channel", "class"])
@pytest.mark.parametrize("lam_mode", ["absolute", "relative"])
@pytest.mark.parametrize("pixel_weights_in_norms", [False, True])
def test_enabled_loss_is_pixel_weight_times_class_weight_times_ce(
    mode: str, lam_mode: str, pixel_weights_in_norms: bool
) -> None:
    logits, labels, pixel_weights = _semantic_batch(seed=1)
    loss_module = GBWCrossEntropyLoss(
        NUM_CLASSES, lam=0.5, lam_mode=lam_mode, mode=mode, pixel_weights_in_norms=pixel_weights_in_norms
    )
    loss = loss_module(logits, labels, pixel_weights)

    norm_weights = pixel_weights if pixel_weights_in_norms else None
    sq_norms = ce_grad_sq_norms(logits, labels, mode=mode, pixel_weights=norm_weights)
    class_weights = qp_class_weights(sq_norms, lam=0.5, lam_mode=lam_mode)
    # The module takes the probabilities from its own log-softmax: equal to float rounding.
    torch.testing.assert_close(loss_module.last_weights, class_weights, rtol=1e-5, atol=1e-6)
    class_weights = loss_module.last_weights
    assert not loss_module.last_weights.requires_grad
    pixel_ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
    safe = torch.where(labels == IGNORE, 0, labels)
    expected = (pixel_ce * pixel_weights * class_weights[safe]).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)

    # The class weights are constants: the gradient is that of the weighted CE alone.
    (grad,) = torch.autograd.grad(loss, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, expected_grad)


def test_rare_class_gets_larger_weight_with_relative_lambda() -> None:
    logits, labels, _ = _semantic_batch(seed=2)
    # The classes of the batch share the simplex; the others get weight 0.
    loss_module = GBWCrossEntropyLoss(NUM_CLASSES, lam=1.0, lam_mode="relative", active_classes=[11, 0, 5])
    loss_module(logits, labels)
    weights = loss_module.last_weights
    assert weights[5] > weights[11] > weights[0]  # 8, 32 and ~470 pixels per image
    assert torch.all(weights[[c for c in range(NUM_CLASSES) if c not in (0, 5, 11)]] == 0)
    assert float(weights.sum()) == pytest.approx(3.0)


def test_absent_classes_share_the_simplex_with_all() -> None:
    logits, labels, _ = _semantic_batch(seed=3)
    loss_module = GBWCrossEntropyLoss(NUM_CLASSES, lam=0.1, lam_mode="relative")
    loss_module(logits, labels)
    weights = loss_module.last_weights
    assert float(weights.sum()) == pytest.approx(NUM_CLASSES)
    assert torch.all(weights >= 0)


def test_all_ignored_batch_gives_uniform_weights_and_zero_loss() -> None:
    logits = torch.randn(2, NUM_CLASSES, 8, 8, requires_grad=True)
    labels = torch.full((2, 8, 8), IGNORE)
    for lam_mode in ("absolute", "relative"):
        loss_module = GBWCrossEntropyLoss(NUM_CLASSES, lam_mode=lam_mode)
        loss = loss_module(logits, labels)
        assert float(loss) == 0.0
        assert torch.equal(loss_module.last_weights, torch.ones(NUM_CLASSES))
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_are_computed_in_fp32(dtype: torch.dtype) -> None:
    logits, labels, _ = _semantic_batch(seed=4)
    low = logits.detach().to(dtype).requires_grad_()
    loss_module = GBWCrossEntropyLoss(NUM_CLASSES, lam=0.1, lam_mode="relative")
    loss = loss_module(low, labels)
    assert loss.dtype == torch.float32
    reference = GBWCrossEntropyLoss(NUM_CLASSES, lam=0.1, lam_mode="relative")(low.detach().float(), labels)
    assert torch.equal(loss, reference)
    loss.backward()
    assert low.grad.dtype == dtype and torch.isfinite(low.grad.float()).all()


@pytest.mark.parametrize("enabled", [True, False])
def test_bad_inputs_raise_naming_tensor_and_value(enabled: bool) -> None:
    logits, labels, _ = _semantic_batch(seed=5)
    loss_module = GBWCrossEntropyLoss(NUM_CLASSES, enabled=enabled)
    bad_logits = logits.detach().clone()
    bad_logits[1, 3, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="logits contains the non-finite value nan"):
        loss_module(bad_logits, labels)
    bad_labels = labels.clone()
    bad_labels[0, 5, 5] = 19
    with pytest.raises(ValueError, match=r"labels contains the value 19; expected class ids in \[0, 19\)"):
        loss_module(logits, bad_labels)
    bad_weights = torch.ones(labels.shape)
    bad_weights[0, 9, 9] = float("inf")
    with pytest.raises(ValueError, match="pixel_weights contains the non-finite value inf"):
        loss_module(logits, labels, bad_weights)
    with pytest.raises(ValueError, match=r"logits must have shape \[B, 19, H, W\]"):
        loss_module(logits[:, :5], labels)


def test_constructor_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match=r"active_classes must be non-empty ids in \[0, 19\), got \[\]"):
        GBWCrossEntropyLoss(NUM_CLASSES, active_classes=[])
    with pytest.raises(ValueError, match="non-empty ids"):
        GBWCrossEntropyLoss(NUM_CLASSES, active_classes=[3, 19])
    with pytest.raises(ValueError, match="mode must be"):
        GBWCrossEntropyLoss(NUM_CLASSES, mode="pixel")
    with pytest.raises(ValueError, match="normalizer must be"):
        GBWRegressionLoss(NUM_CLASSES, normalizer="sum")


def test_cvxopt_solver_in_module_matches_projection() -> None:
    logits, labels, _ = _semantic_batch(seed=8)
    projection = GBWCrossEntropyLoss(NUM_CLASSES, lam=0.1, lam_mode="relative")
    reference = GBWCrossEntropyLoss(NUM_CLASSES, lam=0.1, lam_mode="relative", solver="cvxopt")
    torch.testing.assert_close(reference(logits, labels), projection(logits, labels), rtol=1e-3, atol=0)
    torch.testing.assert_close(reference.last_weights, projection.last_weights, rtol=0, atol=1e-3)


def _regression_batch(seed: int, channels: int):
    generator = torch.Generator().manual_seed(seed)
    _, labels, _ = _semantic_batch(seed)
    pred = torch.randn(2, channels, 16, 16, generator=generator).requires_grad_()
    target = torch.randn(2, channels, 16, 16, generator=generator)
    return pred, target, labels


@pytest.mark.parametrize("kind, channels", [("mse", 1), ("l1", 2)])
def test_regression_disabled_equals_panoptic_deeplab_normalisation(kind: str, channels: int) -> None:
    pred, target, labels = _regression_batch(9, channels)
    pixel_weights = ((labels != IGNORE) & (labels >= 5)).float()
    loss = GBWRegressionLoss(NUM_CLASSES, kind=kind, enabled=False)(pred, target, labels, pixel_weights)
    base = nn.MSELoss(reduction="none") if kind == "mse" else nn.L1Loss(reduction="none")
    expected = (base(pred, target) * pixel_weights.unsqueeze(1)).sum() / pixel_weights.sum()
    assert torch.equal(loss, expected)
    mean_loss = GBWRegressionLoss(NUM_CLASSES, kind=kind, enabled=False, normalizer="mean")
    torch.testing.assert_close(
        mean_loss(pred, target, labels, pixel_weights), (base(pred, target) * pixel_weights.unsqueeze(1)).mean()
    )


@pytest.mark.parametrize("enabled", [False, True])
def test_channel_weight_sum_divides_by_the_weights_expanded_over_channels(enabled: bool) -> None:
    """EDAPS's offset normalisation: the (dy, dx) weights summed, 2 * sum(w), half the Panoptic-DeepLab loss."""
    pred, target, labels = _regression_batch(11, 2)
    offset_weights = (labels >= 11).float() * (labels != IGNORE)
    kwargs = dict(kind="l1", enabled=enabled, lam=0.1, lam_mode="relative", active_classes=THING_CLASSES)
    per_weight = GBWRegressionLoss(NUM_CLASSES, **kwargs)(pred, target, labels, offset_weights)
    per_channel_weight = GBWRegressionLoss(NUM_CLASSES, normalizer="channel_weight_sum", **kwargs)
    torch.testing.assert_close(per_channel_weight(pred, target, labels, offset_weights), per_weight / 2)
    assert float(per_channel_weight(pred, target, labels, torch.zeros_like(offset_weights))) == 0.0


def test_offset_loss_weights_thing_classes_only() -> None:
    pred, target, labels = _regression_batch(10, 2)
    offset_weights = (labels >= 11).float() * (labels != IGNORE)
    loss_module = GBWRegressionLoss(NUM_CLASSES, kind="l1", lam=0.1, lam_mode="relative", active_classes=THING_CLASSES)
    loss = loss_module(pred, target, labels, offset_weights)
    weights = loss_module.last_weights
    assert torch.all(weights[:11] == 0)
    assert float(weights[11:].sum()) == pytest.approx(len(THING_CLASSES))
    safe = torch.where(labels == IGNORE, 0, labels)
    expected = (F.l1_loss(pred, target, reduction="none") * (offset_weights * weights[safe]).unsqueeze(1)).sum()
    torch.testing.assert_close(loss, expected / offset_weights.sum())


def test_regression_without_covered_pixels_is_zero_not_nan() -> None:
    pred, target, labels = _regression_batch(11, 1)
    loss_module = GBWRegressionLoss(NUM_CLASSES, kind="mse", lam_mode="relative")
    loss = loss_module(pred, target, labels, torch.zeros(2, 16, 16))
    assert float(loss) == 0.0
    assert torch.equal(loss_module.last_weights, torch.ones(NUM_CLASSES))
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred.grad))


def test_regression_pixels_of_ignore_class_keep_weight_one() -> None:
    pred, target, labels = _regression_batch(12, 1)
    labels[:] = IGNORE
    pixel_weights = torch.ones(2, 16, 16)
    loss = GBWRegressionLoss(NUM_CLASSES, kind="mse")(pred, target, labels, pixel_weights)
    assert torch.equal(loss, GBWRegressionLoss(NUM_CLASSES, kind="mse", enabled=False)(pred, target, labels, pixel_weights))


class _TinyPanopticNet(nn.Module):
    """Two convolutions with a semantic, a center and an offset output at input resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.semantic = nn.Conv2d(8, NUM_CLASSES, 1)
        self.center = nn.Conv2d(8, 1, 1)
        self.offset = nn.Conv2d(8, 2, 1)

    def forward(self, images: torch.Tensor):
        features = self.body(images)
        return self.semantic(features), self.center(features), self.offset(features)


def test_training_step_with_all_three_losses_gives_finite_gradients() -> None:
    torch.manual_seed(0)
    model = _TinyPanopticNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    semantic_loss = GBWCrossEntropyLoss(NUM_CLASSES, lam=0.1, lam_mode="relative")
    center_loss = GBWRegressionLoss(NUM_CLASSES, kind="mse", lam=0.1, lam_mode="relative")
    offset_loss = GBWRegressionLoss(NUM_CLASSES, kind="l1", lam=0.1, lam_mode="relative", active_classes=THING_CLASSES)
    images = torch.randn(2, 3, 16, 16)
    _, labels, _ = _semantic_batch(13)
    center_target = torch.rand(2, 1, 16, 16)
    offset_target = torch.randn(2, 2, 16, 16)
    center_weights = (labels != IGNORE).float()
    offset_weights = center_weights * (labels >= 11)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(3):
        semantic, center, offset = model(images)
        loss = (
            semantic_loss(semantic, labels)
            + 10.0 * center_loss(center, center_target, labels, center_weights)
            + 0.1 * offset_loss(offset, offset_target, labels, offset_weights)
        )
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    for module in (semantic_loss, center_loss, offset_loss):
        assert torch.isfinite(module.last_weights).all()


def _authors_recipe(
    logits: torch.Tensor, labels: torch.Tensor, pixel_weights: torch.Tensor, lam: float = 1.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The authors' GBW cross-entropy re-derived step by step: one-hot targets (ignored pixels have
    none), per-class mean CE ``-sum(onehot * log softmax) / (N_c + 1)`` over every labelled pixel,
    autograd gradient of their sum w.r.t. the detached logits, L2 norm of each logit channel,
    the QP posed literally for cvxopt (P = 2 lam I, q = -(g^2 + lam), G = -I, h = 0, A = 1^T,
    b = C, 20 iterations, tolerances 1e-4), then ``F.cross_entropy(weight=w, reduction="none")``
    times the pseudo-label weights, averaged over all pixels. Returns ``(loss, class weights)``."""
    from cvxopt import matrix, solvers

    num_classes = logits.shape[1]
    detached = logits.detach().clone().requires_grad_()
    valid = labels != IGNORE
    onehot = F.one_hot(torch.where(valid, labels, 0), num_classes).permute(0, 3, 1, 2) * valid.unsqueeze(1)
    class_pixels = onehot.transpose(0, 1).flatten(1).sum(1) + 1
    per_class = -(onehot * torch.log(F.softmax(detached, dim=1))).transpose(0, 1).flatten(1).sum(1) / class_pixels
    per_class.backward(torch.ones_like(per_class))
    norms = torch.linalg.vector_norm(detached.grad.transpose(0, 1).flatten(1), dim=1).double().numpy()
    solution = solvers.qp(
        matrix(2.0 * lam * np.eye(num_classes)),
        matrix(-(norms**2 + lam)),
        matrix(-np.eye(num_classes)),
        matrix(np.zeros(num_classes)),
        matrix(np.ones((1, num_classes))),
        matrix(float(num_classes)),
        options=dict(CVXOPT_REFERENCE_OPTIONS),
    )
    class_weights = torch.tensor(np.asarray(solution["x"]).ravel(), dtype=torch.float32)
    pixel_losses = F.cross_entropy(logits, labels, weight=class_weights, ignore_index=IGNORE, reduction="none")
    return (pixel_losses * pixel_weights).mean(), class_weights


def _dacs_batch(seed: int):
    """A mixed DACS batch of 2 x 24 x 32: pseudo-labels weighted by one confidence per image, rows
    at the top and bottom weighted 0, pasted source pixels weighted 1, an ignored patch."""
    generator = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(2, NUM_CLASSES, 24, 32, generator=generator)).requires_grad_()
    labels = torch.randint(0, 6, (2, 24, 32), generator=generator)
    labels[:, 8:14, 4:12] = 11
    labels[1, 16:20, 20:30] = 17
    labels[0, 2:5, 2:5] = IGNORE
    pixel_weights = torch.tensor([0.62, 0.35])[:, None, None].expand(2, 24, 32).clone()
    pixel_weights[:, :3] = 0.0
    pixel_weights[:, -5:] = 0.0
    pixel_weights[:, 8:14, 4:12] = 1.0  # pasted source pixels
    return logits, labels, pixel_weights


@pytest.mark.parametrize("solver", ["projection", "cvxopt"])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_setting_equals_the_authors_recipe_with_pseudo_label_weights(solver: str, seed: int) -> None:
    logits, labels, pixel_weights = _dacs_batch(seed)
    expected_loss, expected_weights = _authors_recipe(logits, labels, pixel_weights)
    module = GBWCrossEntropyLoss(NUM_CLASSES, lam=1.0, solver=solver)
    loss = module(logits, labels, pixel_weights)
    torch.testing.assert_close(module.last_weights, expected_weights, rtol=0, atol=2e-6)
    torch.testing.assert_close(loss, expected_loss, rtol=2e-6, atol=0)
    (grad,) = torch.autograd.grad(loss, logits)
    (expected_grad,) = torch.autograd.grad(expected_loss, logits)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-9)

    # Pixel weights in the norms give other weights on this batch, far beyond float precision.
    weighted = GBWCrossEntropyLoss(NUM_CLASSES, lam=1.0, solver=solver, pixel_weights_in_norms=True)
    weighted(logits, labels, pixel_weights)
    assert float((weighted.last_weights - expected_weights).abs().max()) > 1e-3
