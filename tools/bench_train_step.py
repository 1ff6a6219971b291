#!/usr/bin/env python
"""Benchmark a full UDA training step: two variants of it, timed in one run.

Builds two :class:`~gbw_panoptic.uda.trainer.UDATrainer` from one config (default
``configs/synthetic/dacs.yaml``: DACS, MiT-B0, 128x128 crops, instance targets mixed onto the target
images) and the same initial weights, which differ by ``--compare``:

- ``gbw`` (default): the second arm with ``MODEL.GBW.{SEM_SEG,CENTER,OFFSET}.ENABLED True``, the first
  with them False, nothing else changed;
- ``teacher``: the config as given in both; the first arm's EMA teacher predicts every output of the
  model and keeps the class logits (:class:`AllOutputsTeacher`, the reference), the second's only the
  class logits (:meth:`~gbw_panoptic.uda.teacher.EMATeacher.predict_sem_seg`, what training runs).
  The training must not change: the report says whether the two students and the two teachers'
  parameters are bit-identical after all the steps.

Both run ``UDATrainer.run_step`` (source losses, teacher pseudo-labels, ClassMix, mixed losses,
optimizer step) on the same pre-loaded batches, with the random generators reseeded alike before
each step, round-robin (one step of each in turn) so that load from other processes hits both alike.
The synthetic benchmark is generated into a temporary directory unless ``--datasets`` names a
prepared ``$DETECTRON2_DATASETS`` root.

Reports the median, min and max wall-clock seconds per step of each arm and the median CPU seconds
of this process (steadier on a shared machine), the ratio of the medians and the median of the
per-repeat ratios (second arm / first arm) in both clocks, as a table and as JSON.

Examples:
    python tools/bench_train_step.py --threads 1 --repeats 20 --out output/bench/bench_train_step.json
    python tools/bench_train_step.py --compare teacher --config-file configs/synthetic/dacs_gbw.yaml \\
        --threads 1 --repeats 12 --out output/bench/bench_train_step_teacher.json
"""
import argparse
import os
import random
import statistics
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.utils.events import EventStorage
from tabulate import tabulate
from tqdm import tqdm

from _common import machine_info, time_round_robin, write_report
from gbw_panoptic.config import add_gbw_panoptic_config
from gbw_panoptic.data.datasets import register_all
from gbw_panoptic.data.prepare.synthetic import prepare_synthetic
from gbw_panoptic.uda.teacher import EMATeacher
from gbw_panoptic.uda.trainer import UDATrainer

REPO_ROOT = Path(__file__).resolve().parents[1]
GBW_LOSSES = ("SEM_SEG", "CENTER", "OFFSET")
# --compare: (first arm, second arm) and the label of the ratio second / first.
COMPARISONS = {
    "gbw": (("without GBW", "GBW on all three losses"), "GBW / without"),
    "teacher": (("teacher: all outputs (reference)", "teacher: class logits only"), "class logits only / all outputs"),
}
ARMS = COMPARISONS["gbw"][0]


