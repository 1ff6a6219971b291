"""Process pools that cannot hang: a worker that dies, a worker killed in the middle of a dataset
conversion, and a script without a ``__main__`` guard all end at once with an error that says what
happened. Each scenario runs in its own Python process with a timeout, so that a hang fails the test."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gbw_panoptic
from gbw_panoptic.utils.parallel import parallel_map

TIMEOUT_S = 120


def _run_script(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    package_root = str(Path(gbw_panoptic.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=tmp_path
    )


def test_results_in_order_or_as_they_finish():
    assert list(parallel_map(abs, range(-9, 0), 2, chunksize=2)) == list(range(9, 0, -1))
    assert sorted(parallel_map(abs, range(-9, 0), 2, ordered=False, chunksize=4)) == list(range(1, 10))


def test_an_error_of_the_function_is_raised_as_it_is():
    with pytest.raises(ValueError, match="invalid literal"):
        list(parallel_map(int, ["1", "x", "3"], 2))


def test_a_worker_that_dies_raises_instead_of_being_restarted(tmp_path):
    completed = _run_script(
        tmp_path,
        """
        import os
        from gbw_panoptic.utils.parallel import WorkerPoolError, parallel_map

        if __name__ == "__main__":
            try:
                list(parallel_map(os._exit, [3, 3, 3, 3], 2))  # each task ends its worker process
            except WorkerPoolError as error:
                print("raised:", error)
        """,
    )
    assert completed.returncode == 0, completed.stderr
    assert "raised: a worker process (forkserver start) stopped abruptly" in completed.stdout


def test_a_worker_killed_in_the_middle_of_the_work_raises(tmp_path):
    """SIGKILL of a worker (as the kernel's out-of-memory killer does) while the others work."""
    completed = _run_script(
        tmp_path,
        """
        import os, signal, time
        from gbw_panoptic.utils.parallel import parallel_map

        def work(item):
            if item == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.05)
            return item

        if __name__ == "__main__":
            for item in parallel_map(work, range(40), 2, ordered=False):
                print("done", item, flush=True)
        """,
    )
    assert completed.returncode == 1
    assert "WorkerPoolError: a worker process (forkserver start) stopped abruptly, killed" in completed.stderr
    assert "done 5" not in completed.stdout and completed.stdout.count("done") < 40


def test_script_without_main_guard_fails_at_once_saying_what_to_do(tmp_path):
    """The workers import the main script again, where it would start its work (and a pool) anew."""
    completed = _run_script(
        tmp_path,
        """
        from gbw_panoptic.utils.parallel import parallel_map

        print(sum(parallel_map(abs, range(-10, 0), 2)))
        """,
    )
    assert completed.returncode == 1
    guard_advice = 'put the code that runs when the script is executed under `if __name__ == "__main__":`'
    # The workers say why they stopped and the caller raises at once with the same advice (the workers'
    # and the caller's tracebacks share stderr, in no fixed order).
    assert "RuntimeError: parallel_map was called while a worker process was starting" in completed.stderr
    assert "WorkerPoolError: a worker process (forkserver start) stopped abruptly" in completed.stderr
    assert completed.stderr.count(guard_advice) >= 2
