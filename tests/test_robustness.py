"""Faults a hostile user or a cluster causes, injected on purpose: truncated images and checkpoints,
two runs on one OUTPUT_DIR, killed processes, SIGTERM, bad config values, interrupted converters."""
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from detectron2.engine import HookBase, default_argument_parser

from gbw_panoptic.uda import UDATrainer
from gbw_panoptic.uda.signals import TrainingInterrupted
from gbw_panoptic.uda.cli import build_parser, load_config, run, setup

import test_uda_training
from test_tools_viz import VAL, _evaluation_folder, _tool

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(REPO_ROOT / "configs" / "synthetic" / "dacs_gbw.yaml")
# The tiny training settings of the end-to-end tests, without evaluation.
TINY = [*test_uda_training.TINY, "DATASETS.TEST", "()"]


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _holder(directory: Path) -> subprocess.Popen:
    """A separate process that locks ``directory`` and waits (until killed). It loads only the lock's module
    (standard library), not the package, so that it starts in a fraction of a second."""
    code = (
        "import importlib.util, sys, time\n"
        "spec = importlib.util.spec_from_file_location('output_lock', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "module.lock_output_dir(sys.argv[2]); print('locked', flush=True); time.sleep(600)\n"
    )
    from gbw_panoptic.uda import output_lock

    command = [sys.executable, "-c", code, output_lock.__file__, str(directory)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


# --------------------------------------------------------------------------- config errors, weights
@pytest.mark.parametrize(
    "key, value",
    [
        ("MODEL.GBW.CENTER.LAMBDA_MODE", "foo"),
        ("MODEL.GBW.SEM_SEG.SOLVER", "qp"),
        ("MODEL.GBW.SEM_SEG.MODE", "pixel"),
        ("MODEL.GBW.CENTER.PIXEL_CLASS", "thing"),
        ("INPUT.RANDOM_FLIP", "diagonal"),
        ("SOLVER.OPTIMIZER", "adam"),
    ],
)
def test_config_error_names_the_full_key_before_anything_is_written(tmp_path, key, value):
    output_dir = tmp_path / "run"
    with pytest.raises(ValueError) as error:
        run(["--config-file", CONFIG, "OUTPUT_DIR", str(output_dir), key, value])
    assert f"{key}=" in str(error.value) and value in str(error.value)
    assert not output_dir.exists()


def test_clip_type_is_checked_when_clipping_is_on(tmp_path):
    output_dir = tmp_path / "run"
    clip_type = ["SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model"]
    with pytest.raises(ValueError) as error:
        run(["--config-file", CONFIG, "OUTPUT_DIR", str(output_dir), "SOLVER.CLIP_GRADIENTS.ENABLED", "True", *clip_type])
    assert "SOLVER.CLIP_GRADIENTS.CLIP_TYPE='full_model'" in str(error.value)
    assert not output_dir.exists()
    # Unused while clipping is off: accepted, as Detectron2 does.
    load_config(build_parser().parse_args(["--config-file", CONFIG, *clip_type]))


def test_eval_only_needs_weights(tmp_path):
    output_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"--eval-only needs weights to evaluate: MODEL.WEIGHTS"):
        run(["--eval-only", "--config-file", CONFIG, "OUTPUT_DIR", str(output_dir)])
    assert not output_dir.exists()
    with pytest.raises(FileNotFoundError, match=r"MODEL.WEIGHTS='.*missing.pth': no such file"):
        run(["--eval-only", "--config-file", CONFIG, "OUTPUT_DIR", str(output_dir), "MODEL.WEIGHTS", str(tmp_path / "missing.pth")])
    # Allowed: an explicit request for random weights, or --resume from a checkpoint in OUTPUT_DIR.
    load_config(build_parser().parse_args(["--eval-only", "--eval-random-weights", "--config-file", CONFIG]))
    output_dir.mkdir()
    (output_dir / "last_checkpoint").write_text("model_final.pth")
    load_config(build_parser().parse_args(["--eval-only", "--resume", "--config-file", CONFIG, "OUTPUT_DIR", str(output_dir)]))


