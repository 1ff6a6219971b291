"""Analytic per-class gradient norms of gbw_panoptic.gbw against autograd."""
from typing import List, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gbw_panoptic.gbw import ce_grad_sq_norms, grad_norms, regression_grad_sq_norms

IGNORE = 255


def _make_labels(shape, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, num_classes, shape, generator=generator)
    labels[:, 0, :] = IGNORE  # a row of ignored pixels per image
    labels[labels == num_classes - 1] = 1  # one absent class
    return labels


def _per_class_mean_losses(
    pixel_losses: torch.Tensor, class_map: torch.Tensor, num_classes: int, pixel_weights: Optional[torch.Tensor]
) -> List[torch.Tensor]:
    """L_c = 1/(N_c+1) * sum over covered class-c pixels of q_i * loss_i, written the slow way."""
    covered = class_map != IGNORE
    weights = torch.ones_like(pixel_losses)
    if pixel_weights is not None:
        covered = covered & (pixel_weights != 0)
        weights = pixel_weights.to(pixel_losses.dtype)
    per_class = []
    for c in range(num_classes):
        members = covered & (class_map == c)
        per_class.append((pixel_losses * weights * members).sum() / (members.sum() + 1))
    return per_class


@pytest.mark.parametrize("mode", ["channel", "class"])
@pytest.mark.parametrize("use_pixel_weights", [False, True])
def test_ce_norms_match_autograd(mode: str, use_pixel_weights: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    batch, num_classes, height, width = 2, 6, 9, 11
    logits = (3 * torch.randn(batch, num_classes, height, width, generator=generator)).double().requires_grad_()
    labels = _make_labels((batch, height, width), num_classes, generator)
    pixel_weights = None
    if use_pixel_weights:
        pixel_weights = torch.rand(batch, height, width, generator=generator)
        pixel_weights[1, 3:5] = 0.0

    safe = torch.where(labels == IGNORE, 0, labels)
    pixel_ce = -torch.log_softmax(logits, dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
    per_class = _per_class_mean_losses(pixel_ce, labels, num_classes, pixel_weights)
    if mode == "channel":
        (grad,) = torch.autograd.grad(sum(per_class), logits)
        expected = grad.square().sum(dim=(0, 2, 3))
    else:
        expected = torch.stack(
            [torch.autograd.grad(loss, logits, retain_graph=True)[0].square().sum() for loss in per_class]
        )

    result = ce_grad_sq_norms(logits, labels, ignore_index=IGNORE, mode=mode, pixel_weights=pixel_weights)
    assert result.dtype == torch.float32 and result.shape == (num_classes,)
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-10)
    if mode == "class":
        assert result[num_classes - 1] == 0  # absent class: L_c = 0


def test_ce_norms_are_channel_norm_of_closed_form_gradient() -> None:
    """g_c^2 is the squared norm of G[:, c] with G = (softmax - onehot) / (N_y + 1)."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 4, 5, 5, generator=generator)
    labels = torch.randint(0, 4, (1, 5, 5), generator=generator)
    counts = torch.bincount(labels.flatten(), minlength=4).float()
    onehot = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    grad = (logits.softmax(dim=1) - onehot) / (counts[labels] + 1).unsqueeze(1)
    torch.testing.assert_close(ce_grad_sq_norms(logits, labels), grad.square().sum(dim=(0, 2, 3)))
    torch.testing.assert_close(grad_norms.group_pixels(labels, 4).counts, counts)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ce_norms_low_precision_inputs_computed_in_fp32(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 8, 8, generator=generator).to(dtype)
    labels = torch.randint(0, 5, (2, 8, 8), generator=generator)
    result = ce_grad_sq_norms(logits, labels)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, ce_grad_sq_norms(logits.float(), labels))


def test_ce_norms_all_ignored_are_zero() -> None:
    labels = torch.full((2, 4, 4), IGNORE)
    for mode in ("channel", "class"):
        assert torch.equal(ce_grad_sq_norms(torch.randn(2, 3, 4, 4), labels, mode=mode), torch.zeros(3))


@pytest.mark.parametrize(
    "bad_value, match", [(float("nan"), "logits contains the non-finite value nan"), (float("inf"), "inf")]
)
def test_ce_norms_reject_non_finite_logits(bad_value: float, match: str) -> None:
    logits = torch.randn(1, 3, 4, 4)
    logits[0, 1, 2, 2] = bad_value
    with pytest.raises(ValueError, match=match):
        ce_grad_sq_norms(logits, torch.zeros(1, 4, 4, dtype=torch.long))


@pytest.mark.parametrize("bad_label", [3, -1, 254])
def test_ce_norms_reject_bad_labels(bad_label: int) -> None:
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, 3, 3] = bad_label
    with pytest.raises(ValueError, match=rf"labels contains the value {bad_label}; expected class ids in \[0, 3\)"):
        ce_grad_sq_norms(torch.randn(1, 3, 4, 4), labels)


def test_ce_norms_reject_bad_shapes_and_mode() -> None:
    with pytest.raises(ValueError, match="labels must have shape"):
        ce_grad_sq_norms(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="mode must be one of"):
        ce_grad_sq_norms(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), mode="pixel")
    with pytest.raises(ValueError, match="integer tensor"):
        ce_grad_sq_norms(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4))


@pytest.mark.parametrize("kind, channels", [("mse", 1), ("l1", 2)])
@pytest.mark.parametrize("use_pixel_weights", [False, True])
def test_regression_norms_match_autograd(kind: str, channels: int, use_pixel_weights: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    batch, num_classes, height, width = 2, 5, 7, 8
    pred = torch.randn(batch, channels, height, width, generator=generator).double().requires_grad_()
    target = torch.randn(batch, channels, height, width, generator=generator).double()
    target[0, :, 1, 1] = pred.detach()[0, :, 1, 1]  # zero residual: L1 gradient 0 there
    pixel_class = _make_labels((batch, height, width), num_classes, generator)
    pixel_weights = None
    if use_pixel_weights:
        pixel_weights = (torch.rand(batch, height, width, generator=generator) > 0.3).float()

    diff = pred - target
    pixel_losses = (diff.square() if kind == "mse" else diff.abs()).sum(dim=1)
    per_class = _per_class_mean_losses(pixel_losses, pixel_class, num_classes, pixel_weights)
    expected = torch.stack(
        [torch.autograd.grad(loss, pred, retain_graph=True)[0].square().sum() for loss in per_class]
    )
    result = regression_grad_sq_norms(pred, target, pixel_class, pixel_weights, num_classes, kind=kind)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-10)
    # Each pixel belongs to one class, so the class norm equals the norm of the gradient of the
    # sum of all L_c restricted to that class's pixels.
    (total_grad,) = torch.autograd.grad(sum(per_class), pred)
    grouped = torch.zeros(num_classes, dtype=torch.float64)
    safe = torch.where(pixel_class == IGNORE, 0, pixel_class)
    grouped.scatter_add_(0, safe.flatten(), total_grad.square().sum(dim=1).flatten())
    torch.testing.assert_close(result.double(), grouped, rtol=1e-5, atol=1e-10)


def test_regression_norms_reject_bad_inputs() -> None:
    pred = torch.randn(1, 2, 4, 4)
    pixel_class = torch.zeros(1, 4, 4, dtype=torch.long)
    bad_target = torch.zeros(1, 2, 4, 4)
    bad_target[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="target contains the non-finite value nan"):
        regression_grad_sq_norms(pred, bad_target, pixel_class, None, 3, kind="l1")
    with pytest.raises(ValueError, match="target must have shape"):
        regression_grad_sq_norms(pred, torch.zeros(1, 1, 4, 4), pixel_class, None, 3)
    with pytest.raises(ValueError, match="pixel_class contains the value 7"):
        regression_grad_sq_norms(pred, pred, pixel_class + 7, None, 3)
    with pytest.raises(ValueError, match="kind must be one of"):
        regression_grad_sq_norms(pred, pred, pixel_class, None, 3, kind="huber")


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    num_classes=st.integers(2, 12),
    height=st.integers(1, 7),
    width=st.integers(1, 7),
    ignore_fraction=st.sampled_from([0.0, 0.3, 1.0]),
    logit_scale=st.sampled_from([0.1, 3.0, 30.0]),
    mode=st.sampled_from(["channel", "class"]),
    seed=st.integers(0, 2**16),
)
def test_ce_norms_match_autograd_on_random_shapes(
    batch: int, num_classes: int, height: int, width: int, ignore_fraction: float, logit_scale: float, mode: str, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits = (logit_scale * torch.randn(batch, num_classes, height, width, generator=generator)).double()
    logits.requires_grad_()
    labels = torch.randint(0, num_classes, (batch, height, width), generator=generator)
    labels[torch.rand(batch, height, width, generator=generator) < ignore_fraction] = IGNORE
    safe = torch.where(labels == IGNORE, 0, labels)
    pixel_ce = -torch.log_softmax(logits, dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
    per_class = _per_class_mean_losses(pixel_ce, labels, num_classes, None)
    if mode == "channel":
        expected = torch.autograd.grad(sum(per_class), logits, allow_unused=True)[0].square().sum(dim=(0, 2, 3))
    else:
        expected = torch.stack(
            [torch.autograd.grad(loss, logits, retain_graph=True)[0].square().sum() for loss in per_class]
        )
    result = ce_grad_sq_norms(logits, labels, mode=mode)
    torch.testing.assert_close(result.double(), expected, rtol=1e-4, atol=1e-9)


def _autograd_channel_norms(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Channel-mode g^2 in float64 by autograd, for logits [B, C, H, W] of any dtype."""
    logits = logits.double().requires_grad_()
    safe = torch.where(labels == IGNORE, 0, labels)
    pixel_ce = -torch.log_softmax(logits, dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
    per_class = _per_class_mean_losses(pixel_ce, labels, logits.shape[1], None)
    return torch.autograd.grad(sum(per_class), logits)[0].square().sum(dim=(0, 2, 3))


def test_ce_norms_extreme_logits() -> None:
    """Logits whose exponentials overflow or underflow float32 next to ordinary ones."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 4, 6, 5, generator=generator)
    logits[0, :, 1] += 300.0  # exp overflows
    logits[0, :, 3] -= 300.0  # exp underflows
    logits[0, 2, 4] = 60.0  # its square overflows
    labels = torch.randint(0, 4, (1, 6, 5), generator=generator)
    expected = _autograd_channel_norms(logits, labels)
    torch.testing.assert_close(ce_grad_sq_norms(logits, labels).double(), expected, rtol=1e-4, atol=0.0)


def test_ce_norms_keep_the_residuals_of_confident_pixels() -> None:
    """With p(label) = 1 - 1e-7, softmax - 1 in float32 is all rounding error; the norms (the same
    ones the loss computes) are formed from the sum of the other classes' probabilities and keep
    float32 relative accuracy."""
    generator = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 5, (2, 8, 8), generator=generator)
    logits = 0.1 * torch.randn(2, 5, 8, 8, generator=generator)
    logits.scatter_add_(1, labels.unsqueeze(1), torch.full((2, 1, 8, 8), 18.0))
    result = ce_grad_sq_norms(logits, labels)
    assert result.min() > 0
    torch.testing.assert_close(result.double(), _autograd_channel_norms(logits, labels), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
@pytest.mark.parametrize("use_pixel_weights", [False, True])
def test_group_pixels_same_for_every_ignore_value(dtype: torch.dtype, use_pixel_weights: bool) -> None:
    """Labels with ignore value 255 (counted by a histogram) and -1 (the general path) group alike."""
    generator = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 6, (2, 5, 7), generator=generator)
    ignored = torch.rand(2, 5, 7, generator=generator) < 0.3
    pixel_weights = torch.rand(2, 5, 7, generator=generator).round() if use_pixel_weights else None
    histogram = grad_norms.group_pixels(torch.where(ignored, 255, labels).to(dtype), 6, 255, pixel_weights)
    general = grad_norms.group_pixels(torch.where(ignored, -1, labels), 6, -1, pixel_weights)
    torch.testing.assert_close(histogram.counts, general.counts)
    torch.testing.assert_close(histogram.scale, general.scale)
    covered = histogram.scale > 0
    assert torch.equal(histogram.safe_class_map[covered], labels[covered])
    for groups in (histogram, general):
        assert groups.safe_class_map.dtype == torch.int64
        assert 0 <= int(groups.safe_class_map.min()) and int(groups.safe_class_map.max()) < 6


@pytest.mark.parametrize("bad_label", [6, 200, 70_000, -5])
def test_group_pixels_name_stray_labels(bad_label: int) -> None:
    labels = torch.zeros(1, 3, 3, dtype=torch.long)
    labels[0, 0, 0] = 255
    labels[0, 2, 1] = bad_label
    with pytest.raises(ValueError, match=rf"pixel_class contains the value {bad_label}; expected"):
        grad_norms.group_pixels(labels, 6, 255, name="pixel_class")
