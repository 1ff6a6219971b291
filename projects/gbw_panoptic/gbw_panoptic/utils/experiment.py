"""The synthetic-benchmark experiment behind ``make demo`` and ``make experiment``.

One experiment = a set of *arms* (a training config: a UDA method with or without GBW) × a set of
seeds, on the synthetic two-domain benchmark. Each run is an ordinary ``tools/train_net.py`` run
(its own process and ``OUTPUT_DIR``), evaluated on the target val set by the project's evaluators at
the end of training. The experiment then reads those evaluation reports and writes
``<out>/report.md``: mean ± std over seeds per arm, the effect of GBW against its baseline (paired by
seed) on rare and frequent classes, per-class recall, and pictures (recall deltas, GBW weights,
example predictions).

Runs are resumable: a finished run (its evaluation reports exist and its command is unchanged) is
skipped, an interrupted one continues from its last checkpoint (``--resume``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..evaluation.panoptic_io import atomic_write, write_json

__all__ = ["Arm", "Preset", "ARMS", "PRESETS", "RunSpec", "run_experiment"]

logger = logging.getLogger("gbw_panoptic.experiment")

REPO_ROOT = Path(__file__).resolve().parents[4]
VAL_DATASET = "synthetic_target_panoptic_val"
# A class is "rare" when it covers less than this fraction of the target train pixels
# (Cityscapes' pole, rider, motorcycle ... are all below 1%).
RARE_PIXEL_FRACTION = 0.01


@dataclass(frozen=True)
class Arm:
    """One training setting: ``config`` (relative to ``configs/``) and the arm it is compared to."""

    name: str
    config: str
    label: str
    baseline: Optional[str] = None


ARMS: "OrderedDict[str, Arm]" = OrderedDict(
    (arm.name, arm)
    for arm in (
        Arm("source_only", "synthetic/mit_b0_source_only.yaml", "source only"),
        Arm("source_only_gbw", "synthetic/mit_b0_source_only_gbw.yaml", "source only + GBW", "source_only"),
        Arm("dacs", "synthetic/dacs.yaml", "DACS"),
        Arm("dacs_gbw", "synthetic/dacs_gbw.yaml", "DACS + GBW", "dacs"),
        Arm("dacs_gbw_absolute", "synthetic/dacs_gbw_absolute.yaml", "DACS + GBW (absolute λ)", "dacs"),
        Arm("advent", "synthetic/advent.yaml", "AdvEnt"),
        Arm("advent_gbw", "synthetic/advent_gbw.yaml", "AdvEnt + GBW", "advent"),
        Arm("minent", "synthetic/minent.yaml", "MinEnt"),
        Arm("minent_gbw", "synthetic/minent_gbw.yaml", "MinEnt + GBW", "minent"),
    )
)


@dataclass(frozen=True)
class Preset:
    """Sizes of one experiment: arms, seeds, iterations and the synthetic benchmark it runs on."""

    arms: Tuple[str, ...]
    seeds: Tuple[int, ...]
    max_iter: int
    num_source: int = 400
    num_target_train: int = 100
    num_target_val: int = 50
    image_size: Tuple[int, int] = (256, 512)  # generated image (height, width)
    extra_opts: Tuple[str, ...] = ()
    description: str = ""


PRESETS: Dict[str, Preset] = {
    # `make demo`: one seed of the three main arms, within ~20 minutes on a 2-core CPU.
    "demo": Preset(
        arms=("source_only", "dacs", "dacs_gbw"),
        seeds=(0,),
        max_iter=300,
        description="one seed of source-only, DACS and DACS + GBW",
    ),
    # `make experiment`: enough seeds to tell a difference from noise.
    "experiment": Preset(
        arms=("source_only", "dacs", "dacs_gbw", "dacs_gbw_absolute"),
        seeds=(0, 1, 2),
        max_iter=300,
        description="3 seeds of source-only, DACS, DACS + GBW (relative λ) and DACS + GBW (absolute λ)",
    ),
    # CI smoke test: a few iterations per arm on a tiny benchmark; numbers are meaningless.
    "smoke": Preset(
        arms=("source_only", "dacs", "dacs_gbw"),
        seeds=(0,),
        max_iter=2,
        num_source=6,
        num_target_train=4,
        num_target_val=3,
        image_size=(128, 256),
        description="smoke test (2 iterations per arm; the numbers mean nothing)",
    ),
}


@dataclass
class RunSpec:
    """One training run of the experiment."""

    arm: Arm
    seed: int
    output_dir: Path
    command: List[str] = field(default_factory=list)

    @property
    def eval_dir(self) -> Path:
        return self.output_dir / "inference" / VAL_DATASET

    def is_done(self) -> bool:
        """Evaluated, and with the same command as now (a changed preset retrains)."""
        marker = self.output_dir / "experiment_run.json"
        if not (self.eval_dir / "sem_seg.json").is_file() or not marker.is_file():
            return False
        return json.loads(marker.read_text()).get("command") == self.command


def prepare_benchmark(preset: Preset, datasets_root: Path, workers: int) -> None:
    """Generate and prepare the synthetic benchmark under ``datasets_root/synthetic`` (idempotent)."""
    height, width = preset.image_size
    command = [
        sys.executable, str(REPO_ROOT / "datasets" / "prepare_synthetic.py"), str(datasets_root / "synthetic"),
        "--num-source", str(preset.num_source), "--num-target-train", str(preset.num_target_train),
        "--num-target-val", str(preset.num_target_val), "--height", str(height), "--width", str(width),
        "--workers", str(workers),
    ]
    logger.info("Preparing the synthetic benchmark: %s", " ".join(command))
    subprocess.run(command, check=True, env=_environment(datasets_root, threads=1))


def _environment(datasets_root: Path, threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    env["DETECTRON2_DATASETS"] = str(datasets_root)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    return env


def plan_runs(preset: Preset, out: Path) -> List[RunSpec]:
    """The runs of ``preset``, each with its ``tools/train_net.py`` command."""
    runs = []
    for arm_name in preset.arms:
        if arm_name not in ARMS:
            raise ValueError(f"unknown arm {arm_name!r}; known arms: {', '.join(ARMS)}")
        arm = ARMS[arm_name]
        config = REPO_ROOT / "configs" / arm.config
        if not config.is_file():
            raise FileNotFoundError(f"config {config} of arm {arm_name!r} does not exist")
        for seed in preset.seeds:
            # One folder per schedule: a longer run is a new run, not a continuation of a short one.
            output_dir = out / "runs" / arm.name / f"{preset.max_iter}it_seed{seed}"
            command = [
                sys.executable, str(REPO_ROOT / "tools" / "train_net.py"), "--config-file", str(config), "--resume",
                "OUTPUT_DIR", str(output_dir), "SEED", str(seed),
                "SOLVER.MAX_ITER", str(preset.max_iter), "SOLVER.CHECKPOINT_PERIOD", str(max(preset.max_iter // 3, 1)),
                "TEST.EVAL_PERIOD", "0", *preset.extra_opts,
            ]
            runs.append(RunSpec(arm, seed, output_dir, command))
    return runs


def train_and_evaluate(run: RunSpec, datasets_root: Path, threads: int) -> float:
    """Run one training (skipped when already done); returns its wall time in seconds (0 if skipped)."""
    if run.is_done():
        logger.info("%s seed %d: already trained and evaluated (%s)", run.arm.name, run.seed, run.output_dir)
        return 0.0
    run.output_dir.mkdir(parents=True, exist_ok=True)
    log_path = run.output_dir / "train_stdout.log"
    logger.info("%s seed %d: training (log: %s)", run.arm.name, run.seed, log_path)
    start = time.perf_counter()
    with open(log_path, "a") as log:
        result = subprocess.run(run.command, stdout=log, stderr=subprocess.STDOUT, env=_environment(datasets_root, threads))
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(
            f"training run {run.arm.name} seed {run.seed} failed (exit {result.returncode}); see {log_path}"
        )
    marker = run.output_dir / "experiment_run.json"
    write_json(marker, {"command": run.command, "seconds": elapsed})
    logger.info("%s seed %d: done in %.0f s", run.arm.name, run.seed, elapsed)
    return elapsed


def _read_report(path: Path) -> Optional[dict]:
    from ..evaluation.report import read_report

    return read_report(str(path)) if path.is_file() else None


def load_results(run: RunSpec) -> Dict[str, dict]:
    """The evaluation reports of one run: ``{"sem_seg": report, "panoptic_seg": report}``."""
    reports = {}
    for name in ("sem_seg", "panoptic_seg"):
        report = _read_report(run.eval_dir / f"{name}.json")
        if report is not None:
            reports[name] = report
    if "sem_seg" not in reports:
        raise FileNotFoundError(f"{run.eval_dir / 'sem_seg.json'} is missing: run {run.output_dir} was not evaluated")
    return reports


def class_pixel_fractions(datasets_root: Path) -> Tuple[List[str], np.ndarray]:
    """Class names and pixel fractions of the target train split (what defines 'rare')."""
    path = datasets_root / "synthetic" / "target" / "gtFine" / "class_frequencies_train.json"
    stats = json.loads(path.read_text())
    return list(stats["classes"]), np.asarray(stats["pixel_fraction"], dtype=np.float64)


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    array = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if array.size == 0:
        return float("nan"), float("nan")
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else float("nan")


def _format(mean: float, std: float, signed: bool = False) -> str:
    if math.isnan(mean):
        return "n/a"
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text if math.isnan(std) else f"{text} ± {std:.2f}"


def run_metrics(reports: Mapping[str, dict], rare: np.ndarray, frequent: np.ndarray) -> "OrderedDict[str, float]":
    """Headline numbers of one run (percent): mIoU, mean recall, recall of rare / frequent classes, PQ."""
    sem = reports["sem_seg"]
    recall = np.array([row["recall"] for row in sem["per_class"]], dtype=np.float64)
    metrics: "OrderedDict[str, float]" = OrderedDict()
    metrics["mIoU"] = sem["summary"]["mIoU"]
    metrics["mRecall"] = sem["summary"]["mACC"]
    metrics["recall (rare)"] = float(np.nanmean(recall[rare])) if np.isfinite(recall[rare]).any() else float("nan")
    metrics["recall (frequent)"] = (
        float(np.nanmean(recall[frequent])) if np.isfinite(recall[frequent]).any() else float("nan")
    )
    pan = reports.get("panoptic_seg")
    for key in ("mPQ", "mSQ", "mRQ"):
        metrics[key] = pan["summary"][key] if pan is not None else float("nan")
    return metrics


def _markdown(rows: List[List[str]], header: List[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_recall_deltas(
    class_names: Sequence[str], fractions: np.ndarray, deltas: Mapping[str, np.ndarray], path: Path
) -> None:
    """Bar chart of the per-class recall change (GBW − baseline, mean over seeds ± std), classes
    sorted by target pixel frequency (most frequent left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [c for c in np.argsort(-fractions) if fractions[c] > 0]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / max(len(deltas), 1)
    for index, (label, per_seed) in enumerate(deltas.items()):
        with warnings.catch_warnings():  # classes absent from the val split are all-NaN columns
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(per_seed, axis=0)[order]
            std = np.nanstd(per_seed, axis=0, ddof=1)[order] if per_seed.shape[0] > 1 else None
        xs = np.arange(len(order)) + (index - (len(deltas) - 1) / 2) * width
        ax.bar(xs, np.nan_to_num(mean), width, yerr=std, label=label, capsize=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(order)))
    ax.set_xticklabels([f"{class_names[c]}\n{100 * fractions[c]:.1f}%" for c in order], rotation=60, fontsize=8)
    ax.set_ylabel("recall change (points)")
    ax.set_title("Per-class recall: with GBW − without (classes by target pixel frequency)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp_path: fig.savefig(tmp_path, format="png", dpi=110))
    plt.close(fig)


def _tool(name: str, *args: str, datasets_root: Path) -> None:
    command = [sys.executable, str(REPO_ROOT / "tools" / name), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=_environment(datasets_root, threads=2))
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def write_report(
    preset_name: str,
    preset: Preset,
    runs: List[RunSpec],
    out: Path,
    datasets_root: Path,
    seconds: float,
) -> Path:
    """Read every run's evaluation, write ``out/report.md`` with tables and figures; returns its path."""
    class_names, fractions = class_pixel_fractions(datasets_root)
    rare = (fractions > 0) & (fractions < RARE_PIXEL_FRACTION)
    frequent = fractions >= RARE_PIXEL_FRACTION
    run_of = {(run.arm.name, run.seed): run for run in runs}
    results: Dict[Tuple[str, int], Dict[str, dict]] = {key: load_results(run) for key, run in run_of.items()}
    metrics = {key: run_metrics(reports, rare, frequent) for key, reports in results.items()}
    train_minutes = sum(json.loads((run.output_dir / "experiment_run.json").read_text())["seconds"] for run in runs) / 60
    metric_names = list(next(iter(metrics.values())).keys())
    arms = [ARMS[name] for name in preset.arms]

    height, width = preset.image_size
    lines = [
        f"# Synthetic benchmark: {preset.description}",
        "",
        f"Generated by `python tools/run_experiment.py --preset {preset_name}` (this machine: {os.cpu_count()} "
        f"CPU threads): {len(runs)} training runs of {train_minutes:.1f} min in total (sum of the runs' wall times; "
        f"`--jobs` of them run in parallel), this call {seconds / 60:.1f} min. Every number below was computed by these runs.",
        "",
        "Setting: synthetic two-domain benchmark (`datasets/prepare_synthetic.py`), "
        f"{preset.num_source} source images, {preset.num_target_train} target train and "
        f"{preset.num_target_val} target val images of {height}×{width} px; configs under `configs/synthetic/` "
        f"(MiT-B0 encoder from random weights, 64-channel DAFormer decoders, 128×128 crops of half-resolution "
        f"images), {preset.max_iter} iterations per run, seeds {', '.join(map(str, preset.seeds))}. "
        "Evaluation on the target val split at half resolution.",
        "",
        f"Rare classes (< {100 * RARE_PIXEL_FRACTION:.0f}% of the target train pixels): "
        + ", ".join(f"{class_names[c]} ({100 * fractions[c]:.2f}%)" for c in np.flatnonzero(rare))
        + ". Classes absent from the target are left out of every mean.",
        "",
        "## Results per arm (mean ± std over seeds, percent)",
        "",
    ]
    rows = []
    for arm in arms:
        row = [arm.label]
        for name in metric_names:
            row.append(_format(*_mean_std([metrics[(arm.name, s)][name] for s in preset.seeds])))
        rows.append(row)
    lines.append(_markdown(rows, ["arm", *metric_names]))

    pairs = [(ARMS[arm.baseline], arm) for arm in arms if arm.baseline in preset.arms]
    recall_deltas: Dict[str, np.ndarray] = {}
    if pairs:
        lines += [
            "## Effect of GBW (with − without, paired by seed)",
            "",
            "A difference is called *clear* when its mean is more than twice its standard error "
            "(std/√seeds); with one seed there is no noise estimate.",
            "",
        ]
        rows = []
        for baseline, arm in pairs:
            for name in metric_names:
                diffs = [metrics[(arm.name, s)][name] - metrics[(baseline.name, s)][name] for s in preset.seeds]
                mean, std = _mean_std(diffs)
                if len(preset.seeds) < 2 or math.isnan(std):
                    verdict = "single seed"
                elif abs(mean) > 2 * std / math.sqrt(len(preset.seeds)):
                    verdict = "clear " + ("gain" if mean > 0 else "loss")
                else:
                    verdict = "within noise"
                rows.append([f"{arm.label} vs {baseline.label}", name, _format(mean, std, signed=True), verdict])
            recall_deltas[f"{arm.label} − {baseline.label}"] = np.array(
                [
                    [row_b["recall"] - row_a["recall"] for row_a, row_b in zip(
                        results[(baseline.name, s)]["sem_seg"]["per_class"], results[(arm.name, s)]["sem_seg"]["per_class"])]
                    for s in preset.seeds
                ],
                dtype=np.float64,
            )
        lines.append(_markdown(rows, ["comparison", "metric", "difference", "verdict"]))
        plot_recall_deltas(class_names, fractions, recall_deltas, out / "figures" / "recall_delta.png")
        lines += ["![per-class recall change](figures/recall_delta.png)", ""]

    lines += ["## Per-class recall (mean over seeds, percent; classes by target frequency)", ""]
    order = [c for c in np.argsort(-fractions) if fractions[c] > 0]
    rows = []
    for c in order:
        row = [class_names[c], f"{100 * fractions[c]:.2f}%"]
        for arm in arms:
            values = [results[(arm.name, s)]["sem_seg"]["per_class"][c]["recall"] for s in preset.seeds]
            row.append(_format(*_mean_std(values)))
        rows.append(row)
    lines.append(_markdown(rows, ["class", "target pixels", *[arm.label for arm in arms]]))

    figures = out / "figures"
    gbw_arms = [arm for arm in arms if arm.baseline is not None]
    for arm in gbw_arms:
        run_dir = run_of[(arm.name, preset.seeds[0])].output_dir
        _tool("plot_training.py", str(run_dir), "--output-dir", str(figures / arm.name), datasets_root=datasets_root)
        lines += [
            f"## GBW class weights during training: {arm.label} (seed {preset.seeds[0]})",
            "",
            f"![GBW weights](figures/{arm.name}/gbw_weights.png)",
            "",
        ]
    shown = [arm for arm in arms if arm.name in ("dacs", "dacs_gbw")] or arms[-1:]
    lines += ["## Example predictions (target val; input | ground truth | prediction)", ""]
    for arm in shown:
        eval_dir = run_of[(arm.name, preset.seeds[0])].eval_dir
        target = figures / f"predictions_{arm.name}"
        _tool("visualize.py", "--dataset", VAL_DATASET, "--predictions", str(eval_dir), "--output-dir", str(target),
              "--max-images", "2", datasets_root=datasets_root)
        for png in sorted(target.glob("*.png"))[:2]:
            lines += [f"{arm.label}: ![{png.stem}]({png.relative_to(out)})", ""]

    report = out / "report.md"
    atomic_write(report, lambda tmp_path: Path(tmp_path).write_text("\n".join(lines)))
    summary = {
        "preset": preset_name,
        "seconds": seconds,
        "runs": {f"{arm}/seed{seed}": values for (arm, seed), values in metrics.items()},
    }
    write_json(out / "results.json", summary)
    return report


def run_experiment(
    preset_name: str,
    out: Path,
    datasets_root: Path,
    jobs: int = 2,
    arms: Optional[Sequence[str]] = None,
    seeds: Optional[Sequence[int]] = None,
    max_iter: Optional[int] = None,
) -> Path:
    """Prepare the benchmark, train and evaluate every run (``jobs`` at a time), write the report.

    Returns the path of ``report.md``.
    """
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    overrides = {}
    if arms:
        overrides["arms"] = tuple(arms)
    if seeds:
        overrides["seeds"] = tuple(seeds)
    if max_iter:
        overrides["max_iter"] = max_iter
    if overrides:
        preset = replace(preset, **overrides)
        unknown = [name for name in preset.arms if name not in ARMS]
        if unknown:
            raise ValueError(f"unknown arm(s) {', '.join(unknown)}; known arms: {', '.join(ARMS)}")
        labels = ", ".join(ARMS[name].label for name in preset.arms)
        preset = replace(
            preset,
            description=f"{len(preset.seeds)} seed(s) of {labels}, {preset.max_iter} iterations (preset {preset_name!r} modified)",
        )
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    prepare_benchmark(preset, datasets_root, workers=max(jobs, 1))
    runs = plan_runs(preset, out)
    threads = max((os.cpu_count() or 1) // max(jobs, 1), 1)
    logger.info("%d runs (%s), %d at a time with %d thread(s) each", len(runs), preset.description, jobs, threads)
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        list(pool.map(lambda run: train_and_evaluate(run, datasets_root, threads), runs))
    report = write_report(preset_name, preset, runs, out, datasets_root, time.perf_counter() - start)
    logger.info("Report: %s", report)
    return report
