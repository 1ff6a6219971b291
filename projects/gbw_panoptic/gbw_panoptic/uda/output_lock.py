"""One run per ``OUTPUT_DIR``: an exclusive lock held by the main process of a training or evaluation.

Two runs writing into one directory would overwrite each other's checkpoints and interleave
``metrics.json`` and ``log.txt``. The lock is ``OUTPUT_DIR/.run.lock``, locked with ``flock`` and holding
the owner's pid, host and start time (shown in the error a second run gets). The kernel releases an
``flock`` when its process dies, however it dies, so the lock of a dead run is simply taken over; the
file left behind only says who held it last.

Only the main process locks: :func:`~gbw_panoptic.uda.cli.run` before it launches the processes of a
multi-process run (machine rank 0 only), :func:`~gbw_panoptic.uda.cli.setup` in a single-process run.
Locking again a directory this process already holds is a no-op.
"""
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from typing import Dict, Optional

__all__ = ["LOCK_FILE_NAME", "OutputDirInUseError", "lock_output_dir", "unlock_output_dir"]

LOCK_FILE_NAME = ".run.lock"

logger = logging.getLogger(__name__)

# Lock file descriptors of this process, by the real path of their OUTPUT_DIR.
_held: Dict[str, int] = {}


class OutputDirInUseError(RuntimeError):
    """Another live process holds the lock of the ``OUTPUT_DIR``."""


def _owner_description(text: str) -> str:
    try:
        owner = json.loads(text)
        return f"pid {owner['pid']} on host {owner['host']}, started {owner['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no readable owner record"


def lock_output_dir(output_dir: str) -> None:
    """Create ``output_dir`` if needed and lock it for this process until :func:`unlock_output_dir` or exit.

    Raises:
        OutputDirInUseError: another live process holds it (its pid, host and start time are named).
    """
    os.makedirs(output_dir, exist_ok=True)
    key = os.path.realpath(output_dir)
    if key in _held:
        return
    path = os.path.join(key, LOCK_FILE_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        previous = os.pread(fd, 4096, 0).decode(errors="replace")
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise OutputDirInUseError(
                f"OUTPUT_DIR {output_dir} is in use by another run ({_owner_description(previous)}); wait for it "
                f"to finish, stop it, or choose another OUTPUT_DIR (lock file {path})"
            ) from None
        raise
    previous = os.pread(fd, 4096, 0).decode(errors="replace")
    if previous.strip():
        logger.info(f"Taking over the lock of {output_dir} from {_owner_description(previous)}, no longer running")
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode() + b"\n", 0)
    _held[key] = fd


def unlock_output_dir(output_dir: Optional[str]) -> None:
    """Release this process's lock of ``output_dir`` (nothing if it holds none)."""
    if not output_dir:
        return
    fd = _held.pop(os.path.realpath(output_dir), None)
    if fd is not None:
        # LOCK_UN releases the lock also for copies of the descriptor in forked children.
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
