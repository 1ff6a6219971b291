"""Multi-process launch with the right backend: NCCL for CUDA training, gloo on the CPU.

Detectron2 v0.6's ``detectron2.engine.launch`` hard-codes NCCL and requires one GPU per process; this
launcher has the same arguments and semantics (one process per device on each machine, Detectron2's
local process group set up, ``dist_url="auto"`` picks a free local port) plus a ``backend`` argument.

SIGTERM / SIGINT sent to the launching process are forwarded to its processes, so that they checkpoint
and stop together (:class:`~gbw_panoptic.uda.signals.TrainingInterrupted`); a process stopped that way
exits with ``128 + signal`` and the launcher raises ``TrainingInterrupted`` too.
"""
import logging
import os
import signal
import socket
import sys
import threading
from datetime import timedelta
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.utils import comm

from ..utils.d2_compat import create_local_process_group
from .signals import STOP_SIGNALS, TrainingInterrupted

__all__ = ["DEFAULT_TIMEOUT", "default_backend", "launch"]

DEFAULT_TIMEOUT = timedelta(minutes=30)


def default_backend(device: str) -> str:
    """``"nccl"`` for a CUDA ``MODEL.DEVICE``, ``"gloo"`` otherwise."""
    return "nccl" if device.startswith("cuda") else "gloo"


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    main_func: Callable,
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: Sequence = (),
    backend: str = "gloo",
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Run ``main_func(*args)`` in ``num_processes_per_machine`` processes on each of ``num_machines``.

    Call it on every machine. With a world size of 1 it simply calls ``main_func(*args)``.

    Args:
        num_processes_per_machine: processes on this machine (one per GPU with NCCL; any number with
            gloo on the CPU).
        dist_url: rendezvous URL, e.g. ``"tcp://127.0.0.1:50152"``; ``"auto"`` picks a free local port
            (single machine only).
        backend: ``"nccl"`` or ``"gloo"`` (see :func:`default_backend`).
    """
    world_size = num_machines * num_processes_per_machine
    if world_size == 1:
        main_func(*args)
        return
    if backend == "nccl" and num_processes_per_machine > torch.cuda.device_count():
        raise ValueError(
            f"{num_processes_per_machine} NCCL processes per machine need as many GPUs, "
            f"{torch.cuda.device_count()} are visible; use MODEL.DEVICE cpu (gloo) or fewer processes"
        )
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url='auto' works on one machine only; give a tcp:// URL for several")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    if dist_url is None:
        raise ValueError("a multi-process launch needs dist_url (e.g. 'auto' or 'tcp://HOST:PORT')")
    context = mp.start_processes(
        _distributed_worker,
        nprocs=num_processes_per_machine,
        args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, tuple(args), backend, timeout),
        daemon=False,
        start_method="spawn",
        join=False,
    )
    _join_forwarding_signals(context)


def _join_forwarding_signals(context: mp.ProcessContext) -> None:
    """Wait for the processes of ``context``, forwarding SIGTERM / SIGINT to them; a process that stopped
    after a stop signal (exit code ``128 + signal``) raises :class:`TrainingInterrupted` here."""

    def forward(signum: int, frame) -> None:
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS} if in_main_thread else {}
    try:
        # A failed process gets the others terminated after the grace period; after a stop signal they
        # are past their checkpoint and only exiting.
        while not context.join(grace_period=60):
            pass
    except mp.ProcessExitedException as e:
        signum = e.exit_code - 128
        if signum not in STOP_SIGNALS:
            raise
        raise TrainingInterrupted(
            f"{signal.Signals(signum).name}: process {e.error_index} stopped after writing a checkpoint; "
            "--resume continues from it",
            signum,
        ) from e
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _distributed_worker(
    local_rank: int,
    main_func: Callable,
    world_size: int,
    num_processes_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: tuple,
    backend: str,
    timeout: timedelta,
) -> None:
    global_rank = machine_rank * num_processes_per_machine + local_rank
    try:
        dist.init_process_group(
            backend=backend, init_method=dist_url, world_size=world_size, rank=global_rank, timeout=timeout
        )
    except Exception:
        logging.getLogger(__name__).error(f"Process group URL: {dist_url}")
        raise
    create_local_process_group(num_processes_per_machine)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    comm.synchronize()
    try:
        main_func(*args)
    except TrainingInterrupted as e:  # already logged by the trainer
        sys.exit(128 + e.signum)
    finally:
        dist.destroy_process_group()
