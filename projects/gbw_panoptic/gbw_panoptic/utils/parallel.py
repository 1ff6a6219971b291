"""Process pools that are safe to start from any process, including a training process."""
import ctypes
import multiprocessing
import platform
from multiprocessing.pool import Pool
from typing import Any, Callable, Optional, Sequence

__all__ = ["process_pool", "keep_freed_memory"]

# glibc mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def process_pool(
    processes: int,
    preload: Sequence[str] = (),
    initializer: Optional[Callable[..., Any]] = None,
    initargs: Sequence[Any] = (),
) -> Pool:
    """A ``multiprocessing`` pool whose workers are started by a fork server (spawn where there is none).

    Forking the calling process itself is unsafe once it runs other threads (the PyTorch / OpenMP
    thread pools of a training process, tqdm's monitor thread, ...): a child can inherit a lock that
    another thread held at the fork and wait on it forever. The fork server is a fresh
    single-threaded process; ``preload`` names modules it imports once, so that each worker starts
    without importing them again. The worker function and ``initializer`` must be importable
    (module-level) callables.
    """
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver" and preload:
        context.set_forkserver_preload(list(preload))
    return context.Pool(processes, initializer=initializer, initargs=tuple(initargs))


def keep_freed_memory(largest_block: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Make glibc's malloc in this process reuse freed memory for large buffers.

    By default glibc maps each buffer of more than a few MB afresh (``mmap``) or gives the freed top
    of the heap back to the system, so a worker that allocates and frees a few 6-8 MB arrays per
    item (a decoded 1024x2048 image, its ids) page-faults on every page of them again: some 3500
    faults, about 10 ms, per image on this project's VM. Here buffers up to ``largest_block`` come
    from the heap and up to ``trim_threshold`` bytes of freed heap are kept for the next ones. Meant
    for worker processes (it applies to the whole process); returns False where the C library is
    not glibc (nothing is changed).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # glibc accepts an mmap threshold of at most 32 MiB on 64-bit systems.
    return bool(mallopt(_M_MMAP_THRESHOLD, min(largest_block, 32 << 20)) and mallopt(_M_TRIM_THRESHOLD, trim_threshold))
