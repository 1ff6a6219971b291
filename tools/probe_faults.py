#!/usr/bin/env python
"""Run the project as a hostile user would, against a tiny synthetic benchmark, and report each fault.

Scenarios (each bounded by a timeout; every training is a real ``tools/train_net.py`` process):

- ``bad_config_key``: ``MODEL.GBW.CENTER.LAMBDA_MODE foo`` fails naming the key, nothing written;
- ``eval_only_without_weights``: ``--eval-only`` without ``MODEL.WEIGHTS`` fails, nothing written;
- ``truncated_image_in_training``: a truncated source image, ``DATALOADER.NUM_WORKERS 2``: the run
  fails naming the file;
- ``prepare_after_corruption``: ``prepare_cityscapes.py`` on a split with a truncated image reports that
  file and exits 1; ``prepare_synthetic.py`` regenerates its truncated file;
- ``kill_9_during_checkpoint_write``: ``kill -9`` while a checkpoint is being written; ``--resume``
  removes the temporary file and ends with the weights of an uninterrupted run;
- ``two_runs_on_one_dir``: a second run on the directory of a running one fails at once, naming it;
- ``sigterm``: SIGTERM writes a checkpoint and exits 143; ``--resume`` ends with the weights of an
  uninterrupted run;
- ``truncated_last_checkpoint``: the last checkpoint of the SIGTERM run truncated: ``--resume`` warns,
  falls back to the previous one and still ends with the uninterrupted run's weights.

Prints one line per scenario (``ok`` or ``FAILED``, the time, what was seen) and exits 1 if any failed.

Example:
    python tools/probe_faults.py --work-dir /tmp/probe
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from gbw_panoptic.data.prepare.synthetic import prepare_synthetic
from gbw_panoptic.data.image_io import image_decode_error

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(REPO_ROOT / "configs" / "synthetic" / "dacs_gbw.yaml")
# MiT-B0 with 32-channel decoders on 64x64 crops, 6 iterations, checkpoints every 2, no evaluation.
TINY = [
    "MODEL.DEVICE", "cpu", "MODEL.SEM_SEG_HEAD.EMBED_DIM", "32", "MODEL.INS_EMBED_HEAD.EMBED_DIM", "32",
    "INPUT.CROP.SIZE", "[64, 64]", "SOLVER.WARMUP_ITERS", "2", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
    "UDA.LOG_PERIOD", "1", "SEED", "7", "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2",
]  # fmt: skip
TIMEOUT_S = 400


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


class ProbeFailure(AssertionError):
    """What a scenario saw that it should not have."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ProbeFailure(message)


