"""Collecting evaluator state from all processes (Detectron2's ``comm``; gloo and NCCL alike)."""
from typing import Any, List, Optional

from detectron2.utils import comm

__all__ = ["gather_on_main"]


def gather_on_main(value: Any, distributed: bool) -> Optional[List[Any]]:
    """The ``value`` of every process, in rank order, on the main process; None on the others.

    Every process must call it. Without a process group (or with ``distributed`` False) it
    returns ``[value]``.
    """
    if not distributed or comm.get_world_size() == 1:
        return [value]
    comm.synchronize()
    gathered = comm.gather(value, dst=0)
    return gathered if comm.is_main_process() else None
