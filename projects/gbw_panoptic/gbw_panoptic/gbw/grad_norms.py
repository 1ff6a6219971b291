"""Per-class squared gradient norms of dense losses, computed analytically (no autograd).

GBW (DESIGN §2.1-2.3, §2.8) needs, for every class c, the squared norm g_c^2 of the gradient of
the sum of per-class mean losses ``sum_c L_c`` with respect to the network output. Both functions
here evaluate that gradient in closed form in a few fused tensor passes, in float32 whatever the
input precision, without a second backward pass and without host synchronisation (apart from the
input checks, which read back one flag).

Per-class mean loss, with N_c the number of pixels of class c that the loss covers (labelled and,
when pixel weights are given, with a non-zero weight) and q_i the pixel weight (1 when absent)::

    L_c = 1 / (N_c + 1) * sum_{i: y_i = c} q_i * loss_i
"""
from typing import Optional, Tuple

import torch

__all__ = ["ce_grad_sq_norms", "regression_grad_sq_norms", "class_pixel_counts", "check_class_map"]

CE_MODES = ("channel", "class")
REGRESSION_KINDS = ("mse", "l1")


def check_class_map(
    class_map: torch.Tensor, num_classes: int, ignore_index: int, name: str = "labels"
) -> None:
    """Raise ``ValueError`` unless every entry of ``class_map`` is in ``[0, num_classes)`` or is
    ``ignore_index``. Reads back one value from the device (the first offending label, if any)."""
    if class_map.dtype.is_floating_point or class_map.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of class ids, got dtype {class_map.dtype}")
    bad = ((class_map < 0) | (class_map >= num_classes)) & (class_map != ignore_index)
    if bool(bad.any()):
        value = int(class_map[bad][0])
        raise ValueError(
            f"{name} contains the value {value}; expected class ids in [0, {num_classes}) "
            f"or the ignore value {ignore_index}"
        )


def _raise_non_finite(tensors: Tuple[Tuple[str, torch.Tensor], ...]) -> None:
    """Raise ``ValueError`` naming the first tensor of ``(name, tensor)`` pairs with a NaN/inf."""
    for name, tensor in tensors:
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            value = float(tensor[~finite][0])
            raise ValueError(f"{name} contains the non-finite value {value}; expected finite values")
    raise ValueError(f"non-finite gradient norms from finite {', '.join(n for n, _ in tensors)}")


def _check_finite_norms(sq_norms: torch.Tensor, *tensors: Tuple[str, torch.Tensor]) -> torch.Tensor:
    """Non-finite inputs make the norms non-finite: check the C-vector, scan inputs only on failure."""
    if not bool(torch.isfinite(sq_norms).all()):
        _raise_non_finite(tensors)
    return sq_norms


