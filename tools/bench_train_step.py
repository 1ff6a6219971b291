#!/usr/bin/env python
"""Benchmark a full UDA training step with GBW on all three losses against the same step without.

Builds two :class:`~gbw_panoptic.uda.trainer.UDATrainer` from one config (default
``configs/synthetic/dacs.yaml``: DACS, MiT-B0, 128x128 crops, instance targets mixed onto the target
images), the second with ``MODEL.GBW.{SEM_SEG,CENTER,OFFSET}.ENABLED True`` and nothing else changed,
from the same initial weights. Both run ``UDATrainer.run_step`` (source losses, teacher
pseudo-labels, ClassMix, mixed losses, optimizer step) on the same pre-loaded batches, with the
random generators reseeded alike before each step, round-robin (one step of each in turn) so that
load from other processes hits both alike. The synthetic benchmark is generated into a temporary
directory unless ``--datasets`` names a prepared ``$DETECTRON2_DATASETS`` root.

Reports the median, min and max wall-clock seconds per step of each arm and the median CPU seconds
of this process (steadier on a shared machine), the ratio of the medians and the median of the
per-repeat ratios (GBW step / plain step) in both clocks, as a table and as JSON.

Example:
    python tools/bench_train_step.py --threads 1 --repeats 20 --out output/bench/bench_train_step.json
"""
import argparse
import os
import random
import statistics
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.utils.events import EventStorage
from tabulate import tabulate
from tqdm import tqdm

from bench_gbw import machine_info, time_round_robin, write_report
from gbw_panoptic.config import add_gbw_panoptic_config
from gbw_panoptic.data.datasets import register_all
from gbw_panoptic.data.datasets.synthetic import prepare_synthetic
from gbw_panoptic.uda.trainer import UDATrainer

REPO_ROOT = Path(__file__).resolve().parents[1]
GBW_LOSSES = ("SEM_SEG", "CENTER", "OFFSET")
ARMS = ("without GBW", "GBW on all three losses")


def build_cfg(config_file: str, output_dir: str, gbw: bool, opts: Sequence[str]) -> CfgNode:
    """The config of one arm: ``config_file`` + ``opts``, GBW on or off for the three losses."""
    cfg = get_cfg()
    add_gbw_panoptic_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    for loss in GBW_LOSSES:
        cfg.merge_from_list([f"MODEL.GBW.{loss}.ENABLED", gbw])
    cfg.merge_from_list(["OUTPUT_DIR", output_dir, "TEST.EVAL_PERIOD", 0])
    cfg.freeze()
    return cfg


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
        trainers = {}
        for arm, gbw in zip(ARMS, (False, True)):
            cfg = build_cfg(args.config_file, str(Path(scratch) / arm.replace(" ", "_")), gbw, args.opts)
            seed_everything(0)
            trainers[arm] = UDATrainer(cfg)
        first = trainers[ARMS[0]]
        first.data_loader.seek(0)
        loader = iter(first.data_loader)
        batches = [next(loader) for _ in range(args.batches)]
        device = first.model.device
        paths = {arm: step_runner(trainer, batches) for arm, trainer in trainers.items()}
        load_before = os.getloadavg()
        with tqdm(total=args.repeats, desc="bench_train_step", unit="repeat") as progress:
            times, cpu_times = time_round_robin(paths, args.repeats, args.warmup, device, progress)
        load_after = os.getloadavg()

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
        plain, weighted = (seconds[arm] for arm in ARMS)
        ratios[f"{clock}_ratio_of_medians"] = statistics.median(weighted) / statistics.median(plain)
        ratios[f"{clock}_median_of_ratios"] = statistics.median(w / p for w, p in zip(weighted, plain))
    rows = [
        [arm, f"{s['median_s']:.3f}", f"{s['min_s']:.3f}", f"{s['max_s']:.3f}", f"{s['median_cpu_s']:.3f}"]
        for arm, s in stats.items()
    ]
    rows.append(["ratio of medians (GBW / without)", f"{ratios['wall_ratio_of_medians']:.3f}x", "", "",
                 f"{ratios['cpu_ratio_of_medians']:.3f}x"])
    rows.append(["median of per-repeat ratios", f"{ratios['wall_median_of_ratios']:.3f}x", "", "",
                 f"{ratios['cpu_median_of_ratios']:.3f}x"])
    machine = machine_info(device, load_before, load_after)
    print(f"config {args.config_file} {' '.join(args.opts)}; device {device} ({machine['device']}), "
          f"{machine['torch_threads']} torch threads")
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")
    print(tabulate(rows, headers=["training step", "median s", "min s", "max s", "median CPU s"], tablefmt="github"))

    report = {
        "config_file": args.config_file,
        "opts": list(args.opts),
        "repeats": args.repeats,
        "batches": args.batches,
        "machine": machine,
        "timings": stats,
        "seconds": times,
        "cpu_seconds": cpu_times,
        "ratios": ratios,
    }
    print(f"wrote {write_report(args.out, report)}")


if __name__ == "__main__":
    main()
