#!/usr/bin/env python
"""Benchmark one training step of HRDA against the single-scale (DAFormer) model it extends.

For each UDA method requested (``source_only``, ``dacs``), two arms are built from configs:

- ``single-scale``: the semantic DAFormer model (``GBWPanopticSegmentor`` without instance head) on
  its crop (synthetic preset: 128x128 crops of 128x256 images; full preset: 512x512);
- ``HRDA``: ``HRDASegmentor`` on its twice-as-large crop (256x256 / 1024x1024), context at 0.5 and a
  half-size detail crop.

Each step is what the UDA trainer runs: the method's ``before_step`` and ``run_step`` (source losses
and backward; with DACS also the teacher's pseudo-labels, ClassMix and the mixed losses) and the
optimizer step, on random images and blocky random labels of the arm's crop size (no data loading,
no feature distance: the encoders start from random weights). The arms run round-robin (one step of
each in turn) so that load from other processes hits them alike; the table gives median, min and max
seconds per step and the ratio HRDA / single-scale of the medians.

Memory per step: on CUDA the peak allocated memory during a step minus the memory allocated before
it (in process); on the CPU each arm runs again in a fresh process, which reports its peak resident
memory during the steps (VmHWM, reset after building) minus its resident memory before the first step.

Examples:
    python tools/bench_hrda.py --preset synthetic --device cpu --steps 5 --out output/bench/bench_hrda.json
    python tools/bench_hrda.py --preset full --device cuda --steps 10 --out output/bench/bench_hrda_full.json
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from _common import cpu_name
from tabulate import tabulate

from detectron2.config import CfgNode, get_cfg

import gbw_panoptic.data.datasets  # noqa: F401  (registers the datasets whose metadata the model reads)
from gbw_panoptic.config import add_gbw_panoptic_config
from gbw_panoptic.utils.io import write_json
from gbw_panoptic.uda import UDATrainer
from gbw_panoptic.uda.optim import build_optimizer
from gbw_panoptic.uda.runner import StudentRunner

REPO_ROOT = Path(__file__).resolve().parents[1]
# (single-scale config, HRDA config) per preset; both semantic-only.
PRESETS = {
    "synthetic": ("configs/synthetic/mit_b0_source_only.yaml", "configs/synthetic/hrda_source_only.yaml"),
    "full": ("configs/gta2cityscapes/semantic_mit_b5.yaml", "configs/gta2cityscapes/semantic_hrda_mit_b5.yaml"),
}
ARMS = ("single-scale", "HRDA")


def arm_config(preset: str, arm: str, method: str, device: str) -> CfgNode:
    """The config of one arm: the preset's config, semantic only, ``UDA.METHOD method``, random weights."""
    cfg = get_cfg()
    add_gbw_panoptic_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / PRESETS[preset][ARMS.index(arm)]))
    cfg.merge_from_list(
        [
            "MODEL.DEVICE", device, "MODEL.MIT.PRETRAINED", "", "MODEL.WEIGHTS", "",
            "MODEL.INS_EMBED_HEAD.ENABLED", False, "UDA.METHOD", method,
            "DATASETS.TRAIN", "()", "DATASETS.TARGET_TRAIN", "()",
        ]
    )  # fmt: skip
    return cfg


