"""The places where Detectron2 v0.6 and upstream Detectron2 differ in what the project uses.

Detectron2 v0.6 (the registry build) has no public way to do either; upstream Detectron2 (built from
source, ``tools/install_detectron2.py --source``) added one for each after v0.6. Each function uses
the public API where it exists and otherwise the v0.6 module attribute that upstream's public function
reads or sets, so the rest of the project uses no private Detectron2 name:

- :func:`create_local_process_group`: ``comm.get_local_rank()`` and ``comm.get_local_size()`` need the
  process group of the ranks on this machine; the project's own launcher (gloo on the CPU) must create
  it, which v0.6 does only inside its NCCL-only ``launch`` by setting ``comm._LOCAL_PROCESS_GROUP``
  (upstream: ``comm.create_local_process_group(num_workers_per_machine)``).
- :func:`write_loss_metrics`: ``SimpleTrainer.write_metrics(loss_dict, data_time)`` in v0.6 takes the
  iteration as a third, required argument ``cur_iter`` upstream.
- :func:`reset_after_failed_load`: upstream ``DetectionCheckpointer.load`` keeps the URL it parses in
  ``_parsed_url_during_load``, asserts on entry that it is None and leaves it set when the load raises,
  so a second ``load()`` after a failed one (the resume fall-back to an older checkpoint) fails; v0.6
  has no such attribute.
"""
import inspect
from typing import Mapping

import torch
import torch.distributed as dist
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm

__all__ = ["create_local_process_group", "reset_after_failed_load", "write_loss_metrics"]

_WRITE_METRICS_TAKES_ITERATION = "cur_iter" in inspect.signature(SimpleTrainer.write_metrics).parameters


def create_local_process_group(num_processes_per_machine: int) -> None:
    """Create Detectron2's process group of the ranks on this machine (machine ``m`` holds the ranks
    ``m * num_processes_per_machine ... (m + 1) * num_processes_per_machine - 1``).

    Call it once in every process, after ``torch.distributed.init_process_group`` (it creates one group
    per machine, a collective call).
    """
    if hasattr(comm, "create_local_process_group"):
        comm.create_local_process_group(num_processes_per_machine)
        return
    world_size = dist.get_world_size()
    if world_size % num_processes_per_machine:
        raise ValueError(
            f"world size {world_size} is not a multiple of {num_processes_per_machine} processes per machine"
        )
    machine_rank = dist.get_rank() // num_processes_per_machine
    for machine in range(world_size // num_processes_per_machine):
        ranks = list(range(machine * num_processes_per_machine, (machine + 1) * num_processes_per_machine))
        group = dist.new_group(ranks)
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def write_loss_metrics(losses: Mapping[str, torch.Tensor], data_time: float, iteration: int) -> None:
    """Detectron2's ``SimpleTrainer.write_metrics``: the losses (averaged over processes, their sum as
    ``total_loss``, an error on non-finite values) and ``data_time`` (seconds) of ``iteration`` into the
    current ``EventStorage``."""
    if _WRITE_METRICS_TAKES_ITERATION:
        SimpleTrainer.write_metrics(losses, data_time, iteration)
    else:
        SimpleTrainer.write_metrics(losses, data_time)


def reset_after_failed_load(checkpointer: object) -> None:
    """Make ``checkpointer`` (a ``DetectionCheckpointer``) loadable again after a ``load()`` that raised."""
    if getattr(checkpointer, "_parsed_url_during_load", None) is not None:
        checkpointer._parsed_url_during_load = None