class Probe:
    """Runs the scenarios in ``work_dir`` on the synthetic benchmark under ``datasets``."""

    def __init__(self, work_dir: Path, datasets: Path):
        self.work_dir = work_dir
        self.datasets = datasets
        self.env = dict(os.environ, DETECTRON2_DATASETS=str(datasets), OMP_NUM_THREADS="1")
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "projects" / "gbw_panoptic"), os.environ.get("PYTHONPATH")]))

    # ------------------------------------------------------------------ helpers
    def train_command(self, output_dir: Path, *extra: str, flags: Sequence[str] = ()) -> List[str]:
        command = [sys.executable, str(REPO_ROOT / "tools" / "train_net.py"), *flags, "--config-file", CONFIG]
        return command + TINY + ["OUTPUT_DIR", str(output_dir), *extra]

    def start(self, command: List[str], log: Path) -> subprocess.Popen:
        with open(log, "w") as f:
            return subprocess.Popen(command, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, command: List[str], log: Path, timeout: float = TIMEOUT_S) -> Tuple[int, str]:
        """Run ``command`` to its end (killed after ``timeout``: a hang is reported); (exit code, output)."""
        process = self.start(command, log)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise ProbeFailure(f"hung: {' '.join(command[1:3])} still running after {timeout:.0f} s (log {log})")
        return process.returncode, log.read_text()

    @staticmethod
    def wait_for(condition: Callable[[], bool], process: subprocess.Popen, what: str, timeout: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            _check(process.poll() is None, f"the run ended (exit {process.returncode}) before {what}")
            if time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                raise ProbeFailure(f"hung: no {what} after {timeout:.0f} s")
            time.sleep(0.005)

    @staticmethod
    def iterations_logged(output_dir: Path) -> int:
        try:
            return (output_dir / "metrics.json").read_text().count('"total_loss"')
        except FileNotFoundError:
            return 0

    def same_final_weights(self, output_dir: Path) -> str:
        """Compare ``model_final.pth`` (student, EMA teacher, optimizer moments) with the uninterrupted run's."""
        expected = torch.load(self.work_dir / "straight" / "model_final.pth", map_location="cpu", weights_only=False)
        actual = torch.load(output_dir / "model_final.pth", map_location="cpu", weights_only=False)
        largest = 0.0
        for part in (lambda c: c["model"], lambda c: c["trainer"]["method"], lambda c: c["trainer"]["optimizer"]["state"]):
            state_expected, state_actual = part(expected), part(actual)
            _check(state_expected.keys() == state_actual.keys(), f"{output_dir}/model_final.pth holds other keys")
            for key, value in state_expected.items():
                values = [(value, state_actual[key])] if isinstance(value, torch.Tensor) else [
                    (v, state_actual[key][k]) for k, v in value.items() if isinstance(v, torch.Tensor)]
                for a, b in values:
                    if a.is_floating_point():
                        largest = max(largest, (a.double() - b.double()).abs().max().item())
                    else:
                        _check(torch.equal(a, b), f"{key} differs from the uninterrupted run")
        _check(largest <= 1e-6, f"final weights differ from the uninterrupted run by up to {largest:.3g}")
        return f"final weights = uninterrupted run's (max |diff| {largest:.1g})"

    @staticmethod
    def untouched(output_dir: Path) -> bool:
        return not output_dir.exists() or not any(p.name in ("config.yaml", "log.txt", "metrics.json") for p in output_dir.iterdir())

    # ------------------------------------------------------------------ scenarios
    def bad_config_key(self) -> str:
        out = self.work_dir / "bad_config"
        code, output = self.run(self.train_command(out, "MODEL.GBW.CENTER.LAMBDA_MODE", "foo"), self.work_dir / "bad_config.log")
        expected = "MODEL.GBW.CENTER.LAMBDA_MODE='foo' is unknown; expected one of ('absolute', 'relative')"
        _check(code != 0 and expected in output, f"exit {code}, the key is not named")
        _check(self.untouched(out), f"{out} was written to")
        return f"exit {code}: {expected}; nothing written"

    def eval_only_without_weights(self) -> str:
        out = self.work_dir / "eval_only"
        code, output = self.run(self.train_command(out, flags=["--eval-only"]), self.work_dir / "eval_only.log")
        _check(code != 0 and "--eval-only needs weights to evaluate" in output, f"exit {code} without the error")
        _check(self.untouched(out), f"{out} was written to")
        return f"exit {code}: --eval-only needs weights to evaluate; nothing written"

    def corrupt_copy(self, name: str) -> Tuple[Path, Path]:
        """A copy of the benchmark with one source image truncated; (datasets root, that image)."""
        datasets = self.work_dir / name
        shutil.copytree(self.datasets, datasets)
        image = sorted((datasets / "synthetic" / "source" / "RGB").glob("*.png"))[3]
        _truncate(image)
        return datasets, image

    def truncated_image_in_training(self) -> str:
        datasets, image = self.corrupt_copy("corrupt_datasets")
        env, self.env = self.env, dict(self.env, DETECTRON2_DATASETS=str(datasets))
        try:
            command = self.train_command(self.work_dir / "truncated_image", "DATALOADER.NUM_WORKERS", "2", "SOLVER.MAX_ITER", "40")
            code, output = self.run(command, self.work_dir / "truncated_image.log")
        finally:
            self.env = env
        _check(code != 0, "training with a truncated image succeeded")
        _check(f"cannot read image file {image}" in output, "the error does not name the truncated file")
        return f"exit {code}: 'cannot read image file .../{image.name} (OSError: image file is truncated ...)' (NUM_WORKERS 2)"

    def prepare_after_corruption(self) -> str:
        datasets, source_image = self.corrupt_copy("prepare_datasets")
        root = datasets / "synthetic"
        target_image = sorted((root / "target" / "leftImg8bit" / "val").rglob("*.png"))[0]
        _truncate(target_image)
        prepare = [sys.executable, str(REPO_ROOT / "datasets" / "prepare_cityscapes.py"), str(root / "target"), "--splits", "val", "--workers", "1"]
        code, output = self.run(prepare, self.work_dir / "prepare_cityscapes.log")
        _check(code == 1 and f"FAILED {target_image}" in output, f"prepare_cityscapes exit {code} without naming {target_image}")
        regenerate = [sys.executable, str(REPO_ROOT / "datasets" / "prepare_synthetic.py"), str(root), "--num-source", "16",
                      "--num-target-train", "8", "--num-target-val", "6", "--height", "128", "--width", "256", "--workers", "1"]  # fmt: skip
        code, output = self.run(regenerate, self.work_dir / "prepare_synthetic.log")
        intact = image_decode_error(str(source_image)) is None and image_decode_error(str(target_image)) is None
        _check(code == 0 and intact, f"prepare_synthetic exit {code}; truncated files intact again: {intact}")
        return "prepare_cityscapes: exit 1, 'FAILED <the truncated image>: image corrupt'; prepare_synthetic rewrote both, exit 0"

    def straight_run(self) -> str:
        code, output = self.run(self.train_command(self.work_dir / "straight"), self.work_dir / "straight.log")
        _check(code == 0, f"the uninterrupted run failed (exit {code})")
        return "reference run finished"

    def kill_9_during_checkpoint_write(self) -> str:
        out = self.work_dir / "kill9"
        process = self.start(self.train_command(out), self.work_dir / "kill9.log")
        # The second periodic checkpoint (iteration 3): kill while its temporary file is being written.
        writing = lambda: out.is_dir() and any("model_0000003" in p.name and p.name != "model_0000003.pth" for p in out.iterdir())
        self.wait_for(writing, process, "temporary file of model_0000003.pth")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        stale = [p.name for p in out.iterdir() if "model_0000003" in p.name]
        last = (out / "last_checkpoint").read_text()
        _check(last == "model_0000001.pth", f"last_checkpoint is {last} after the kill")
        code, output = self.run(self.train_command(out, flags=["--resume"]), self.work_dir / "kill9_resume.log")
        _check(code == 0, f"--resume after kill -9 failed (exit {code})")
        _check(not any(p.name in stale for p in out.iterdir()), f"temporary file {stale} left after --resume")
        return f"killed with {stale or 'no'} temporary file; resumed from {last}, temporary file removed; " + self.same_final_weights(out)

    def stop(self, process: subprocess.Popen, log: Path) -> str:
        """SIGTERM to ``process``: it must exit 143 with a message within 120 s; returns the checkpoint tagged last."""
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise ProbeFailure("hung: still running 120 s after SIGTERM")
        _check(process.returncode == 143, f"exit {process.returncode} after SIGTERM, expected 143")
        _check("SIGTERM: training stopped after iteration" in log.read_text(), "no message after SIGTERM")
        return (Path(process.args[process.args.index("OUTPUT_DIR") + 1]) / "last_checkpoint").read_text()

    def two_runs_on_one_dir(self) -> str:
        out, log = self.work_dir / "two_runs", self.work_dir / "two_runs_first.log"
        first = self.start(self.train_command(out, "SOLVER.MAX_ITER", "200"), log)
        self.wait_for(lambda: self.iterations_logged(out) >= 1, first, "iteration 0 logged")
        started = time.monotonic()
        code, output = self.run(self.train_command(out, "SOLVER.MAX_ITER", "200"), self.work_dir / "two_runs_second.log", timeout=120)
        seconds = time.monotonic() - started
        _check(code != 0 and f"is in use by another run (pid {first.pid}" in output, f"second run: exit {code} without naming the first")
        self.stop(first, log)
        return f"second run: exit {code} after {seconds:.0f} s (start-up included), 'OUTPUT_DIR ... is in use by another run (pid {first.pid} on host ...)'"

    def sigterm(self) -> str:
        out, log = self.work_dir / "sigterm", self.work_dir / "sigterm.log"
        process = self.start(self.train_command(out), log)
        self.wait_for(lambda: self.iterations_logged(out) >= 4, process, "iteration 3 logged")
        last = self.stop(process, log)
        shutil.copytree(out, self.work_dir / "sigterm_truncated")
        code, output = self.run(self.train_command(out, flags=["--resume"]), self.work_dir / "sigterm_resume.log")
        _check(code == 0, f"--resume after SIGTERM failed (exit {code})")
        return f"exit 143, last checkpoint {last}; resumed: " + self.same_final_weights(out)

    def truncated_last_checkpoint(self) -> str:
        out = self.work_dir / "sigterm_truncated"
        last = out / (out / "last_checkpoint").read_text()
        _truncate(last)
        code, output = self.run(self.train_command(out, flags=["--resume"]), self.work_dir / "truncated_resume.log")
        _check(code == 0, f"--resume with a truncated last checkpoint failed (exit {code})")
        _check(f"checkpoint {last} cannot be read (truncated or corrupt)" in output, "no warning naming the truncated checkpoint")
        fallback = output.split("Resumed from ")[1].split(" instead")[0] if "Resumed from " in output else "?"
        return f"warned '{last.name} cannot be read', resumed from {os.path.basename(fallback)}; " + self.same_final_weights(out)


def _prepare_datasets(root: Path) -> None:
    reports = prepare_synthetic(str(root / "synthetic"), seed=0, num_source=16, num_target_train=8, num_target_val=6, height=128, width=256)
    failures = [(name, report.failures) for name, report in reports if report.failures]
    if failures:
        raise RuntimeError(f"preparing the synthetic benchmark failed: {failures}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=None, help="where runs and logs go (default: a new temporary folder)")
    args = parser.parse_args(argv)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="probe_faults_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    datasets = work_dir / "datasets"
    if not (datasets / "synthetic" / "generation.json").is_file():
        _prepare_datasets(datasets)
    probe = Probe(work_dir, datasets)

    results: List[Tuple[str, bool, float, str]] = []

    def scenario(name: str, function: Callable[[], str]) -> None:
        start = time.monotonic()
        try:
            detail, passed = function(), True
        except ProbeFailure as e:
            detail, passed = str(e), False
        except Exception as e:  # a scenario that breaks is reported, the others still run
            detail, passed = f"{type(e).__name__}: {e}", False
        results.append((name, passed, time.monotonic() - start, detail))
        print(f"{'ok' if passed else 'FAILED':6} {name:32} {time.monotonic() - start:6.0f} s  {detail}", flush=True)

    scenario("bad_config_key", probe.bad_config_key)
    scenario("eval_only_without_weights", probe.eval_only_without_weights)
    scenario("truncated_image_in_training", probe.truncated_image_in_training)
    scenario("prepare_after_corruption", probe.prepare_after_corruption)
    scenario("uninterrupted_reference_run", probe.straight_run)
    scenario("kill_9_during_checkpoint_write", probe.kill_9_during_checkpoint_write)
    scenario("two_runs_on_one_dir", probe.two_runs_on_one_dir)
    scenario("sigterm", probe.sigterm)
    scenario("truncated_last_checkpoint", probe.truncated_last_checkpoint)
    failed = [name for name, passed, _, _ in results if not passed]
    print(f"{len(results) - len(failed)} of {len(results)} scenarios ok" + (f"; FAILED: {', '.join(failed)}" if failed else "") + f" (logs in {work_dir})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