# --------------------------------------------------------------------------- OUTPUT_DIR lock
@pytest.mark.parametrize("processes", [[], ["--num-gpus", "2", "--dist-url", "auto"]], ids=["single", "two_processes"])
def test_second_run_on_a_directory_in_use_fails_at_once(tmp_path, processes):
    from gbw_panoptic.uda.output_lock import LOCK_FILE_NAME, OutputDirInUseError, lock_output_dir, unlock_output_dir

    holder = _holder(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(OutputDirInUseError, match=rf"OUTPUT_DIR {tmp_path} is in use by another run \(pid {holder.pid} on host "):
            run([*processes, "--config-file", CONFIG, "OUTPUT_DIR", str(tmp_path), *TINY])
        assert time.monotonic() - start < 30
        assert sorted(os.listdir(tmp_path)) == [LOCK_FILE_NAME]  # no log.txt, config.yaml, checkpoint
    finally:
        holder.kill()
        holder.wait()
    # The holder died without unlocking (kill -9): its stale lock is taken over.
    lock_output_dir(str(tmp_path))
    try:
        assert json.loads((tmp_path / LOCK_FILE_NAME).read_text())["pid"] == os.getpid()
    finally:
        unlock_output_dir(str(tmp_path))


# --------------------------------------------------------------------------- checkpoints
def _tiny_checkpoints(directory: Path):
    """model_0000002.pth, model_0000005.pth of a small module (weights 2.0 and 5.0), tagged last: 5."""
    from gbw_panoptic.uda.checkpoint import AtomicCheckpointer

    model = torch.nn.Linear(3, 2)
    checkpointer = AtomicCheckpointer(model, str(directory))
    for iteration in (2, 5):
        torch.nn.init.constant_(model.weight, float(iteration))
        checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
    return model, checkpointer


def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path, caplog):
    from gbw_panoptic.uda.checkpoint import CorruptCheckpointError

    model, checkpointer = _tiny_checkpoints(tmp_path)
    _truncate(tmp_path / "model_0000005.pth")
    torch.nn.init.zeros_(model.weight)
    checkpoint = checkpointer.resume_or_load("", resume=True)
    assert checkpoint["iteration"] == 2 and torch.all(model.weight == 2.0)
    assert "model_0000005.pth cannot be read (truncated or corrupt)" in caplog.text

    _truncate(tmp_path / "model_0000002.pth")
    with pytest.raises(CorruptCheckpointError, match=r"no readable checkpoint in .*model_0000005.pth cannot be read"):
        checkpointer.resume_or_load("", resume=True)


def test_resume_fall_back_with_a_load_that_keeps_state_after_failing(tmp_path, monkeypatch):
    """Upstream Detectron2's ``DetectionCheckpointer.load`` sets ``_parsed_url_during_load``, asserts on
    entry that it is None and does not reset it when loading raises; emulated on v0.6."""
    import inspect

    from detectron2.checkpoint import DetectionCheckpointer

    original_load = DetectionCheckpointer.load
    upstream = "_parsed_url_during_load" in inspect.getsource(original_load)

    def upstream_load(self, path, *args, **kwargs):
        assert getattr(self, "_parsed_url_during_load", None) is None
        self._parsed_url_during_load = path
        result = original_load(self, path, *args, **kwargs)
        self._parsed_url_during_load = None
        return result

    if not upstream:
        monkeypatch.setattr(DetectionCheckpointer, "load", upstream_load)
    model, checkpointer = _tiny_checkpoints(tmp_path)
    _truncate(tmp_path / "model_0000005.pth")
    torch.nn.init.zeros_(model.weight)
    checkpoint = checkpointer.resume_or_load("", resume=True)
    assert checkpoint["iteration"] == 2 and torch.all(model.weight == 2.0)


def test_stale_temporary_files_are_removed_at_setup(tmp_path):
    from gbw_panoptic.uda.cli import setup
    from gbw_panoptic.uda.output_lock import unlock_output_dir

    (tmp_path / "inference" / "val").mkdir(parents=True)
    # Names as gbw_panoptic.utils.io gives its temporary files: .<stem>.<random>.tmp<extension>.
    stale = [
        tmp_path / ".model_0000005.k2j4h1.tmp.pth",
        tmp_path / ".last_checkpoint.0a1b2c3d.tmp",
        tmp_path / "inference" / "val" / ".sem_seg.8fj2aa00.tmp.json",
    ]
    kept = [tmp_path / "notes.tmp.txt", tmp_path / "model_0000002.pth", tmp_path / "inference" / "val" / "sem_seg.json"]
    for path in stale + kept:
        path.write_bytes(b"x")
    args = default_argument_parser().parse_args(["--config-file", CONFIG, "OUTPUT_DIR", str(tmp_path)])
    try:
        setup(args)
    finally:
        unlock_output_dir(str(tmp_path))
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)


