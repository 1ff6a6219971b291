"""Dense losses with Gradient-based class Weighting (GBW), as drop-in ``nn.Module`` s.

At every call the module computes the squared per-class gradient norms of the loss analytically
(:mod:`.grad_norms`), turns them into class weights with the QP of :mod:`.qp`, and weights each
pixel's loss by the (detached) weight of its class::

    loss_i = q_i * w_{y_i} * base_loss_i

where q_i is the given per-pixel weight (pseudo-label confidence, center/offset weights; 1 if
absent). With ``enabled=False`` the class weights are not computed and the loss is exactly the
unweighted one.

Pixel weights and the class weights of the cross-entropy: by default (the authors' code) the class
weights come from the gradient of the *unweighted* per-class mean cross-entropy, every labelled
pixel counts in N_c, and q_i enters only the final reduction. With ``pixel_weights_in_norms=True``
the norms are those of the gradient of the weighted loss: q_i scales each pixel's gradient and
pixels with q_i = 0 leave N_c. The regression losses always take their pixel weights into the
norms: there the weights say which pixels the loss covers at all (crowd, stuff in the offsets).

On a GPU a call adds no host synchronisation (with the default ``solver="projection"``): the input
checks stay on the device, as :mod:`.grad_norms` describes, and so do the solved class weights, which
the module keeps as ``last_weights`` until its next call (for logging; reading them back is the
caller's choice). The cross-entropy keeps the per-class statistics the weights were solved from as
``last_class_statistics``, likewise.

Several processes (``torch.distributed`` initialised with a world size > 1, e.g. one per GPU under
DistributedDataParallel): each call sums the per-class statistics of all processes in one
all-reduce (:mod:`.distributed`), so that every process gets the class weights one process would
compute on the whole batch; every process must therefore make the same loss calls. The weight sums
that normalise the regression losses are summed likewise, so that the gradients DDP averages are
those of the whole batch. With one process nothing changes.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .grad_norms import (
    REGRESSION_KINDS,
    cross_entropy_with_grad_sq_norms,
    check_class_map,
    check_finite_norms,
    check_shapes,
    group_pixels,
    regression_sq_norms_from_groups,
)
from .distributed import all_reduce_sum, global_class_statistics, world_size
from .qp import LAMBDA_MODES, SOLVERS, qp_class_weights

__all__ = ["GBWCrossEntropyLoss", "GBWRegressionLoss"]

REGRESSION_NORMALIZERS = ("weight_sum", "channel_weight_sum", "mean")


class _ClassWeighting(nn.Module):
    """Shared state of the GBW losses: QP settings, active classes and ``last_weights``.

    Attributes:
        last_weights: float32 [C] class weights of the last call (detached, on the inputs' device);
            None when disabled. Inactive classes have weight 0.
        last_class_statistics: the cross-entropy's per-class statistics of the last call, float32 [C]
            each, detached, on the device, of the whole batch (summed over the processes):
            ``"sq_norm"`` the squared gradient norm g_c^2 the weights were solved from, ``"pixels"`` the
            pixel count N_c, ``"ce"`` the mean unweighted cross-entropy over the class's pixels (0 for
            a class without pixels); None when disabled and for the regression losses.
        active_classes: the ids of the classes that share the simplex, increasing (all C classes unless
            given).
        fixed_active: bool [C] buffer, True at ``active_classes``.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int,
        enabled: bool,
        lam: float,
        lam_mode: str,
        solver: str,
        active_classes: Optional[Sequence[int]],
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if lam_mode not in LAMBDA_MODES:
            raise ValueError(f"lam_mode must be one of {LAMBDA_MODES}, got {lam_mode!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if not lam > 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.enabled = enabled
        self.lam = lam
        self.lam_mode = lam_mode
        self.solver = solver
        ids = list(range(num_classes)) if active_classes is None else [int(c) for c in active_classes]
        if not ids or any(not 0 <= c < num_classes for c in ids):
            raise ValueError(f"active_classes must be non-empty ids in [0, {num_classes}), got {ids}")
        self.active_classes: Tuple[int, ...] = tuple(sorted(set(ids)))
        fixed_active = torch.zeros(num_classes, dtype=torch.bool)
        fixed_active[list(self.active_classes)] = True
        self.register_buffer("fixed_active", fixed_active, persistent=False)
        # Class weights [C] used by the last forward call (detached), None when GBW is disabled.
        self.last_weights: Optional[torch.Tensor] = None
        self.last_class_statistics: Optional[Dict[str, torch.Tensor]] = None

    def class_weights(self, sq_norms: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Detached float32 class weights [C] from this process's squared norms and covered pixel
        counts [C] (see :meth:`class_weights_and_sums` for several processes)."""
        return self.class_weights_and_sums(sq_norms, counts)[0]

    def class_weights_and_sums(
        self, sq_norms: torch.Tensor, counts: torch.Tensor, *sums: torch.Tensor
    ) -> Tuple[torch.Tensor, ...]:
        """The class weights and ``sums`` of the whole batch.

        With one process: ``(weights, *sums)``, the weights solved from ``sq_norms`` [C] and
        ``counts`` [C]. With several, ``sq_norms`` is as
        :func:`~gbw_panoptic.gbw.distributed.global_class_statistics` takes it ([C], or [C, C] split
        by the pixels' class in the cross-entropy's ``"channel"`` mode); the norms, counts and
        ``sums`` of all processes are summed in one all-reduce and the weights solved from the
        totals, the same in every process.

        Returns:
            detached float32 class weights [C], the squared norms [C] and counts [C] they were solved
            from (of the whole batch), then the (summed) ``sums``.
        """
        if world_size() > 1:
            sq_norms, counts, *sums = global_class_statistics(sq_norms, counts, *sums)
        active = self.fixed_active.to(sq_norms.device)
        weights = qp_class_weights(sq_norms, self.lam, self.lam_mode, self.solver, active).float()
        self.last_weights = weights.detach()
        return (self.last_weights, sq_norms.detach(), counts, *sums)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, enabled={self.enabled}, lam={self.lam}, "
            f"lam_mode={self.lam_mode!r}, solver={self.solver!r}, "
            f"active_classes={list(self.active_classes)}"
        )


class GBWCrossEntropyLoss(_ClassWeighting):
    """Pixel-wise cross-entropy with GBW class weights.

    Reduction: mean over all B*H*W pixels, ignored pixels counting as 0 (Detectron2's
    ``DeepLabCE`` with ``top_k_percent_pixels=1.0``); with ``enabled=False`` the result equals
    ``DeepLabCE`` bit for bit.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        enabled: bool = True,
        lam: float = 1.0,
        lam_mode: str = "absolute",
        solver: str = "projection",
        mode: str = "channel",
        active_classes: Optional[Sequence[int]] = None,
        pixel_weights_in_norms: bool = False,
        fixed_class_weights: Optional[Sequence[float]] = None,
    ):
        """
        Args:
            num_classes: number of classes C (logit channels).
            ignore_index: label of unlabelled pixels.
            enabled: compute and apply GBW class weights; False gives the plain loss.
            lam, lam_mode, solver: see :func:`~gbw_panoptic.gbw.qp_class_weights`.
            mode: gradient norm definition, ``"channel"`` or ``"class"``
                (see :func:`~gbw_panoptic.gbw.ce_grad_sq_norms`).
            active_classes: ids of the classes that share the simplex (None: all C classes, the
                reference: classes absent from the batch keep a share); the others get weight 0.
            pixel_weights_in_norms: False (the authors' code): the class weights come from the
                unweighted cross-entropy and every labelled pixel counts in N_c; the pixel weights
                enter only the reduction. True: the pixel weights scale each pixel's gradient in
                the norms and zero-weight pixels are not counted in N_c.
            fixed_class_weights: optional [C] static class weights (e.g. :func:`.median_frequency_weights`)
                applied as ``q_i * w_{y_i} * CE_i`` instead of GBW's; only with ``enabled=False``.
        """
        super().__init__(num_classes, ignore_index, enabled, lam, lam_mode, solver, active_classes)
        if mode not in ("channel", "class"):
            raise ValueError(f"mode must be 'channel' or 'class', got {mode!r}")
        self.mode = mode
        self.pixel_weights_in_norms = pixel_weights_in_norms
        fixed = None
        if fixed_class_weights is not None:
            if enabled:
                raise ValueError("fixed_class_weights replace the GBW weights; pass them with enabled=False")
            fixed = torch.as_tensor(fixed_class_weights, dtype=torch.float32).flatten()
            if fixed.numel() != num_classes or not bool(torch.isfinite(fixed).all()) or bool((fixed < 0).any()):
                raise ValueError(
                    f"fixed_class_weights must be {num_classes} finite weights >= 0, got {fixed.tolist()}"
                )
        self.register_buffer("fixed_class_weights", fixed, persistent=False)

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor, pixel_weights: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """
        Args:
            logits: float tensor [B, C, H, W] (fp16/bf16 are computed in float32).
            labels: int tensor [B, H, W], values in [0, C) or ``ignore_index``.
            pixel_weights: optional float tensor [B, H, W] of per-pixel weights q_i.

        Returns:
            float32 scalar loss.
        """
        if logits.dim() != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must have shape [B, {self.num_classes}, H, W], got {tuple(logits.shape)}")
        check_shapes(("logits", logits), ("labels", labels), ("pixel_weights", pixel_weights))
        logits = logits.float()
        if not self.enabled:
            check_class_map(labels, self.num_classes, self.ignore_index, "labels")
            self.last_weights = None
            self.last_class_statistics = None
            pixel_losses = F.cross_entropy(logits, labels.long(), ignore_index=self.ignore_index, reduction="none")
            if self.fixed_class_weights is not None:
                # Ignored pixels have loss 0 whatever weight they take.
                known = torch.where(labels == self.ignore_index, 0, labels).long()
                pixel_losses = pixel_losses * self.fixed_class_weights.take(known)
            loss = self._weighted_mean(pixel_losses, pixel_weights)
            # The finiteness check of the norms applied to the loss: on the CPU it raises naming the
            # non-finite input; elsewhere it passes the loss through (a non-finite loss stays so).
            return check_finite_norms(loss.reshape(1), ("logits", logits), ("pixel_weights", pixel_weights))[0]
        norm_weights = pixel_weights if self.pixel_weights_in_norms else None
        groups = group_pixels(labels, self.num_classes, self.ignore_index, norm_weights, "labels")
        pixel_losses, sq_norms = cross_entropy_with_grad_sq_norms(
            logits, groups, self.mode, by_label=world_size() > 1
        )
        if pixel_weights is not None and norm_weights is None:
            # Pixel weights outside the norms: 0 * their sum is NaN when one is not finite, so the
            # one finiteness check of the norms covers them too.
            probe = sq_norms + 0.0 * pixel_weights.sum()
        else:
            probe = sq_norms
        sq_norms = check_finite_norms(probe, ("logits", logits), ("pixel_weights", pixel_weights))
        # Per-class sums of the unweighted loss (uncovered pixels add 0), summed over the processes
        # in the weights' all-reduce.
        class_loss_sums = torch.zeros(self.num_classes, dtype=torch.float32, device=logits.device).index_add_(
            0, groups.safe_class_map.flatten(), pixel_losses.detach().flatten()
        )
        weights, sq_norms, counts, class_loss_sums = self.class_weights_and_sums(
            sq_norms, groups.counts, class_loss_sums
        )
        self.last_class_statistics = {
            "sq_norm": sq_norms, "pixels": counts, "ce": class_loss_sums / counts.clamp(min=1.0)
        }
        return self._weighted_mean(pixel_losses * weights.take(groups.safe_class_map), pixel_weights)

    @staticmethod
    def _weighted_mean(pixel_losses: torch.Tensor, pixel_weights: Optional[torch.Tensor]) -> torch.Tensor:
        """Mean over all pixels of the per-pixel losses [B, H, W] times the pixel weights (DeepLabCE)."""
        if pixel_weights is not None:
            pixel_losses = pixel_losses * pixel_weights
        return pixel_losses.contiguous().view(-1).mean()


class GBWRegressionLoss(_ClassWeighting):
    """Dense regression loss (center heatmap MSE or offset L1) with GBW weights per pixel class.

    ``loss = sum_{i,k} q_i * w_{class_i} * base(pred[i, k] - target[i, k]) / normalizer`` with
    ``normalizer = sum_i q_i`` (``"weight_sum"``, Panoptic-DeepLab and Detectron2), ``K * sum_i q_i``
    (``"channel_weight_sum"``, EDAPS: the weights expanded over the K prediction channels, i.e.
    2 * sum q for the offsets; the same as ``"weight_sum"`` for the 1-channel center heatmap) or
    the number of elements B*K*H*W (``"mean"``). With either weight sum the loss is 0 when no pixel
    has weight. Pixels whose class is ``ignore_index`` keep class weight 1.
    """

    def __init__(
        self,
        num_classes: int,
        kind: str = "mse",
        ignore_index: int = 255,
        enabled: bool = True,
        lam: float = 1.0,
        lam_mode: str = "absolute",
        solver: str = "projection",
        active_classes: Optional[Sequence[int]] = None,
        normalizer: str = "weight_sum",
    ):
        """
        Args:
            num_classes: number of classes C of the pixel class map.
            kind: ``"mse"`` (center heatmap) or ``"l1"`` (offsets).
            normalizer: ``"weight_sum"``, ``"channel_weight_sum"`` or ``"mean"`` (see the class
                docstring).
            others: as :class:`GBWCrossEntropyLoss`; for the offsets pass the thing class ids as
                ``active_classes``.
        """
        super().__init__(num_classes, ignore_index, enabled, lam, lam_mode, solver, active_classes)
        if kind not in REGRESSION_KINDS:
            raise ValueError(f"kind must be one of {REGRESSION_KINDS}, got {kind!r}")
        if normalizer not in REGRESSION_NORMALIZERS:
            raise ValueError(f"normalizer must be one of {REGRESSION_NORMALIZERS}, got {normalizer!r}")
        self.kind = kind
        self.normalizer = normalizer

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        pixel_class: torch.Tensor,
        pixel_weights: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            pred: float tensor [B, K, H, W] (K = 1 center heatmap, 2 offsets (dy, dx) in pixels).
            target: float tensor [B, K, H, W].
            pixel_class: int tensor [B, H, W], semantic class of each pixel or ``ignore_index``.
            pixel_weights: float tensor [B, H, W] (center / offset weights; 0 = not covered).

        Returns:
            float32 scalar loss.
        """
        pred = pred.float()
        target = target.float()
        if pixel_weights.shape != pixel_class.shape or pred.shape != target.shape or pred.dim() != 4:
            raise ValueError(
                f"expected pred and target [B, K, H, W], pixel_class and pixel_weights [B, H, W]; got "
                f"pred {tuple(pred.shape)}, target {tuple(target.shape)}, pixel_class "
                f"{tuple(pixel_class.shape)}, pixel_weights {tuple(pixel_weights.shape)}"
            )
        pixel_weights = pixel_weights.float()
        weight_sum = pixel_weights.sum()
        if self.normalizer == "channel_weight_sum":
            weight_sum = weight_sum * pred.shape[1]
        processes = world_size()
        # With several processes the weight sum is that of the whole batch (see the module docstring).
        global_weight_sum = processes > 1 and self.normalizer != "mean"
        if self.enabled:
            groups = group_pixels(pixel_class, self.num_classes, self.ignore_index, pixel_weights, "pixel_class")
            sq_norms = regression_sq_norms_from_groups(pred, target, groups, self.kind)
            if global_weight_sum:
                weights, _, _, weight_sum = self.class_weights_and_sums(sq_norms, groups.counts, weight_sum)
            else:
                weights = self.class_weights(sq_norms, groups.counts)
            ignored = pixel_class == self.ignore_index
            pixel_weights = pixel_weights * torch.where(ignored, 1.0, weights.take(groups.safe_class_map))
        else:
            self.last_weights = None
            if global_weight_sum:
                (weight_sum,) = all_reduce_sum(weight_sum)
        if self.kind == "mse":
            element_losses = F.mse_loss(pred, target, reduction="none")
        else:
            element_losses = F.l1_loss(pred, target, reduction="none")
        total = (element_losses * pixel_weights.unsqueeze(1)).sum()
        if global_weight_sum:
            # DDP averages the processes' gradients: each process's share of the total, times the
            # number of processes, averages to the gradient of the whole batch's loss.
            total = total * processes
        if self.normalizer == "mean":
            return total / element_losses.numel()
        has_weight = weight_sum > 0
        return torch.where(has_weight, total / torch.where(has_weight, weight_sum, 1.0), total * 0.0)
