"""Process pools that cannot hang: safe to start from any process, including a training process.

Forking a process that runs other threads (the PyTorch / OpenMP thread pools of a training process,
OpenBLAS and OpenCV threads, tqdm's monitor thread...) is unsafe: a child can inherit a lock another
thread held at the fork and wait on it forever. Workers are therefore started by a fork server, a
fresh single-threaded process (spawned where there is none). Such workers import the main script
again, as ``multiprocessing`` documents; a script without an ``if __name__ == "__main__":`` guard
that starts a pool there fails at once with a message saying so. A worker that stops abruptly
(killed, out of memory, failing to start) raises :class:`WorkerPoolError` at once; it is never
restarted.
"""
import concurrent.futures
import multiprocessing
import os
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

__all__ = ["WorkerPoolError", "parallel_map"]

Item = TypeVar("Item")
Result = TypeVar("Result")

GUARD_ADVICE = (
    "the worker processes import the main script again: put the code that runs when the script is "
    'executed under `if __name__ == "__main__":`, or run with one worker process'
)


class WorkerPoolError(RuntimeError):
    """A worker process of :func:`parallel_map` stopped abruptly."""


def _current_umask() -> int:
    """The process umask (set and restored: the only portable way to read it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _check_not_starting_worker(what: str) -> None:
    """Raise RuntimeError when this process is a worker that is still importing the main script.

    A worker started by a fork server or spawned runs the main script again before it takes work;
    an unguarded script that calls ``what`` there would start work (and pools) in every worker.
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(f"{what} was called while a worker process was starting: {GUARD_ADVICE}")


def _init_worker(umask: int, initializer: Optional[Callable[..., Any]], initargs: Tuple[Any, ...]) -> None:
    os.umask(umask)
    if initializer is not None:
        initializer(*initargs)


def _call_on_chunk(function: Callable[[Item], Result], chunk: Sequence[Item]) -> List[Result]:
    return [function(item) for item in chunk]


def parallel_map(
    function: Callable[[Item], Result],
    items: Iterable[Item],
    processes: int,
    *,
    ordered: bool = True,
    chunksize: int = 1,
    preload: Sequence[str] = (),
    initializer: Optional[Callable[..., Any]] = None,
    initargs: Sequence[Any] = (),
) -> Iterator[Result]:
    """Yield ``function(item)`` for every item, computed by ``processes`` worker processes.

    Args:
        function: a module-level (picklable) callable; ``initializer(*initargs)`` runs once in each
            worker first. Workers take the caller's current umask, so files they write get the
            permissions the caller's would.
        ordered: yield in the order of ``items``; else as chunks finish.
        chunksize: items sent to a worker at a time.
        preload: modules the fork server imports once for all its workers.

    Raises:
        WorkerPoolError: a worker stopped abruptly; the remaining work is cancelled.
        Whatever ``function`` raises, for the first item (in yield order) that fails.
    """
    _check_not_starting_worker("parallel_map")
    items = list(items)
    chunks = [items[start : start + chunksize] for start in range(0, len(items), chunksize)]
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver" and preload:
        context.set_forkserver_preload(list(preload))
    executor = concurrent.futures.ProcessPoolExecutor(
        max_workers=max(1, min(processes, len(chunks))),
        mp_context=context,
        initializer=_init_worker,
        initargs=(_current_umask(), initializer, tuple(initargs)),
    )
    try:
        futures = [executor.submit(_call_on_chunk, function, chunk) for chunk in chunks]
        for future in futures if ordered else concurrent.futures.as_completed(futures):
            yield from future.result()
    except BrokenProcessPool as error:
        raise WorkerPoolError(
            f"a worker process ({method} start) stopped abruptly, killed (e.g. out of memory) or while "
            f"starting; if it could not start, {GUARD_ADVICE}"
        ) from error
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
