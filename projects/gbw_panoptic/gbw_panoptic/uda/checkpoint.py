"""Checkpoints of UDA training: atomic files, RNG states of every process, and the periodic hook.

A checkpoint holds the student (``model``) and, through the trainer's ``state_dict``, the iteration,
optimizer, gradient scaler, learning-rate schedules, the method's networks (EMA teacher,
discriminator) with their optimizers, and the RNG states of all processes, so that a resumed run
continues exactly as the uninterrupted one would have.

Resuming reads the checkpoint tagged in ``last_checkpoint``; when it is missing, truncated or corrupt
(a disk filled up, a copy interrupted), a warning names it and the newest readable ``model_*.pth``
is used instead.
"""
import fnmatch
import logging
import os
import pickle
import re
import zipfile
from typing import Any, Dict, List

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import hooks
from detectron2.utils import comm

from ..utils.d2_compat import reset_after_failed_load
from ..utils.io import atomic_write
from ..utils.rng import get_rng_state, preserved_rng_state, set_rng_state

__all__ = [
    "AtomicCheckpointer",
    "CorruptCheckpointError",
    "TEMPORARY_FILE_PATTERNS",
    "remove_stale_temporary_files",
    "get_rng_state",
    "set_rng_state",
    "preserved_rng_state",
    "PeriodicCheckpointerWithRNG",
]


# Names of the temporary files of :mod:`gbw_panoptic.utils.io`'s atomic writes
# (``.<stem>.<random>.tmp<extension>``) that a killed process can leave behind.
TEMPORARY_FILE_PATTERNS = (".*.tmp", ".*.tmp.*")

# Files a run writes as checkpoints: model_0001234.pth and model_final.pth.
_CHECKPOINT_NAME = re.compile(r"^model_(\d+|final)\.pth$")


def remove_stale_temporary_files(output_dir: str) -> List[str]:
    """Delete the temporary files of interrupted atomic writes in ``output_dir`` (checkpoints, config,
    metrics) and under ``output_dir/inference`` (evaluation outputs); nothing else is looked at.

    Only call it while holding the directory's run lock (:mod:`.output_lock`): the temporary file of a
    write in progress looks the same. Returns the paths removed.
    """
    top_level = [name for name in os.listdir(output_dir) if os.path.isfile(os.path.join(output_dir, name))]
    folders = [(output_dir, top_level)]
    folders += [(folder, names) for folder, _, names in os.walk(os.path.join(output_dir, "inference"))]
    removed = [
        os.path.join(folder, name)
        for folder, names in folders
        for name in names
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in TEMPORARY_FILE_PATTERNS)
    ]
    for path in removed:
        os.remove(path)
    if removed:
        logging.getLogger(__name__).warning(
            f"Removed {len(removed)} temporary file(s) of interrupted writes: {', '.join(sorted(removed))}"
        )
    return removed


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, corrupt, not a checkpoint)."""


class AtomicCheckpointer(DetectionCheckpointer):
    """Detectron2's checkpointer with atomic writes of the checkpoint and of ``last_checkpoint``, and a
    resume that falls back to the newest readable checkpoint when the last one is unreadable."""

    def _load_file(self, filename: str) -> Dict[str, Any]:
        try:
            return super()._load_file(filename)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
            raise CorruptCheckpointError(f"checkpoint {filename} cannot be read (truncated or corrupt): {e}") from e

    def _resume_candidates(self) -> List[str]:
        """The tagged last checkpoint first, then every ``model_*.pth`` of ``save_dir``, newest first."""
        names = [name for name in os.listdir(self.save_dir) if _CHECKPOINT_NAME.match(name)]
        # model_final is written after the last numbered one; numbers sort by value.
        names.sort(key=lambda name: (1, 0) if name == "model_final.pth" else (0, int(name[6:-4])), reverse=True)
        tagged = self.get_checkpoint_file()
        return [tagged] + [os.path.join(self.save_dir, name) for name in names if name != os.path.basename(tagged)]

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """Detectron2's ``resume_or_load``; when resuming, an unreadable or missing last checkpoint is skipped
        with a warning for the newest readable one (:class:`CorruptCheckpointError` when there is none)."""
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        problems = []
        for candidate in self._resume_candidates():
            if not os.path.isfile(candidate):
                problems.append(f"{candidate} does not exist")
            else:
                try:
                    result = self.load(candidate)
                except CorruptCheckpointError as e:
                    reset_after_failed_load(self)
                    problems.append(str(e))
                else:
                    if problems:
                        self.logger.warning(f"Resumed from {candidate} instead: " + "; ".join(problems))
                    return result
            self.logger.warning(f"Cannot resume from {problems[-1]}; trying the previous checkpoint")
        raise CorruptCheckpointError(f"no readable checkpoint in {self.save_dir}: " + "; ".join(problems))

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
