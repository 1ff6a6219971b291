"""Checkpoints of UDA training: atomic files, RNG states of every process, and the periodic hook.

A checkpoint holds the student (``model``) and, through the trainer's ``state_dict``, the iteration,
optimizer, gradient scaler, learning-rate schedules, the method's networks (EMA teacher,
discriminator) with their optimizers, and the RNG states of all processes, so that a resumed run
continues exactly as the uninterrupted one would have.
"""
import os
from typing import Any

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import hooks
from detectron2.utils import comm

from ..utils.io import atomic_write
from ..utils.rng import get_rng_state, preserved_rng_state, set_rng_state

__all__ = [
    "AtomicCheckpointer",
    "get_rng_state",
    "set_rng_state",
    "preserved_rng_state",
    "PeriodicCheckpointerWithRNG",
]


class AtomicCheckpointer(DetectionCheckpointer):
    """Detectron2's checkpointer with atomic writes of the checkpoint and of ``last_checkpoint``."""

    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``<save_dir>/<name>.pth`` (model, checkpointables, ``kwargs``) and tag it as the last."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        with atomic_write(save_file, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        with atomic_write(os.path.join(self.save_dir, "last_checkpoint"), "w") as f:
            f.write(last_filename_basename)


class PeriodicCheckpointerWithRNG(hooks.PeriodicCheckpointer):
    """Detectron2's periodic checkpointer hook that first gathers the RNG states of all processes
    into ``trainer.rng_states`` (a collective, so register it on every process; only the main process
    writes the file)."""

    def after_step(self) -> None:
        iteration = self.trainer.iter
        if (iteration + 1) % self.period == 0 or iteration >= self.max_iter - 1:
            self.trainer.rng_states = comm.all_gather(get_rng_state())
        super().after_step()