def _pixel_scale(
    class_map: torch.Tensor,
    num_classes: int,
    ignore_index: int,
    pixel_weights: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factor of each pixel in ``sum_c L_c``: ``q_i / (N_{y_i} + 1)``, 0 where not covered.

    Args:
        class_map: int tensor [B, H, W] of class ids (``ignore_index`` = not covered).
        pixel_weights: float tensor [B, H, W] or None (all ones).

    Returns:
        ``(scale, safe_class_map, counts)``: float32 [B, H, W]; int64 [B, H, W] with uncovered
        pixels mapped to class 0 (their scale is 0); float32 [C] pixel counts N_c.
    """
    covered = class_map != ignore_index
    if pixel_weights is not None:
        covered = covered & (pixel_weights != 0)
    safe_map = torch.where(covered, class_map, torch.zeros_like(class_map)).long()
    counts = torch.zeros(num_classes, dtype=torch.float32, device=class_map.device)
    counts.scatter_add_(0, safe_map.flatten(), covered.flatten().float())
    scale = covered.float() / (counts[safe_map] + 1.0)
    if pixel_weights is not None:
        scale = scale * pixel_weights.float()
    return scale, safe_map, counts


def _check_dense(tensor: torch.Tensor, name: str, shape: Tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {what} = {shape}, got {tuple(tensor.shape)}")


def _check_pixel_maps(
    output: Tuple[str, torch.Tensor],
    class_map: Tuple[str, torch.Tensor],
    pixel_weights: Tuple[str, Optional[torch.Tensor]],
    num_classes: int,
    ignore_index: int,
) -> None:
    """Check that the ``(name, tensor)`` class map [B, H, W] and optional pixel weights [B, H, W]
    match the network output [B, *, H, W], and that the class map holds valid class ids."""
    output_name, output_tensor = output
    if output_tensor.dim() != 4:
        raise ValueError(f"{output_name} must have shape [B, C, H, W], got {tuple(output_tensor.shape)}")
    batch, _, height, width = output_tensor.shape
    what = f"[B, H, W] of {output_name}"
    _check_dense(class_map[1], class_map[0], (batch, height, width), what)
    if pixel_weights[1] is not None:
        _check_dense(pixel_weights[1], pixel_weights[0], (batch, height, width), what)
    check_class_map(class_map[1], num_classes, ignore_index, class_map[0])


def ce_grad_sq_norms(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 255,
    mode: str = "channel",
    pixel_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Squared per-class norms g_c^2 of the gradient of ``sum_c L_c`` (cross-entropy) w.r.t. logits.

    The gradient is ``G[i, k] = s_i * (softmax(z)[i, k] - [k == y_i])`` with
    ``s_i = q_i / (N_{y_i} + 1)`` and 0 on ignored pixels (DESIGN §2.2).

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
    num_classes = logits.shape[1] if logits.dim() == 4 else 0
    _check_pixel_maps(
        ("logits", logits), ("labels", labels), ("pixel_weights", pixel_weights), num_classes, ignore_index
    )

    scale, safe_labels, _ = _pixel_scale(labels, num_classes, ignore_index, pixel_weights)
    with torch.no_grad():
        residual = torch.softmax(logits.detach().float(), dim=1)
        # Subtract the one-hot target; uncovered pixels are zeroed by the scale just after.
        label_index = safe_labels.unsqueeze(1)
        residual.scatter_add_(1, label_index, residual.new_full(label_index.shape, -1.0))
        residual.mul_(scale.unsqueeze(1))
        if mode == "channel":
            sq_norms = torch.linalg.vector_norm(residual, dim=(0, 2, 3)).square()
        else:
            pixel_sq = residual.square_().sum(dim=1)
            sq_norms = torch.zeros(num_classes, dtype=torch.float32, device=logits.device)
            sq_norms.scatter_add_(0, safe_labels.flatten(), pixel_sq.flatten())
    return _check_finite_norms(sq_norms, ("logits", logits))


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
    in ``pixel_class`` (DESIGN §2.8). ``g_c^2 = sum_{i: class_i = c} sum_k G[i, k]^2`` with
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
    if kind not in REGRESSION_KINDS:
        raise ValueError(f"kind must be one of {REGRESSION_KINDS}, got {kind!r}")
    _check_pixel_maps(
        ("pred", pred), ("pixel_class", pixel_class), ("pixel_weight", pixel_weight), num_classes, ignore_index
    )
    _check_dense(target, "target", tuple(pred.shape), "[B, K, H, W] of pred")

    scale, safe_class, _ = _pixel_scale(pixel_class, num_classes, ignore_index, pixel_weight)
    with torch.no_grad():
        diff = pred.detach().float() - target.detach().float()
        if kind == "mse":
            per_pixel = diff.square().sum(dim=1) * 4.0
        else:
            # sign(NaN) is 0; adding (diff - diff), 0 or NaN, keeps non-finite inputs visible.
            per_pixel = (diff.sign().square() + (diff - diff)).sum(dim=1)
        per_pixel = per_pixel * scale.square()
        sq_norms = torch.zeros(num_classes, dtype=torch.float32, device=pred.device)
        sq_norms.scatter_add_(0, safe_class.flatten(), per_pixel.flatten())
    return _check_finite_norms(sq_norms, ("pred", pred), ("target", target))


def class_pixel_counts(
    class_map: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    pixel_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """float32 [C]: number of pixels of each class that a loss covers (N_c of the module docs)."""
    return _pixel_scale(class_map, num_classes, ignore_index, pixel_weights)[2]

