"""The OUTPUT_DIR lock on file systems without flock (NFS, Lustre): an exclusive lock file instead."""
import errno
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _load_lock_module():
    """The lock's module alone (standard library only), without importing the package and Detectron2."""
    package = importlib.util.find_spec("gbw_panoptic")
    path = os.path.join(os.path.dirname(package.origin), "uda", "output_lock.py")
    spec = importlib.util.spec_from_file_location("output_lock_alone", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


output_lock = _load_lock_module()
EXCLUSIVE_LOCK_FILE_NAME, LOCK_FILE_NAME = output_lock.EXCLUSIVE_LOCK_FILE_NAME, output_lock.LOCK_FILE_NAME
OutputDirInUseError = output_lock.OutputDirInUseError
lock_output_dir, unlock_output_dir = output_lock.lock_output_dir, output_lock.unlock_output_dir


@pytest.fixture
def no_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    """``flock`` fails as on an NFS mount without a lock daemon."""

    def flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(output_lock.fcntl, "flock", flock)


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_without_flock_the_lock_is_a_file_created_atomically(no_flock, tmp_path: Path, caplog) -> None:
    directory = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger=output_lock.logger.name):
        lock_output_dir(directory)
    exclusive = tmp_path / "out" / EXCLUSIVE_LOCK_FILE_NAME
    try:
        assert json.loads(exclusive.read_text())["pid"] == os.getpid()
        assert "does not support flock" in caplog.text and str(exclusive) in caplog.text
        lock_output_dir(directory)  # held by this process: a no-op
    finally:
        unlock_output_dir(directory)
    assert not exclusive.exists()
    lock_output_dir(directory)  # free again
    unlock_output_dir(directory)


def test_without_flock_a_live_holder_refuses_and_a_dead_one_on_this_host_is_taken_over(
    no_flock, tmp_path: Path
) -> None:
    directory = str(tmp_path)
    exclusive = tmp_path / EXCLUSIVE_LOCK_FILE_NAME
    other_host = {"pid": 1, "host": socket.gethostname() + "-other", "started": "2026-01-01T00:00:00+00:00"}
    exclusive.write_text(json.dumps(other_host))
    with pytest.raises(OutputDirInUseError) as error:
        lock_output_dir(directory)
    message = str(error.value)
    assert f"pid 1 on host {other_host['host']}" in message and "does not support flock" in message
    assert str(exclusive) in message and "delete the file" in message
    # A process of this host that is alive (here: this one, as another run would be) holds it too.
    exclusive.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "x"}))
    with pytest.raises(OutputDirInUseError):
        lock_output_dir(directory)

    exclusive.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "x"}))
    lock_output_dir(directory)
    try:
        assert json.loads(exclusive.read_text())["pid"] == os.getpid()
    finally:
        unlock_output_dir(directory)


def test_other_flock_errors_are_not_taken_for_a_missing_flock(monkeypatch, tmp_path: Path) -> None:
    def flock(fd, operation):
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    monkeypatch.setattr(output_lock.fcntl, "flock", flock)
    with pytest.raises(OSError) as error:
        lock_output_dir(str(tmp_path))
    assert error.value.errno == errno.EBADF
    assert not (tmp_path / EXCLUSIVE_LOCK_FILE_NAME).exists() and (tmp_path / LOCK_FILE_NAME).exists()
