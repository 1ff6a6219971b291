"""The project's one atomic writer: contents, failure handling, and permissions that follow the umask
for every kind of file the project writes (checkpoint, prepared dataset PNG and JSON, metrics)."""
import contextlib
import json
import math
import os
import stat

import numpy as np
import pytest
import torch

from gbw_panoptic.data.prepare.synthetic import prepare_synthetic
from gbw_panoptic.evaluation.report import write_report
from gbw_panoptic.uda.checkpoint import AtomicCheckpointer
from gbw_panoptic.utils.io import atomic_path, atomic_write, write_json


@contextlib.contextmanager
def _umask(mask):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "last_checkpoint"
    with atomic_write(path, "w") as f:
        f.write("model_0000001.pth")
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as f:
            f.write("partial")
            raise RuntimeError("killed")
    assert path.read_text() == "model_0000001.pth"
    assert os.listdir(tmp_path) == ["last_checkpoint"]


def test_atomic_path_removes_a_temporary_file_the_writer_replaced(tmp_path):
    path = tmp_path / "sub" / "label.png"  # missing folders are created
    with pytest.raises(OSError):
        with atomic_path(path) as tmp_path_of_writer:
            assert tmp_path_of_writer.endswith(".png") and os.path.dirname(tmp_path_of_writer) == str(path.parent)
            os.remove(tmp_path_of_writer)
            with open(tmp_path_of_writer, "w") as f:
                f.write("half")
            raise OSError("disk full")
    assert os.listdir(path.parent) == []


def test_atomic_write_rejects_modes_that_are_not_a_fresh_write(tmp_path):
    with pytest.raises(ValueError, match="'a'"):
        with atomic_write(tmp_path / "x", "a"):
            pass


def test_write_json_values(tmp_path):
    write_json(tmp_path / "m.json", {"pq": np.float32(0.5), "n": np.int64(3), "nan": math.nan, "l": (1, math.inf)})
    assert json.loads((tmp_path / "m.json").read_text()) == {"pq": 0.5, "n": 3, "nan": None, "l": [1, None]}
    write_json(tmp_path / "c.json", {"a": [1, 2]}, indent=None)
    assert (tmp_path / "c.json").read_text() == '{"a": [1, 2]}'


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_permissions_of_a_normal_open(tmp_path, umask):
    """A checkpoint, the prepared dataset (PNGs and JSON, written by worker processes too) and an
    evaluation report get ``0o666 & ~umask``, like files created by ``open``."""
    expected = 0o666 & ~umask
    with _umask(umask):
        checkpointer = AtomicCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path / "run"))
        checkpointer.save("model_0000001")
        write_report(str(tmp_path / "run"), "panoptic_seg", "PQ", {"PQ": 1.0}, [{"name": "a", "PQ": 1.0}], ["name", "PQ"])
        reports = prepare_synthetic(
            str(tmp_path / "synthetic"), num_source=2, num_target_train=1, num_target_val=1, height=32, width=64, workers=2
        )
    assert all(not report.failures for _, report in reports)
    run_files = sorted(os.listdir(tmp_path / "run"))
    assert run_files == [
        "last_checkpoint", "model_0000001.pth", "panoptic_seg.csv", "panoptic_seg.json", "panoptic_seg.md"
    ]  # fmt: skip
    for name in run_files:
        assert _mode(tmp_path / "run" / name) == expected, name
    prepared = [
        os.path.join(folder, name)
        for folder, _, names in os.walk(tmp_path / "synthetic")
        for name in names
        if name.endswith(("_labelTrainIds.png", "_panoptic.png", ".json"))
    ]
    assert any(path.endswith("_labelTrainIds.png") for path in prepared)
    assert any(os.sep + "panoptic" in path and path.endswith(".png") for path in prepared)
    for path in prepared:
        assert _mode(path) == expected, path