class AllOutputsTeacher(EMATeacher):
    """The EMA teacher predicting as it did before it ran the semantic head alone: every output of the
    model's ``predict_dense`` (the instance head's center and offsets too), of which the class logits
    are kept. The reference arm of ``--compare teacher``."""

    def predict_sem_seg(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.predict_dense(images)["sem_seg"]


def use_all_outputs_teacher(trainer: UDATrainer) -> None:
    """Replace the EMA teacher of ``trainer``'s method by an :class:`AllOutputsTeacher` in the same state."""
    teacher = getattr(trainer.method, "teacher", None)
    if not isinstance(teacher, EMATeacher):
        raise ValueError(
            f"--compare teacher needs a method with an EMA teacher (UDA.METHOD dacs), got {trainer.cfg.UDA.METHOD!r}"
        )
    reference = AllOutputsTeacher(teacher.model, teacher.alpha)
    reference.load_state_dict(teacher.state_dict())
    trainer.method.teacher = reference


def build_cfg(config_file: str, output_dir: str, gbw: Optional[bool], opts: Sequence[str]) -> CfgNode:
    """The config of one arm: ``config_file`` + ``opts``, GBW on or off for the three losses (None:
    as the config says)."""
    cfg = get_cfg()
    add_gbw_panoptic_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if gbw is not None:
        for loss in GBW_LOSSES:
            cfg.merge_from_list([f"MODEL.GBW.{loss}.ENABLED", gbw])
    cfg.merge_from_list(["OUTPUT_DIR", output_dir, "TEST.EVAL_PERIOD", 0])
    cfg.freeze()
    return cfg


def build_trainers(compare: str, config_file: str, scratch: Path, opts: Sequence[str]) -> Dict[str, UDATrainer]:
    """The two arms' trainers of ``--compare compare``, from the same initial weights."""
    arms, _ = COMPARISONS[compare]
    trainers = {}
    for index, arm in enumerate(arms):
        gbw = bool(index) if compare == "gbw" else None
        cfg = build_cfg(config_file, str(scratch / f"arm{index}"), gbw, opts)
        seed_everything(0)
        trainers[arm] = UDATrainer(cfg)
    if compare == "teacher":
        use_all_outputs_teacher(trainers[arms[0]])
    return trainers


def same_training(first: UDATrainer, second: UDATrainer) -> Dict[str, bool]:
    """Whether the students' state (parameters and buffers) and the EMA teachers' parameters of the two
    trainers are bit-identical (the teachers' batch-norm buffers are left out: the teacher normalises
    with batch statistics, so no prediction reads them)."""

    def identical(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)

    return {
        "students_identical": identical(first.model.state_dict(), second.model.state_dict()),
        "teacher_parameters_identical": identical(
            dict(first.method.teacher.named_parameters()), dict(second.method.teacher.named_parameters())
        ),
    }


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def step_runner(trainer: UDATrainer, batches: List[Tuple[list, list]]) -> Callable[[], None]:
    """A callable running one training step of ``trainer`` per call on ``batches`` in turn, the
    random generators seeded with the step number first."""
    state = {"step": 0}

    def run() -> None:
        step = state["step"]
        state["step"] += 1
        seed_everything(step)
        trainer.iter = step
        trainer._data_loader_iter = iter([batches[step % len(batches)]])
        with EventStorage(step) as storage:
            trainer.storage = storage
            trainer.run_step()

    return run


def prepare_datasets(root: Optional[str], scratch: Path, num_source: int = 8) -> str:
    """``root`` if given, else a small synthetic benchmark (``num_source`` source images of 128x256)
    generated under ``scratch``; its datasets registered."""
    if root is None:
        root = str(scratch / "datasets")
        reports = prepare_synthetic(
            str(Path(root) / "synthetic"), seed=0, num_source=num_source, num_target_train=4, num_target_val=2,
            height=128, width=256,
        )
        failures = [(name, report.failures) for name, report in reports if report.failures]
        if failures:
            raise RuntimeError(f"preparing the synthetic benchmark failed: {failures}")
    register_all(root)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config-file", default=str(REPO_ROOT / "configs" / "synthetic" / "dacs.yaml"),
        help="config of both arms (default: configs/synthetic/dacs.yaml)",
    )
    parser.add_argument(
        "--compare", choices=sorted(COMPARISONS), default="gbw",
        help="what differs between the arms: GBW off / on (gbw, default), or the EMA teacher predicting every "
        "output / the class logits only (teacher; config as given)",
    )
    parser.add_argument("--datasets", default=None, help="prepared $DETECTRON2_DATASETS root (default: generate one)")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per arm (default: 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per arm first (default: 2)")
    parser.add_argument("--batches", type=int, default=4, help="distinct pre-loaded batches, cycled (default: 4)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default="output/bench/bench_train_step.json", help="JSON report path")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ... for both arms")
    args = parser.parse_args()
    if args.repeats < 1 or args.batches < 1:
        parser.error("--repeats and --batches must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as scratch:
        prepare_datasets(args.datasets, Path(scratch))
        arms, ratio_label = COMPARISONS[args.compare]
        try:
            trainers = build_trainers(args.compare, args.config_file, Path(scratch), args.opts)
        except ValueError as e:
            parser.error(str(e))
        first = trainers[arms[0]]
        first.data_loader.seek(0)
        loader = iter(first.data_loader)
        batches = [next(loader) for _ in range(args.batches)]
        device = first.model.device
        paths = {arm: step_runner(trainer, batches) for arm, trainer in trainers.items()}
        load_before = os.getloadavg()
        with tqdm(total=args.repeats, desc="bench_train_step", unit="repeat") as progress:
            times, cpu_times = time_round_robin(paths, args.repeats, args.warmup, device, progress)
        load_after = os.getloadavg()
        identical = same_training(*trainers.values()) if args.compare == "teacher" else None

    stats = {
        arm: {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "max_s": max(t),
            "median_cpu_s": statistics.median(cpu_times[arm]),
        }
        for arm, t in times.items()
    }
    ratios = {}
    for clock, seconds in (("wall", times), ("cpu", cpu_times)):
        reference, variant = (seconds[arm] for arm in arms)
        ratios[f"{clock}_ratio_of_medians"] = statistics.median(variant) / statistics.median(reference)
        ratios[f"{clock}_median_of_ratios"] = statistics.median(v / r for v, r in zip(variant, reference))
    rows = [
        [arm, f"{s['median_s']:.3f}", f"{s['min_s']:.3f}", f"{s['max_s']:.3f}", f"{s['median_cpu_s']:.3f}"]
        for arm, s in stats.items()
    ]
    rows.append([f"ratio of medians ({ratio_label})", f"{ratios['wall_ratio_of_medians']:.3f}x", "", "",
                 f"{ratios['cpu_ratio_of_medians']:.3f}x"])
    rows.append(["median of per-repeat ratios", f"{ratios['wall_median_of_ratios']:.3f}x", "", "",
                 f"{ratios['cpu_median_of_ratios']:.3f}x"])
    machine = machine_info(device, load_before, load_after)
    print(f"config {args.config_file} {' '.join(args.opts)}; device {device} ({machine['device']}), "
          f"{machine['torch_threads']} torch threads")
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")
    print(tabulate(rows, headers=["training step", "median s", "min s", "max s", "median CPU s"], tablefmt="github"))
    if identical is not None:
        print(f"after {args.warmup + args.repeats} steps of each arm: students bit-identical "
              f"{identical['students_identical']}, teacher parameters bit-identical "
              f"{identical['teacher_parameters_identical']}")

    report = {
        "config_file": args.config_file,
        "compare": args.compare,
        "arms": list(arms),
        "opts": list(args.opts),
        "repeats": args.repeats,
        "batches": args.batches,
        "machine": machine,
        "timings": stats,
        "seconds": times,
        "cpu_seconds": cpu_times,
        "ratios": ratios,
    }
    if identical is not None:
        report["identical_after_all_steps"] = identical
    print(f"wrote {write_report(args.out, report)}")


if __name__ == "__main__":
    main()