def random_batches(cfg: CfgNode, seed: int) -> tuple:
    """(source batch, target batch) of the config's crop size: uint8 images, blocky labels."""
    generator = torch.Generator().manual_seed(seed)
    height, width = cfg.INPUT.CROP.SIZE

    def record(labelled: bool) -> dict:
        x = {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)}
        if labelled:
            coarse = torch.randint(0, 19, (1, 1, height // 32, width // 32), generator=generator).float()
            x["sem_seg"] = torch.nn.functional.interpolate(coarse, size=(height, width))[0, 0].long()
            x["sem_seg_weights"] = torch.ones(height, width)
        return x

    source = [record(True) for _ in range(cfg.SOLVER.IMS_PER_BATCH)]
    target = [record(False) for _ in range(cfg.DATASETS.TARGET_IMS_PER_BATCH)]
    return source, target


def build_step(cfg: CfgNode) -> Callable[[int], None]:
    """One training step of ``cfg`` (before_step, run_step, optimizer step) as a function of the iteration."""
    torch.manual_seed(0)
    model = UDATrainer.build_model(cfg).train()
    method = UDATrainer.build_method(cfg, model).train()
    optimizer = build_optimizer(cfg, model)
    runner = StudentRunner(model, amp=False, grad_scaler=torch.amp.GradScaler(model.device.type, enabled=False))
    source, target = random_batches(cfg, seed=0)

    def step(iteration: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        method.before_step(model, iteration)
        method.run_step(runner, source, target if method.uses_target else [], iteration)
        optimizer.step()

    return step


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_memory_of_arm(preset: str, arm: str, method: str, steps: int) -> Dict[str, float]:
    """Run in a fresh process: build the arm, reset the peak RSS, run ``steps`` steps; MiB."""
    step = build_step(arm_config(preset, arm, method, "cpu"))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    for iteration in range(steps):
        step(iteration)
    peak = _status_kib("VmHWM")
    return {"rss_before_mib": before / 1024, "peak_rss_mib": peak / 1024, "step_memory_mib": (peak - before) / 1024}


def time_arms(preset: str, method: str, device: torch.device, steps: int, warmup: int) -> Dict[str, dict]:
    """Seconds per step (and CUDA step memory) of both arms, round-robin."""
    arm_steps = {arm: build_step(arm_config(preset, arm, method, device.type)) for arm in ARMS}
    for iteration in range(warmup):
        for step in arm_steps.values():
            step(iteration)
    times: Dict[str, List[float]] = {arm: [] for arm in ARMS}
    memory: Dict[str, List[float]] = {arm: [] for arm in ARMS}
    for iteration in range(warmup, warmup + steps):
        for arm, step in arm_steps.items():
            _synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                allocated = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            step(iteration)
            _synchronize(device)
            times[arm].append(time.perf_counter() - start)
            if device.type == "cuda":
                memory[arm].append((torch.cuda.max_memory_allocated(device) - allocated) / 2**20)
    return {
        arm: {
            "median_s": statistics.median(times[arm]),
            "min_s": min(times[arm]),
            "max_s": max(times[arm]),
            "times_s": times[arm],
            **({"step_memory_mib": statistics.median(memory[arm])} if memory[arm] else {}),
        }
        for arm in ARMS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="synthetic", help="configs (default synthetic)")
    parser.add_argument("--methods", nargs="+", choices=["source_only", "dacs"], default=["source_only", "dacs"])
    parser.add_argument("--device", default="cpu", help="torch device, cpu or cuda (default cpu)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per arm (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per arm first (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default="output/bench/bench_hrda.json", help="JSON report path")
    parser.add_argument("--memory-of", nargs=2, metavar=("METHOD", "ARM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_of:  # the child process of a CPU memory measurement
        method, arm = args.memory_of
        print(json.dumps(cpu_memory_of_arm(args.preset, arm, method, args.warmup + args.steps)))
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")

    results = {}
    for method in args.methods:
        arms = time_arms(args.preset, method, device, args.steps, args.warmup)
        if device.type == "cpu":
            for arm in ARMS:
                command = [sys.executable, __file__, "--preset", args.preset, "--memory-of", method, arm]
                command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
                command += ["--threads", str(torch.get_num_threads())]
                child = subprocess.run(command, capture_output=True, text=True, check=True)
                arms[arm].update(json.loads(child.stdout.strip().splitlines()[-1]))
        ratios = {"time_hrda_over_single_scale": arms["HRDA"]["median_s"] / arms["single-scale"]["median_s"]}
        ratios["step_memory_hrda_over_single_scale"] = (
            arms["HRDA"]["step_memory_mib"] / arms["single-scale"]["step_memory_mib"]
        )
        results[method] = {"arms": arms, "ratios": ratios}

    rows = []
    for method, result in results.items():
        for arm in ARMS:
            stats = result["arms"][arm]
            crop = arm_config(args.preset, arm, method, "cpu").INPUT.CROP.SIZE
            rows.append(
                [method, arm, f"{crop[0]}x{crop[1]}", f"{stats['median_s']:.3f}", f"{stats['min_s']:.3f}",
                 f"{stats['max_s']:.3f}", f"{stats['step_memory_mib']:.0f}"]
            )  # fmt: skip
        ratios = result["ratios"]
        rows.append(
            [method, "ratio HRDA / single-scale", "", f"{ratios['time_hrda_over_single_scale']:.2f}x", "", "",
             f"{ratios['step_memory_hrda_over_single_scale']:.2f}x"]
        )  # fmt: skip
    machine = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }
    print(f"preset {args.preset}, device {device} ({machine['device']}), {machine['torch_threads']} torch threads")
    headers = ["method", "arm", "crop", "median s/step", "min s", "max s", "step memory MiB"]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    report = {"preset": args.preset, "configs": PRESETS[args.preset], "steps": args.steps, "warmup": args.warmup}
    write_json(args.out, {**report, "machine": machine, "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
