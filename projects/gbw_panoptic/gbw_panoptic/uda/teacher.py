"""Mean teacher of DACS self-training: an exponential moving average of the student's weights."""
import copy

import torch
from torch import nn

__all__ = ["EMATeacher", "ema_alpha"]


def ema_alpha(iteration: int, alpha: float) -> float:
    """EMA coefficient at ``iteration``: ``min(1 - 1 / (iteration + 1), alpha)``.

    The ramp lets the teacher follow the student closely in the first iterations (coefficient 0 at
    iteration 0, 0.5 at iteration 1, ...) before it settles at ``alpha`` (0.999 in the reference).
    """
    return min(1.0 - 1.0 / (iteration + 1), alpha)


class EMATeacher(nn.Module):
    """A frozen copy of the student updated as ``teacher = a * teacher + (1 - a) * student``.

    The copy is made at construction (so the teacher starts equal to the student). Dropout and drop
    path are always off. As in the reference (DAFormer/EDAPS ``dacs.py``), batch-norm layers run in
    training mode, normalising with the statistics of the batch the teacher predicts on, and only the
    parameters are averaged (the teacher's buffers are its own, its running statistics are never used).

    The teacher only predicts pseudo-labels (:meth:`predict_sem_seg`): the heads of its other outputs
    (the instance head's center and offsets) never run. Their parameters are averaged all the same
    (the teacher stays an average of the whole student); their batch-norm running statistics, which no
    prediction reads, are not updated.
    """

    def __init__(self, student: nn.Module, alpha: float = 0.999):
        super().__init__()
        self.alpha = alpha
        self.model = copy.deepcopy(student)
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> "EMATeacher":
        """Whatever the mode of its parent, the teacher predicts in eval mode, except its batch-norm
        layers."""
        super().train(False)
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train(True)
        return self

    @torch.no_grad()
    def update(self, student: nn.Module, iteration: int) -> float:
        """Average ``student``'s current weights into the teacher; returns the coefficient used."""
        coefficient = ema_alpha(iteration, self.alpha)
        for teacher_param, student_param in zip(self.model.parameters(), student.parameters()):
            teacher_param.mul_(coefficient).add_(student_param.detach(), alpha=1.0 - coefficient)
        return coefficient

    def predict_sem_seg(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's class logits B x C x H x W for normalised images B x 3 x H x W: the
        ``"sem_seg"`` output of the model's ``predict_dense``, computed without the other heads
        (``outputs=("sem_seg",)``), equal to that of a prediction of all outputs. Runs under the
        caller's grad and autocast modes."""
        return self.model.predict_dense(images, outputs=("sem_seg",))["sem_seg"]

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)
