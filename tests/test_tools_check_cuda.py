"""tools/check_cuda.sh: a clear refusal without a CUDA device (the device is hidden with
CUDA_VISIBLE_DEVICES, so these tests mean the same on a GPU machine)."""
import os
import subprocess
import sys

SCRIPT = "tools/check_cuda.sh"


def _without_cuda(tmp_path) -> dict:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}


def test_check_cuda_without_gpu_says_so_and_runs_nothing(repo_root, tmp_path):
    result = subprocess.run(
        [str(repo_root / SCRIPT)], capture_output=True, text=True, env=_without_cuda(tmp_path), timeout=120
    )
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr and "nothing was run" in result.stderr
    assert not (tmp_path / "out").exists()


def test_check_cuda_help_prints_usage_and_runs_nothing(repo_root, tmp_path):
    for flag in ("--help", "-h"):
        result = subprocess.run(
            [str(repo_root / SCRIPT), flag], capture_output=True, text=True, env=_without_cuda(tmp_path), timeout=30
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: ") and "ITERS iterations (default 200)" in result.stdout
        assert "set -uo" not in result.stdout and "no CUDA device" not in result.stderr
    result = subprocess.run(
        [str(repo_root / SCRIPT), "--iters"], capture_output=True, text=True, env=_without_cuda(tmp_path), timeout=30
    )
    assert result.returncode == 64 and "unknown argument '--iters'" in result.stderr
    assert not (tmp_path / "out").exists()