def test_resume_with_a_new_learning_rate_uses_the_config():
    from detectron2.config import get_cfg

    from gbw_panoptic.config import add_gbw_panoptic_config
    from gbw_panoptic.uda.optim import build_lr_scheduler, build_optimizer
    from gbw_panoptic.uda.trainer import _rates, _restore_rates

    def build(base_lr):
        cfg = get_cfg()
        add_gbw_panoptic_config(cfg)
        cfg.merge_from_list(["SOLVER.BASE_LR", str(base_lr), "SOLVER.MAX_ITER", "100", "SOLVER.WARMUP_ITERS", "0"])
        model = torch.nn.Module()
        model.backbone, model.head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        optimizer = build_optimizer(cfg, model)
        return optimizer, build_lr_scheduler(cfg, optimizer)

    old_optimizer, old_scheduler = build(1e-3)
    for _ in range(50):
        old_optimizer.step()
        old_scheduler.step()
    optimizer, scheduler = build(5e-4)
    config_values = _rates(optimizer)
    optimizer.load_state_dict(old_optimizer.state_dict())
    scheduler.load_state_dict(old_scheduler.state_dict())
    changes = _restore_rates("student", optimizer, scheduler, config_values)
    assert changes and "student group backbone base lr 0.001 (checkpoint) -> 0.0005 (config)" in changes
    for group, old_group in zip(optimizer.param_groups, old_optimizer.param_groups):
        assert group["initial_lr"] == pytest.approx(old_group["initial_lr"] / 2)  # head groups: 10x
        assert group["lr"] == pytest.approx(old_group["lr"] / 2)  # same place in the schedule, half the rate
    scheduler.step()
    old_scheduler.step()
    for group, old_group in zip(optimizer.param_groups, old_optimizer.param_groups):
        assert group["lr"] == pytest.approx(old_group["lr"] / 2)


# --------------------------------------------------------------------------- image reads
def _truncated_copy(path: str, tmp_path: Path) -> str:
    copy = tmp_path / os.path.basename(path)
    shutil.copy(path, copy)
    _truncate(copy)
    return str(copy)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_image_is_named_by_the_training_loader(synthetic_datasets, tmp_path, num_workers):
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog

    from gbw_panoptic.config import add_gbw_panoptic_config
    from gbw_panoptic.data import GBWPanopticDatasetMapper, ShuffledIndexStream, TrainStream, build_stream_loader

    cfg = get_cfg()
    add_gbw_panoptic_config(cfg)
    cfg.merge_from_file(CONFIG)
    record = dict(DatasetCatalog.get("synthetic_source_panoptic_train")[0])
    record["file_name"] = _truncated_copy(record["file_name"], tmp_path)
    mapper = GBWPanopticDatasetMapper(cfg, is_train=True, load_labels=True)
    loader = build_stream_loader(TrainStream([record], mapper, ShuffledIndexStream(1), 1, seed=0), num_workers)
    children = set(multiprocessing.active_children())
    with pytest.raises(OSError if num_workers == 0 else Exception) as error:
        next(iter(loader))
    assert f"cannot read image file {record['file_name']}" in str(error.value)
    assert "truncated" in str(error.value)
    # The workers have stopped by the time the error is caught, though it is kept: they ignore SIGTERM, so a worker
    # left alive would make the interpreter's exit (after `tools/train_net.py` printed the error) wait forever.
    assert set(multiprocessing.active_children()) == children


def test_truncated_label_is_named_by_mapper_and_evaluator(synthetic_datasets, tmp_path):
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog

    from gbw_panoptic.config import add_gbw_panoptic_config
    from gbw_panoptic.data import GBWPanopticDatasetMapper
    from gbw_panoptic.evaluation import GBWSemSegEvaluator

    cfg = get_cfg()
    add_gbw_panoptic_config(cfg)
    cfg.merge_from_file(CONFIG)
    record = dict(DatasetCatalog.get("synthetic_target_panoptic_val")[0])
    record["sem_seg_file_name"] = _truncated_copy(record["sem_seg_file_name"], tmp_path)
    with pytest.raises(OSError, match=f"cannot read image file {record['sem_seg_file_name']}"):
        GBWPanopticDatasetMapper(cfg, is_train=False, load_labels=True)(record)
    evaluator = GBWSemSegEvaluator("synthetic_target_panoptic_val")
    scores = torch.zeros(19, record["height"], record["width"])
    with pytest.raises(OSError, match=f"cannot read image file {record['sem_seg_file_name']}"):
        evaluator.process([record], [{"sem_seg": scores}])


