"""Batch norm over the whole batch of all training processes (``MODEL.SYNC_BN``: the trainer converts the
student's ``BatchNorm2d`` layers with :func:`convert_to_whole_batch_norm`).

With N processes each holds 1/N of the batch, and a plain ``BatchNorm2d`` normalises with the statistics
of that share. :class:`WholeBatchNorm2d` gathers each process's pixel count, mean and centred sum of
squares (one collective per layer, gloo and NCCL alike) and combines them exactly (Chan et al.'s
pairwise formula), so a training step of N processes normalises, back-propagates and updates its
running statistics as one process does on the whole batch, also when the processes' shares differ in
size (padding). Detectron2's ``NaiveSyncBatchNorm`` weighs every process equally and keeps the biased
variance in its running statistics; PyTorch's ``SyncBatchNorm`` runs on CUDA only.
"""
import torch
from detectron2.utils import comm
from fvcore.nn.distributed import differentiable_all_gather
from torch import nn

__all__ = ["WholeBatchNorm2d", "convert_to_whole_batch_norm"]


class WholeBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are those of the whole batch of all processes.

    In eval mode, or with one process, it is ``nn.BatchNorm2d`` (same parameters, buffers and checkpoint
    keys). In training mode every process must call it (a collective): the UDA passes run on every
    process alike.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """input: B x C x H x W (per-process B, H, W may differ) -> normalised B x C x H x W."""
        if not self.training or comm.get_world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        x = input.float()  # statistics in float32, as BatchNorm does under autocast
        count = x.new_tensor([x.numel() / x.shape[1]])
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        gathered = torch.stack(differentiable_all_gather(torch.cat([count, mean, var * count])))
        counts, means, centred = gathered[:, :1].detach(), gathered[:, 1:-x.shape[1]], gathered[:, -x.shape[1]:]
        total = counts.sum()
        mean = (counts * means).sum(dim=0) / total
        var = (centred.sum(dim=0) + (counts * (means - mean).square()).sum(dim=0)) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * (total / (total - 1)), momentum)  # unbiased, as BatchNorm2d
        scale = torch.rsqrt(var + self.eps) * (self.weight if self.affine else 1.0)
        shift = (self.bias if self.affine else 0.0) - mean * scale
        return (x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(input.dtype)


def convert_to_whole_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.BatchNorm2d`` (Detectron2's "BN"; not its subclasses, such as the frozen or
    synchronised variants) replaced by a :class:`WholeBatchNorm2d` that holds the same parameters, buffers and mode, as
    PyTorch's ``SyncBatchNorm.convert_sync_batchnorm``. Children are replaced in place; returns ``module``,
    or its replacement when it is itself a ``BatchNorm2d``."""
    if type(module) is nn.BatchNorm2d:
        converted = WholeBatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        return converted.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, convert_to_whole_batch_norm(child))
    return module
