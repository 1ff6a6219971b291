"""Per-class squared gradient norms of dense losses, computed analytically (no autograd).

GBW needs, for every class c, the squared norm g_c^2 of the gradient of
the sum of per-class mean losses ``sum_c L_c`` with respect to the network output. Both functions
here evaluate that gradient in closed form in a few fused tensor passes, in float32 whatever the
input precision, without a second backward pass and, on a GPU, without host synchronisation.
The input checks read values back only where that costs nothing (:func:`host_checks`): on the CPU a
label outside ``[0, C) ∪ {ignore_index}`` or a NaN/inf input raises ``ValueError`` naming the tensor
and the value; on a GPU the label check is a device-side assertion and non-finite inputs make the
norms NaN (see :func:`check_class_map` and :func:`check_finite_norms`).
The cross-entropy norms have one implementation, :class:`_CrossEntropyWithGradNorms`: the loss
computes them from the log-softmax of its forward pass, and :func:`ce_grad_sq_norms` runs the same
forward without a graph.

Per-class mean loss, with N_c the number of pixels of class c that the loss covers (labelled and,
when pixel weights are given, with a non-zero weight) and q_i the pixel weight (1 when absent)::

    L_c = 1 / (N_c + 1) * sum_{i: y_i = c} q_i * loss_i
"""
from typing import NamedTuple, Optional, Tuple

import torch

__all__ = [
    "ce_grad_sq_norms",
    "regression_grad_sq_norms",
    "check_class_map",
    "group_pixels",
    "PixelGroups",
    "cross_entropy_with_grad_sq_norms",
    "regression_sq_norms_from_groups",
    "check_shapes",
    "check_finite_norms",
    "host_checks",
]

CE_MODES = ("channel", "class")
REGRESSION_KINDS = ("mse", "l1")


def host_checks(tensor: torch.Tensor) -> bool:
    """Whether the input checks may read values of ``tensor`` back to the host: True on the CPU,
    where that costs nothing. Elsewhere a readback would make the host wait for the device at every
    loss call, so the checks stay on the device (a device-side assertion, NaN propagation)."""
    return tensor.device.type == "cpu"


