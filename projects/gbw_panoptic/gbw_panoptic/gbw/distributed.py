"""GBW statistics of the whole batch when several processes train together (``torch.distributed``).

Each process sees only its part of the batch, so the squared gradient norms and the pixel counts it
forms are those of that part. The GBW losses sum them over the processes before solving for the
weights, so that every process gets the weights one process would compute on the whole batch.

The norms cannot simply be added: pixel i contributes ``(q_i / (N_{y_i} + 1))^2 * r_i^2`` (see
:mod:`.grad_norms`), where N_c is the count of class c over the *whole* batch. Each process therefore
removes its local ``1 / (N_c^local + 1)^2`` from the norms grouped by the pixels' class, the sums and
the counts travel in one all-reduce, and the global norms are formed after it. One collective, no
host synchronisation (NCCL and gloo alike).
"""
from typing import Tuple

import torch
import torch.distributed as dist

__all__ = ["world_size", "all_reduce_sum", "global_class_statistics"]


def world_size() -> int:
    """Number of processes of the default ``torch.distributed`` group; 1 when it is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The element-wise sums over all processes of float32 ``tensors`` (any shapes, one device), in one
    all-reduce of their concatenation; the inputs are not modified."""
    packed = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return tuple(part.view(t.shape) for part, t in zip(packed.split([t.numel() for t in tensors]), tensors))


def global_class_statistics(
    label_sq_norms: torch.Tensor, counts: torch.Tensor, *sums: torch.Tensor
) -> Tuple[torch.Tensor, ...]:
    """The squared norms and pixel counts of the whole batch from those of this process's part.

    Args:
        label_sq_norms: float32 [C] or [C, K]: entry (c, ...) is this process's sum over its pixels of
            class c of ``(q_i / (N_c^local + 1))^2 * r_i^2`` (``N_c^local`` = ``counts[c]``). [C]: the
            norm of class c itself (``"class"`` cross-entropy mode, the regression losses); [C, K]:
            row c holds class c's pixels' share of each of the K channel norms (``"channel"`` mode).
        counts: float32 [C], this process's pixel counts N_c^local.
        sums: further float32 tensors to sum over the processes in the same all-reduce.

    Returns:
        ``(sq_norms, counts, *sums)`` of the whole batch: float32 [C] for a [C] input, [K] (the
        channel norms, summed over the pixel classes) for a [C, K] input; [C]; the summed ``sums``.
    """
    local_scale = (counts + 1.0).square()
    scale_shape = (-1,) + (1,) * (label_sq_norms.dim() - 1)
    unnormalised = label_sq_norms * local_scale.view(scale_shape)
    unnormalised, total_counts, *total_sums = all_reduce_sum(unnormalised, counts, *sums)
    sq_norms = unnormalised / (total_counts + 1.0).square().view(scale_shape)
    if sq_norms.dim() == 2:
        sq_norms = sq_norms.sum(dim=0)
    return (sq_norms, total_counts, *total_sums)
