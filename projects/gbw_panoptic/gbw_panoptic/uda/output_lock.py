"""One run per ``OUTPUT_DIR``: an exclusive lock held by the main process of a training or evaluation.

Two runs writing into one directory would overwrite each other's checkpoints and interleave
``metrics.json`` and ``log.txt``. The lock is ``OUTPUT_DIR/.run.lock``, locked with ``flock`` and holding
the owner's pid, host and start time (shown in the error a second run gets). The kernel releases an
``flock`` when its process dies, however it dies, so the lock of a dead run is simply taken over; the
file left behind only says who held it last.

Only the main process locks: :func:`~gbw_panoptic.uda.cli.run` before it launches the processes of a
multi-process run (machine rank 0 only: the other machines neither lock nor need to see the lock),
:func:`~gbw_panoptic.uda.cli.setup` in a single-process run. Locking again a directory this process
already holds is a no-op.

File systems without ``flock`` (some NFS and Lustre mounts answer ENOLCK, EOPNOTSUPP or ENOSYS): the lock
is then the file ``OUTPUT_DIR/.run.lock.exclusive``, created atomically (``O_CREAT | O_EXCL``) with the
owner's record and removed at unlock; a warning says so. Nothing releases that file when its process
dies: a later run on the same host takes over the file of a process that no longer exists, and for a run
on another host the error names the file to delete once that run is gone.
"""
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from typing import Dict, NamedTuple, Optional

__all__ = [
    "LOCK_FILE_NAME",
    "EXCLUSIVE_LOCK_FILE_NAME",
    "OutputDirInUseError",
    "lock_output_dir",
    "unlock_output_dir",
]

LOCK_FILE_NAME = ".run.lock"
# The lock on file systems without flock: a file that exists while a run holds OUTPUT_DIR.
EXCLUSIVE_LOCK_FILE_NAME = ".run.lock.exclusive"
# flock's errors on file systems that do not support it.
FLOCK_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)

logger = logging.getLogger(__name__)



class _HeldLock(NamedTuple):
    """A lock this process holds: the flocked descriptor, or the path of its exclusive lock file."""

    fd: Optional[int]
    exclusive_file: Optional[str]


# Locks of this process, by the real path of their OUTPUT_DIR.
_held: Dict[str, _HeldLock] = {}


class OutputDirInUseError(RuntimeError):
    """Another live process holds the lock of the ``OUTPUT_DIR``."""


def _owner_description(text: str) -> str:
    try:
        owner = json.loads(text)
        return f"pid {owner['pid']} on host {owner['host']}, started {owner['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no readable owner record"


def _owner_record() -> bytes:
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return json.dumps(owner).encode() + b"\n"


def _gone_from_this_host(text: str) -> bool:
    """Whether the owner record ``text`` names a process of this host that no longer exists."""
    try:
        owner = json.loads(text)
        if owner["host"] != socket.gethostname():
            return False
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (ValueError, KeyError, TypeError, OSError):
        return False
    return False


def _lock_with_exclusive_file(output_dir: str, key: str, flock_error: OSError) -> str:
    """Lock ``output_dir`` by creating its :data:`EXCLUSIVE_LOCK_FILE_NAME` atomically; returns its path."""
    path = os.path.join(key, EXCLUSIVE_LOCK_FILE_NAME)
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            break
        except FileExistsError:
            try:
                with open(path, errors="replace") as f:
                    previous = f.read(4096)
            except FileNotFoundError:  # its owner unlocked it meanwhile
                continue
            if not _gone_from_this_host(previous):
                raise OutputDirInUseError(
                    f"OUTPUT_DIR {output_dir} is in use by another run ({_owner_description(previous)}): its file "
                    f"system does not support flock, so the lock is the file {path}, which a run that dies without "
                    "unlocking leaves behind; wait for that run, stop it, or choose another OUTPUT_DIR, and delete "
                    "the file once no run uses the directory"
                ) from None
            logger.info(f"Taking over the lock of {output_dir} from {_owner_description(previous)}, no longer running")
            os.unlink(path)
    try:
        os.write(fd, _owner_record())
    finally:
        os.close(fd)
    logger.warning(
        f"The file system of OUTPUT_DIR {output_dir} does not support flock ({flock_error.strerror}): locked it "
        f"with the file {path}, created atomically instead. It is removed when this run ends; a run that is "
        "killed leaves it behind (a later run on this host takes it over; elsewhere, delete it)"
    )
    return path


def lock_output_dir(output_dir: str) -> None:
    """Create ``output_dir`` if needed and lock it for this process until :func:`unlock_output_dir` or exit
    (with ``flock``, or the exclusive lock file where the file system has no ``flock``).

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
        if e.errno in FLOCK_UNSUPPORTED:
            _held[key] = _HeldLock(None, _lock_with_exclusive_file(output_dir, key, e))
            return
        raise
    previous = os.pread(fd, 4096, 0).decode(errors="replace")
    if previous.strip():
        logger.info(f"Taking over the lock of {output_dir} from {_owner_description(previous)}, no longer running")
    os.ftruncate(fd, 0)
    os.pwrite(fd, _owner_record(), 0)
    _held[key] = _HeldLock(fd, None)


def unlock_output_dir(output_dir: Optional[str]) -> None:
    """Release this process's lock of ``output_dir`` (nothing if it holds none)."""
    if not output_dir:
        return
    held = _held.pop(os.path.realpath(output_dir), None)
    if held is None:
        return
    if held.exclusive_file is not None:
        os.unlink(held.exclusive_file)
        return
    # LOCK_UN releases the lock also for copies of the descriptor in forked children.
    fcntl.flock(held.fd, fcntl.LOCK_UN)
    os.close(held.fd)