def _safe_class_map(
    class_map: torch.Tensor, num_classes: int, ignore_index: int, name: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate a class map (:func:`check_class_map`) and return ``(safe, ignored)``: int64 with
    ``ignore_index`` replaced by 0, and the bool mask of ignored entries."""
    _check_dtype(class_map, name)
    ignored = class_map == ignore_index
    safe = torch.where(ignored, 0, class_map.long())
    if safe.numel() == 0:
        return safe, ignored
    low, high = torch.aminmax(safe)
    if host_checks(safe):
        low, high = low.item(), high.item()
        if low < 0 or high >= num_classes:
            raise _invalid_class_error(name, low if low < 0 else high, num_classes, ignore_index)
    else:
        torch._assert_async(
            (low >= 0) & (high < num_classes),
            f"{name} holds a value outside [0, {num_classes}) that is not the ignore value {ignore_index}",
        )
    return safe, ignored


def check_class_map(
    class_map: torch.Tensor, num_classes: int, ignore_index: int, name: str = "labels"
) -> None:
    """Check that every entry of ``class_map`` is in ``[0, num_classes)`` or is ``ignore_index``.

    On the CPU a bad entry raises ``ValueError`` naming ``name`` and the value. Elsewhere the check
    is a device-side assertion (``torch._assert_async``), with no host synchronisation: a bad
    entry stops the process with a CUDA error at a later kernel launch, as PyTorch's own
    ``cross_entropy`` does for an out-of-range target.
    """
    _safe_class_map(class_map, num_classes, ignore_index, name)


def _raise_non_finite(tensors: Tuple[Tuple[str, Optional[torch.Tensor]], ...]) -> None:
    """Raise ``ValueError`` naming the first tensor of ``(name, tensor)`` pairs with a NaN/inf."""
    for name, tensor in tensors:
        if tensor is None:
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            value = float(tensor[~finite][0])
            raise ValueError(f"{name} contains the non-finite value {value}; expected finite values")
    raise ValueError(f"non-finite result from finite {', '.join(n for n, _ in tensors)}")


def check_finite_norms(sq_norms: torch.Tensor, *tensors: Tuple[str, Optional[torch.Tensor]]) -> torch.Tensor:
    """Check that the squared norms [C] are finite: non-finite inputs make them non-finite, so only
    the C-vector is checked.

    On the CPU return ``sq_norms`` if finite, else raise ``ValueError`` naming the non-finite input
    among the ``(name, tensor)`` pairs. Elsewhere (no host synchronisation) return ``sq_norms`` if
    finite, else all NaN: the class weights and the weighted loss are then NaN, which the trainer
    reports at its per-step loss readback (Detectron2: ``FloatingPointError``, loss became NaN).
    """
    finite = torch.isfinite(sq_norms).all()
    if not host_checks(sq_norms):
        return torch.where(finite, sq_norms, torch.nan)
    if not finite.item():
        _raise_non_finite(tensors)
    return sq_norms


class PixelGroups(NamedTuple):
    """Pixels of a loss call grouped by class (see :func:`group_pixels`)."""

    safe_class_map: torch.Tensor  # int64 [B, H, W], ignored pixels given some class in [0, C)
    counts: torch.Tensor  # float32 [C], N_c: covered pixels per class
    scale: torch.Tensor  # float32 [B, H, W], q_i / (N_{y_i} + 1), 0 where not covered


# Largest label value for which :func:`group_pixels` counts with a histogram of the raw labels.
HISTOGRAM_MAX_LABEL = 1 << 16


def _check_dtype(class_map: torch.Tensor, name: str) -> None:
    if class_map.dtype.is_floating_point or class_map.dtype == torch.bool or class_map.is_complex():
        raise ValueError(f"{name} must be an integer tensor of class ids, got dtype {class_map.dtype}")


def _invalid_class_error(name: str, value: int, num_classes: int, ignore_index: int) -> ValueError:
    return ValueError(
        f"{name} contains the value {value}; expected class ids in [0, {num_classes}) or the ignore "
        f"value {ignore_index}"
    )


def _group_pixels_by_histogram(
    class_map: torch.Tensor,
    num_classes: int,
    ignore_index: int,
    pixel_weights: Optional[torch.Tensor],
    name: str,
) -> PixelGroups:
    """:func:`group_pixels` for non-negative labels: one histogram of the raw labels both
    validates them and counts the pixels, and a lookup table indexed by label gives the scale."""
    flat = class_map.flatten().long()
    histogram = torch.bincount(flat, minlength=num_classes)
    bins = histogram.numel()
    stray = histogram[num_classes:].clone()
    if num_classes <= ignore_index < bins:
        stray[ignore_index - num_classes] = 0
    if bool(stray.any()):
        raise _invalid_class_error(name, num_classes + int(stray.nonzero()[0]), num_classes, ignore_index)
    if pixel_weights is None:
        counts = histogram[:num_classes].float()
    else:
        weighted = (pixel_weights != 0).flatten().float()
        counts = torch.bincount(flat, weights=weighted, minlength=num_classes)[:num_classes].float()
    if 0 <= ignore_index < num_classes:
        counts[ignore_index] = 0.0
    table = torch.zeros(bins, dtype=torch.float32, device=class_map.device)
    table[:num_classes] = 1.0 / (counts + 1.0)
    if 0 <= ignore_index < bins:
        table[ignore_index] = 0.0
    scale = table.index_select(0, flat).view(class_map.shape)
    if pixel_weights is not None:
        scale = scale * pixel_weights.float()
    safe = flat.clamp(0, num_classes - 1).view(class_map.shape)
    return PixelGroups(safe, counts, scale)


def group_pixels(
    class_map: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    pixel_weights: Optional[torch.Tensor] = None,
    name: str = "labels",
) -> PixelGroups:
    """Validate ``class_map`` and compute the per-class pixel counts and each pixel's factor in
    ``sum_c L_c`` (module docstring). A pixel is covered when its class is not ``ignore_index``
    and, if ``pixel_weights`` is given, its weight is not 0.

    Args:
        class_map: int tensor [B, H, W] of class ids or ``ignore_index``.
        num_classes: number of classes C.
        pixel_weights: float tensor [B, H, W] or None (all ones).
        name: name of ``class_map`` in error messages.

    Raises:
        ValueError: ``class_map`` is not an integer tensor or, on the CPU, holds a value outside
            ``[0, C) ∪ {ignore_index}`` (named in the message; elsewhere a device-side assertion,
            see :func:`check_class_map`).
    """
    _check_dtype(class_map, name)
    if host_checks(class_map) and class_map.numel() > 0:
        # On the CPU a histogram is the fastest way to validate and count; elsewhere (where
        # bincount reads its size back from the device) the general path checks on the device.
        low, high = torch.stack(torch.aminmax(class_map.flatten())).tolist()
        if low >= 0 and high <= max(HISTOGRAM_MAX_LABEL, num_classes - 1):
            return _group_pixels_by_histogram(class_map, num_classes, ignore_index, pixel_weights, name)
    safe, ignored = _safe_class_map(class_map, num_classes, ignore_index, name)
    if pixel_weights is not None:
        ignored = ignored | (pixel_weights == 0)
    covered = torch.where(ignored, 0.0, 1.0)
    counts = torch.zeros(num_classes, dtype=torch.float32, device=class_map.device)
    counts.scatter_add_(0, safe.flatten(), covered.flatten())
    scale = covered / (counts + 1.0).take(safe)
    if pixel_weights is not None:
        scale = scale * pixel_weights.float()
    return PixelGroups(safe, counts, scale)


def _check_dense(tensor: torch.Tensor, name: str, shape: Tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {what} = {shape}, got {tuple(tensor.shape)}")


def check_shapes(
    output: Tuple[str, torch.Tensor],
    class_map: Tuple[str, torch.Tensor],
    pixel_weights: Tuple[str, Optional[torch.Tensor]],
) -> None:
    """Check that the ``(name, tensor)`` class map [B, H, W] and optional pixel weights [B, H, W]
    match the network output [B, *, H, W]."""
    output_name, output_tensor = output
    if output_tensor.dim() != 4:
        raise ValueError(f"{output_name} must have shape [B, C, H, W], got {tuple(output_tensor.shape)}")
    batch, _, height, width = output_tensor.shape
    what = f"[B, H, W] of {output_name}"
    _check_dense(class_map[1], class_map[0], (batch, height, width), what)
    if pixel_weights[1] is not None:
        _check_dense(pixel_weights[1], pixel_weights[0], (batch, height, width), what)


def _residual_sq_norms(
    log_probs: torch.Tensor, safe_class_map: torch.Tensor, scale: torch.Tensor, mode: str, by_label: bool
) -> torch.Tensor:
    """Turn ``log_probs`` (float32 [B, C, H, W], log-softmax) in place into the gradient of
    ``sum_c L_c``, ``scale_i * (softmax_i - onehot(y_i))``, and return its squared per-class norms
    ([C]; with ``by_label`` in ``"channel"`` mode the [C, C] matrix whose row y holds the share of
    the pixels of class y in each channel norm, which sums over its rows to the norms).

    The label entry ``p_y - 1`` is formed as ``-sum_{k != y} p_k``, which keeps float32 relative
    precision for confident pixels, where ``p_y - 1`` would be rounding error."""
    label_index = safe_class_map.unsqueeze(1)
    residual = log_probs.exp_().scatter_(1, label_index, 0.0)
    residual.scatter_(1, label_index, residual.sum(dim=1, keepdim=True).neg_())
    residual.mul_(scale.unsqueeze(1))
    num_classes = residual.shape[1]
    if mode == "channel" and by_label:
        pixel_sq = residual.square().permute(0, 2, 3, 1).reshape(-1, num_classes)
        sq_norms = torch.zeros(num_classes, num_classes, dtype=torch.float32, device=residual.device)
        return sq_norms.index_add_(0, safe_class_map.flatten(), pixel_sq)
    if mode == "channel":
        # Norms along the contiguous pixel axis, then over the batch: much faster on CPU than
        # one reduction over the strided dims (0, 2, 3).
        return torch.linalg.vector_norm(residual.flatten(2), dim=2).square().sum(dim=0)
    pixel_sq = torch.linalg.vector_norm(residual, dim=1).square()
    sq_norms = torch.zeros(num_classes, dtype=torch.float32, device=residual.device)
    return sq_norms.scatter_add_(0, safe_class_map.flatten(), pixel_sq.flatten())


class _CrossEntropyWithGradNorms(torch.autograd.Function):
    """Per-pixel cross-entropy and the GBW gradient norms from one log-softmax.

    The scaled residual ``s_i * (softmax(z)_i - onehot(y_i))`` computed for the norms is kept for
    the backward pass: the gradient of the per-pixel loss is ``residual / s_i``, so the backward
    is one multiplication instead of PyTorch's log-softmax and NLL backward kernels.
    """

    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, safe_class_map: torch.Tensor, scale: torch.Tensor, mode: str, by_label: bool
    ):
        residual = torch.log_softmax(logits, dim=1)
        pixel_losses = torch.where(scale > 0, -residual.gather(1, safe_class_map.unsqueeze(1)).squeeze(1), 0.0)
        sq_norms = _residual_sq_norms(residual, safe_class_map, scale, mode, by_label)
        ctx.save_for_backward(residual, scale)
        ctx.mark_non_differentiable(sq_norms)
        return pixel_losses, sq_norms

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_pixel_losses: torch.Tensor, _grad_sq_norms: Optional[torch.Tensor]):
        residual, scale = ctx.saved_tensors
        covered = scale > 0
        factor = torch.where(covered, grad_pixel_losses / torch.where(covered, scale, 1.0), 0.0)
        return residual * factor.unsqueeze(1), None, None, None, None


def cross_entropy_with_grad_sq_norms(
    logits: torch.Tensor, groups: PixelGroups, mode: str = "channel", by_label: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel cross-entropy and the squared norms of :func:`ce_grad_sq_norms` in one pass.

    Args:
        logits: float32 tensor [B, C, H, W] (may require grad).
        groups: :func:`group_pixels` of the labels (and pixel weights).
        mode: ``"channel"`` or ``"class"``.
        by_label: in ``"channel"`` mode, return the norms split by the pixels' class (see Returns),
            which :func:`~gbw_panoptic.gbw.distributed.global_class_statistics` needs.

    Returns:
        ``(pixel_losses, sq_norms)``: float32 [B, H, W], ``-log softmax(z)[y_i]`` on covered
        pixels and 0 elsewhere (differentiable w.r.t. ``logits``); float32 [C] (constant), or with
        ``by_label`` in ``"channel"`` mode [C, C], row y the share of the pixels of class y in each
        channel norm (the rows sum to the [C] norms).
    """
    if mode not in CE_MODES:
        raise ValueError(f"mode must be one of {CE_MODES}, got {mode!r}")
    return _CrossEntropyWithGradNorms.apply(logits, groups.safe_class_map, groups.scale, mode, by_label)


def ce_grad_sq_norms(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 255,
    mode: str = "channel",
    pixel_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Squared per-class norms g_c^2 of the gradient of ``sum_c L_c`` (cross-entropy) w.r.t. logits.

    The gradient is ``G[i, k] = s_i * (softmax(z)[i, k] - [k == y_i])`` with
    ``s_i = q_i / (N_{y_i} + 1)`` and 0 on ignored pixels.

    Args:
        logits: float tensor [B, C, H, W] (any float dtype; computed in float32).
        labels: int tensor [B, H, W] with values in [0, C) or ``ignore_index``.
        ignore_index: label of pixels without a class.
        mode: ``"channel"``: ``g_c^2 = sum_i G[i, c]^2`` over all pixels (the authors' definition);
            ``"class"``: ``g_c^2 = sum_{i: y_i = c} sum_k G[i, k]^2``, the squared norm of the
            gradient of L_c alone.
        pixel_weights: optional float tensor [B, H, W] of per-pixel loss weights q_i; pixels with
            weight 0 are not counted in N_c.

    Returns:
        float32 tensor [C] of squared norms (units: squared loss per logit), on the logits' device.
    """
    if mode not in CE_MODES:
        raise ValueError(f"mode must be one of {CE_MODES}, got {mode!r}")
    check_shapes(("logits", logits), ("labels", labels), ("pixel_weights", pixel_weights))
    groups = group_pixels(labels, logits.shape[1], ignore_index, pixel_weights, "labels")
    with torch.no_grad():
        _, sq_norms = cross_entropy_with_grad_sq_norms(logits.detach().float(), groups, mode)
    return check_finite_norms(sq_norms, ("logits", logits), ("pixel_weights", pixel_weights))


def regression_sq_norms_from_groups(
    pred: torch.Tensor, target: torch.Tensor, groups: PixelGroups, kind: str = "mse"
) -> torch.Tensor:
    """The norms of :func:`regression_grad_sq_norms` for pixels already grouped by class."""
    if kind not in REGRESSION_KINDS:
        raise ValueError(f"kind must be one of {REGRESSION_KINDS}, got {kind!r}")
    with torch.no_grad():
        diff = pred.detach().float() - target.detach().float()
        if kind == "mse":
            per_pixel = diff.square().sum(dim=1) * 4.0
        else:
            # sign(NaN) is 0; adding (diff - diff), 0 or NaN, keeps non-finite inputs visible.
            per_pixel = (diff.sign().square() + (diff - diff)).sum(dim=1)
        per_pixel = per_pixel * groups.scale.square()
        sq_norms = torch.zeros(groups.counts.numel(), dtype=torch.float32, device=pred.device)
        sq_norms.scatter_add_(0, groups.safe_class_map.flatten(), per_pixel.flatten())
    return check_finite_norms(sq_norms, ("pred", pred), ("target", target), ("pixel_weights", groups.scale))


def regression_grad_sq_norms(
    pred: torch.Tensor,
    target: torch.Tensor,
    pixel_class: torch.Tensor,
    pixel_weight: Optional[torch.Tensor],
    num_classes: int,
    kind: str = "mse",
    ignore_index: int = 255,
) -> torch.Tensor:
    """Squared per-class norms of the gradient of ``sum_c L_c`` (dense regression) w.r.t. ``pred``.

    ``loss_i = sum_k (pred[i, k] - target[i, k])^2`` (``"mse"``, center heatmap) or
    ``sum_k |pred[i, k] - target[i, k]|`` (``"l1"``, offsets); pixels are grouped by their class
    in ``pixel_class``. ``g_c^2 = sum_{i: class_i = c} sum_k G[i, k]^2`` with
    ``G[i, k] = s_i * 2 (pred - target)`` (mse) or ``s_i * sign(pred - target)`` (l1).

    Args:
        pred: float tensor [B, K, H, W] (K = 1 for the center heatmap, 2 for the offsets).
        target: float tensor [B, K, H, W].
        pixel_class: int tensor [B, H, W], class of each pixel or ``ignore_index``.
        pixel_weight: float tensor [B, H, W] of loss weights (0 = not covered) or None (all ones).
        num_classes: number of classes C.
        kind: ``"mse"`` or ``"l1"``.

    Returns:
        float32 tensor [C] of squared norms, on ``pred``'s device.
    """
    check_shapes(("pred", pred), ("pixel_class", pixel_class), ("pixel_weight", pixel_weight))
    _check_dense(target, "target", tuple(pred.shape), "[B, K, H, W] of pred")
    groups = group_pixels(pixel_class, num_classes, ignore_index, pixel_weight, "pixel_class")
    return regression_sq_norms_from_groups(pred, target, groups, kind)
