"""GBW adds no device-to-host readback to a training step: the losses' device path, on the CPU.

The input checks of :mod:`gbw_panoptic.gbw.grad_norms` read values back only where
``host_checks(tensor)`` is True (the CPU). These tests switch it off, as on a GPU, and make every
Python-level readback of a tensor raise while the GBW code runs, then compare the results with the
CPU path's.
"""
import contextlib
from typing import Iterator

import pytest
import torch

from gbw_panoptic.gbw import GBWCrossEntropyLoss, GBWRegressionLoss, grad_norms
from gbw_panoptic.uda.method import gbw_weights
from test_gbw_losses import IGNORE, NUM_CLASSES, THING_CLASSES, _regression_batch, _semantic_batch
from test_modeling_meta_arch import _batch, _small_model

# Operations that copy tensor values to the host (on a GPU: wait for the device).
TENSOR_READBACKS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique", "numpy")
TORCH_READBACKS = ("nonzero", "bincount", "unique")


@pytest.fixture
def device_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks' device path (as on a GPU) for CPU tensors."""
    monkeypatch.setattr(grad_norms, "host_checks", lambda tensor: False)


@contextlib.contextmanager
def no_readback() -> Iterator[None]:
    """Every readback of :data:`TENSOR_READBACKS` / :data:`TORCH_READBACKS` raises inside the block."""

    def refuse(name: str):
        def readback(*args, **kwargs):
            raise AssertionError(f"{name} reads a tensor back to the host")

        return readback

    with pytest.MonkeyPatch.context() as patch:
        for name in TENSOR_READBACKS:
            patch.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
        for name in TORCH_READBACKS:
            patch.setattr(torch, name, refuse(f"torch.{name}"))
        yield


def test_the_readback_guard_catches_the_host_checks() -> None:
    logits, labels, _ = _semantic_batch()
    with no_readback(), pytest.raises(AssertionError, match="reads a tensor back"):
        GBWCrossEntropyLoss(NUM_CLASSES)(logits, labels)


def _loss_and_grad(loss_module, *inputs):
    loss = loss_module(*inputs)
    loss.backward()
    return loss.detach(), inputs[0].grad.clone(), loss_module.last_weights


@pytest.mark.parametrize(
    "kwargs",
    [
        {"enabled": False},
        {"mode": "channel"},
        {"mode": "class", "active_classes": THING_CLASSES, "lam_mode": "relative", "lam": 0.1},
        {"pixel_weights_in_norms": True},
    ],
)
def test_cross_entropy_device_path_reads_nothing_back_and_matches_the_cpu_path(device_checks, kwargs) -> None:
    logits, labels, pixel_weights = _semantic_batch(seed=2)
    expected = _loss_and_grad(GBWCrossEntropyLoss(NUM_CLASSES, **kwargs), logits, labels, pixel_weights)
    logits.grad = None
    with no_readback():
        actual = _loss_and_grad(GBWCrossEntropyLoss(NUM_CLASSES, **kwargs), logits, labels, pixel_weights)
    for ours, reference in zip(actual, expected):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kind, channels, active", [("mse", 1, None), ("l1", 2, THING_CLASSES), ("l1", 2, None)]
)
def test_regression_device_path_reads_nothing_back_and_matches_the_cpu_path(
    device_checks, kind: str, channels: int, active
) -> None:
    pred, target, labels = _regression_batch(seed=3, channels=channels)
    pixel_weights = (labels != IGNORE).float() * torch.rand(labels.shape, generator=torch.Generator().manual_seed(3))
    kwargs = {"kind": kind, "active_classes": active, "lam_mode": "relative", "lam": 0.1}
    expected = _loss_and_grad(GBWRegressionLoss(NUM_CLASSES, **kwargs), pred, target, labels, pixel_weights)
    pred.grad = None
    with no_readback():
        actual = _loss_and_grad(GBWRegressionLoss(NUM_CLASSES, **kwargs), pred, target, labels, pixel_weights)
    for ours, reference in zip(actual, expected):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)


def test_device_path_asserts_on_bad_labels_and_makes_non_finite_inputs_nan(device_checks) -> None:
    logits, labels, pixel_weights = _semantic_batch(seed=4)
    labels[1, 3, 3] = NUM_CLASSES
    # The device-side assertion; on CPU tensors it fails at once.
    with pytest.raises(RuntimeError, match=rf"labels holds a value outside \[0, {NUM_CLASSES}\)"):
        GBWCrossEntropyLoss(NUM_CLASSES)(logits, labels)
    labels[1, 3, 3] = 0
    logits.data[0, 2, 5, 5] = float("nan")
    pred, target, pixel_class = _regression_batch(seed=4, channels=2)
    target[0, 1, 0, 0] = float("inf")
    with no_readback():
        ce = GBWCrossEntropyLoss(NUM_CLASSES)(logits, labels, pixel_weights)
        offset = GBWRegressionLoss(NUM_CLASSES, kind="l1")(pred, target, pixel_class, torch.ones_like(pixel_weights))
    assert torch.isnan(ce) and torch.isnan(offset)


def test_model_loss_step_and_its_class_weights_read_nothing_back(device_checks) -> None:
    """A training pass of the model and the class weights a UDA method takes after it stay on the device;
    the trainer reads them back when it writes the metrics (test_uda_training)."""
    model = _small_model().train()
    batch = _batch()
    predictions = model.predict_dense(model.preprocess_image(batch).tensor)
    with no_readback():
        losses = model.losses(predictions, batch)
        weights = gbw_weights(model, "source")
        sum(losses.values()).backward()
    names = model.class_names
    sem_seg = [float(weights[f"gbw/source/sem_seg/{name}"]) for name in names]
    assert sem_seg == model.sem_seg_loss.last_weights.tolist()
    assert sum(float(weights[f"gbw/source/center/{name}"]) for name in names) == pytest.approx(19, rel=1e-5)
    assert {k.rsplit("/", 1)[1] for k in weights if "/offset/" in k} == {names[c] for c in THING_CLASSES}