# --------------------------------------------------------------------------- converters
@pytest.mark.parametrize("extension", ["png", "jpg"])
def test_image_check_detects_truncation(tmp_path, extension):
    from PIL import Image

    from gbw_panoptic.data.image_io import image_decode_error

    path = tmp_path / f"image.{extension}"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
    assert image_decode_error(str(path)) is None
    _truncate(path, keep=0.95)
    assert image_decode_error(str(path)).startswith(f"{path}: truncated or corrupt")


@pytest.fixture
def target_copy(synthetic_datasets, tmp_path) -> Path:
    """A copy of the prepared synthetic target domain (Cityscapes layout)."""
    root = tmp_path / "target"
    shutil.copytree(synthetic_datasets / "synthetic" / "target", root)
    return root


def test_prepare_rechecks_truncated_inputs_and_outputs(target_copy):
    from gbw_panoptic.data.prepare.cityscapes import prepare_cityscapes

    images = sorted((target_copy / "leftImg8bit" / "val").rglob("*_leftImg8bit.png"))
    labels = sorted((target_copy / "gtFine" / "val").rglob("*_labelTrainIds.png"))
    _truncate(images[0])
    _truncate(labels[1])
    report = prepare_cityscapes(str(target_copy), "val")
    assert [inputs.split(", ")[0] for inputs, _ in report.failures] == [str(images[0])]
    assert report.converted == 1 and report.skipped == len(images) - 2 and report.exit_code == 1


def test_generator_rewrites_truncated_files(synthetic_datasets, tmp_path):
    from gbw_panoptic.data.prepare.synthetic import generate_synthetic

    out = tmp_path / "synthetic"
    settings = dict(seed=0, num_source=2, num_target_train=1, num_target_val=1, height=64, width=128)
    generate_synthetic(str(out), **settings)
    image = next((out / "target" / "leftImg8bit" / "val").rglob("*.png"))
    original = image.read_bytes()
    _truncate(image)
    generate_synthetic(str(out), **settings)
    assert image.read_bytes() == original


