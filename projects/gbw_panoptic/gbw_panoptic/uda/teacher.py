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

    The copy is made at construction (so the teacher starts equal to the student) and always stays in
    eval mode (no dropout, batch norm with running statistics). Floating-point buffers (batch-norm
    statistics) follow the same average; integer buffers are copied.
    """

    def __init__(self, student: nn.Module, alpha: float = 0.999):
        super().__init__()
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"UDA.EMA_ALPHA must be in [0, 1), got {alpha}")
        self.alpha = alpha
        self.model = copy.deepcopy(student)
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> "EMATeacher":
        """The teacher always predicts in eval mode, whatever the mode of its parent."""
        super().train(False)
        return self

    @torch.no_grad()
    def update(self, student: nn.Module, iteration: int) -> float:
        """Average ``student``'s current weights into the teacher; returns the coefficient used."""
        coefficient = ema_alpha(iteration, self.alpha)
        student_state = student.state_dict()
        for name, teacher_tensor in self.model.state_dict().items():
            student_tensor = student_state[name].detach()
            if teacher_tensor.dtype.is_floating_point:
                teacher_tensor.mul_(coefficient).add_(student_tensor, alpha=1.0 - coefficient)
            else:
                teacher_tensor.copy_(student_tensor)
        return coefficient

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)
