"""Process pools that are safe to start from any process, including a training process."""
import multiprocessing
import os
from multiprocessing.pool import Pool
from typing import Any, Callable, Optional, Sequence, Tuple

__all__ = ["process_pool"]


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
    (module-level) callables. Workers take the caller's current umask (the fork server keeps the
    one it started with), so the files they write get the same permissions as the caller's.
    """
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver" and preload:
        context.set_forkserver_preload(list(preload))
    return context.Pool(processes, initializer=_init_worker, initargs=(current_umask(), initializer, tuple(initargs)))


def current_umask() -> int:
    """The process umask (set and restored: the only portable way to read it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _init_worker(umask: int, initializer: Optional[Callable[..., Any]], initargs: Tuple[Any, ...]) -> None:
    os.umask(umask)
    if initializer is not None:
        initializer(*initargs)