def test_interrupted_prepare_keeps_the_finished_images(target_copy, monkeypatch):
    from gbw_panoptic.data.prepare import cityscapes as module

    for name in ("cityscapes_panoptic_val.json", "class_stats_val.json", "class_frequencies_val.json"):
        (target_copy / "gtFine" / name).unlink()
    shutil.rmtree(target_copy / "gtFine" / "cityscapes_panoptic_val")
    convert = module._convert_cityscapes_image
    calls = []

    def interrupted_after_two(job):
        calls.append(job.image_id)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third image
        return convert(job)

    monkeypatch.setattr(module, "_convert_cityscapes_image", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        module.prepare_cityscapes(str(target_copy), "val")
    monkeypatch.setattr(module, "_convert_cityscapes_image", convert)
    report = module.prepare_cityscapes(str(target_copy), "val")
    assert (report.skipped, report.converted, report.failures) == (2, 4, [])
    assert len(report.records) == 6
    assert not list((target_copy / "gtFine").glob(".*.progress"))


# --------------------------------------------------------------------------- tools
def test_compare_runs_shows_pq_as_missing_for_a_run_without_it(synthetic_datasets, tmp_path, capsys):
    import csv

    run_a, run_b = tmp_path / "run_a", tmp_path / "run_b"
    _evaluation_folder(run_a / "inference" / VAL, seed=1)
    _evaluation_folder(run_b / "inference" / VAL, seed=2)
    (run_b / "inference" / VAL / "panoptic_seg.json").unlink()
    assert _tool("compare_runs").main([str(run_a), str(run_b), "--output-dir", str(tmp_path / "cmp")]) == 0
    assert "run B has no panoptic_seg.json: its PQ are n/a" in capsys.readouterr().err
    with open(tmp_path / "cmp" / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(row["PQ B"] in ("", "nan") for row in rows)
    assert any(row["PQ A"] not in ("", "nan") for row in rows)
    assert "run B has no panoptic_seg.json" in (tmp_path / "cmp" / "compare.md").read_text()


def test_visualize_names_a_prediction_of_the_wrong_size(synthetic_datasets, tmp_path):
    import cv2

    folder = tmp_path / "run" / "inference" / VAL
    _evaluation_folder(folder, seed=1)
    prediction = sorted((folder / "panoptic_predictions").glob("*.png"))[0]
    cv2.imwrite(str(prediction), np.zeros((64, 100, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=rf"prediction PNG {prediction} is 64x100 \(HxW\) but its image .* is 128x256"):
        _tool("visualize").main(["--dataset", VAL, "--predictions", str(folder), "--output-dir", str(tmp_path / "pictures")])


# --------------------------------------------------------------------------- SIGTERM, end to end
def _train_command(output_dir: Path, *extra: str, flags=()) -> list:
    return [sys.executable, str(REPO_ROOT / "tools" / "train_net.py"), *flags, "--config-file", CONFIG, *TINY,
            "OUTPUT_DIR", str(output_dir), "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "100", *extra]  # fmt: skip


def _iterations_logged(output_dir: Path) -> int:
    try:
        lines = (output_dir / "metrics.json").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum('"total_loss"' in line for line in lines)


class _SignalDuringIteration(HookBase):
    """Sends ``signum`` to this process when iteration ``iteration`` starts."""

    def __init__(self, iteration: int, signum: int):
        self.iteration, self.signum = iteration, signum

    def before_step(self):
        if self.trainer.iter == self.iteration:
            os.kill(os.getpid(), self.signum)


def test_stop_before_the_timer_warm_up_ends_cleanly_and_stops_the_loader_workers(synthetic_datasets, tmp_path):
    # Stopped after iteration 1, before the iteration timer has a time: the writers' last write when
    # training ends must not fail, and the loader workers (which ignore SIGTERM) must be stopped before
    # train() returns, or the interpreter's exit would wait for them forever.
    argv = ["--config-file", CONFIG, *TINY, "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "6", "DATALOADER.NUM_WORKERS", "2"]
    earlier_children = set(multiprocessing.active_children())  # of other tests in this process
    trainer = UDATrainer(setup(default_argument_parser().parse_args(argv)))
    trainer.register_hooks([_SignalDuringIteration(1, signal.SIGTERM)])
    trainer.resume_or_load(resume=False)
    with pytest.raises(TrainingInterrupted, match="SIGTERM: training stopped after iteration 1 of 6"):
        trainer.train()
    workers = set(multiprocessing.active_children()) - earlier_children
    trainer._data_loader_iter = None  # a failure here must not leave the test run waiting for them
    assert workers == set()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1]


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_continues_exactly(synthetic_datasets, tmp_path):
    # The uninterrupted run, the reference: train_net.py's command line, run in this process (one process start
    # less) with one thread, as the processes below.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(_train_command(tmp_path / "straight")[2:])
    finally:
        torch.set_num_threads(threads)
    env = dict(os.environ, DETECTRON2_DATASETS=str(synthetic_datasets), OMP_NUM_THREADS="1")

    # SIGTERM to the whole process group (as a cluster scheduler sends it), loader workers included.
    output_dir = tmp_path / "interrupted"
    command = _train_command(output_dir, "DATALOADER.NUM_WORKERS", "2")
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while _iterations_logged(output_dir) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    stderr = process.communicate(timeout=300)[1]
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    last = (output_dir / "last_checkpoint").read_text()
    iteration = int(last[len("model_") : -len(".pth")])
    assert 1 <= iteration < 5
    assert f"SIGTERM: training stopped after iteration {iteration} of 6" in stderr

    resumed = subprocess.run(_train_command(output_dir, flags=["--resume"]), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Starting training from iteration {iteration + 1}" in resumed.stdout
    expected = torch.load(tmp_path / "straight" / "model_final.pth", map_location="cpu", weights_only=False)
    actual = torch.load(output_dir / "model_final.pth", map_location="cpu", weights_only=False)
    # Student, EMA teacher and optimizer moments as in the uninterrupted run.
    for state_expected, state_actual in (
        (expected["model"], actual["model"]),
        (expected["trainer"]["method"], actual["trainer"]["method"]),
        (expected["trainer"]["optimizer"]["state"], actual["trainer"]["optimizer"]["state"]),
    ):
        assert state_expected.keys() == state_actual.keys()
        for key, value in state_expected.items():
            torch.testing.assert_close(state_actual[key], value, rtol=1e-5, atol=1e-6, msg=str(key))
