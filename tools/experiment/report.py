"""The report of an experiment: ``<out>/report.md`` and ``<out>/results.json``.

:func:`write_report` reads every run's evaluation reports and writes one section after another:
setting, results per arm, effect of GBW against its baseline (paired by seed), per-class recall, GBW
weight curves and example predictions.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from gbw_panoptic.evaluation.panoptic_io import atomic_write, write_json
from gbw_panoptic.evaluation.report import read_report

from .runs import ARMS, REPO_ROOT, VAL_DATASET, Arm, Preset, RunSpec, environment

__all__ = ["ExperimentResults", "collect_results", "write_report"]

# A class is "rare" when it covers less than this fraction of the target train pixels
# (Cityscapes' pole, rider, motorcycle ... are all below 1%).
RARE_PIXEL_FRACTION = 0.01


def _read_report(path: Path) -> Optional[dict]:
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
    result = subprocess.run(command, capture_output=True, text=True, env=environment(datasets_root, threads=2))
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


@dataclass
class ExperimentResults:
    """Everything the report sections read: the runs, their evaluation reports and headline metrics.

    ``results`` and ``metrics`` are keyed by ``(arm name, seed)``; ``fractions`` are the pixel
    fractions of the target train split per class (train id order), ``rare`` / ``frequent`` boolean
    masks over the same classes.
    """

    preset_name: str
    preset: Preset
    arms: List[Arm]
    run_of: Dict[Tuple[str, int], RunSpec]
    results: Dict[Tuple[str, int], Dict[str, dict]]
    metrics: Dict[Tuple[str, int], "OrderedDict[str, float]"]
    class_names: List[str]
    fractions: np.ndarray
    rare: np.ndarray
    frequent: np.ndarray

    @property
    def seeds(self) -> Tuple[int, ...]:
        return self.preset.seeds

    @property
    def metric_names(self) -> List[str]:
        return list(next(iter(self.metrics.values())).keys())


def collect_results(preset_name: str, preset: Preset, runs: List[RunSpec], datasets_root: Path) -> ExperimentResults:
    """Read the evaluation reports of every run and compute their headline metrics."""
    class_names, fractions = class_pixel_fractions(datasets_root)
    rare = (fractions > 0) & (fractions < RARE_PIXEL_FRACTION)
    frequent = fractions >= RARE_PIXEL_FRACTION
    run_of = {(run.arm.name, run.seed): run for run in runs}
    results = {key: load_results(run) for key, run in run_of.items()}
    metrics = {key: run_metrics(reports, rare, frequent) for key, reports in results.items()}
    arms = [ARMS[name] for name in preset.arms]
    return ExperimentResults(
        preset_name, preset, arms, run_of, results, metrics, class_names, fractions, rare, frequent
    )


def setting_section(experiment: ExperimentResults, seconds: float) -> List[str]:
    """Title, how the report was made, the benchmark and the rare classes."""
    preset, runs = experiment.preset, list(experiment.run_of.values())
    train_minutes = sum(json.loads((run.output_dir / "experiment_run.json").read_text())["seconds"] for run in runs) / 60
    height, width = preset.image_size
    rare_classes = ", ".join(
        f"{experiment.class_names[c]} ({100 * experiment.fractions[c]:.2f}%)" for c in np.flatnonzero(experiment.rare)
    )
    return [
        f"# Synthetic benchmark: {preset.description}",
        "",
        f"Generated by `python tools/run_experiment.py --preset {experiment.preset_name}` (this machine: "
        f"{os.cpu_count()} CPU threads): {len(runs)} training runs of {train_minutes:.1f} min in total (sum of the "
        f"runs' wall times; `--jobs` of them run in parallel), this call {seconds / 60:.1f} min. Every number below "
        "was computed by these runs.",
        "",
        "Setting: synthetic two-domain benchmark (`datasets/prepare_synthetic.py`), "
        f"{preset.num_source} source images, {preset.num_target_train} target train and "
        f"{preset.num_target_val} target val images of {height}×{width} px; configs under `configs/synthetic/` "
        f"(MiT-B0 encoder from random weights, 64-channel DAFormer decoders), {preset.max_iter} iterations per "
        f"run, seeds {', '.join(map(str, preset.seeds))}. Evaluation on the target val split.",
        "",
        f"Rare classes (< {100 * RARE_PIXEL_FRACTION:.0f}% of the target train pixels): {rare_classes}. "
        "Classes absent from the target are left out of every mean.",
        "",
    ]


def arms_section(experiment: ExperimentResults) -> List[str]:
    """Headline metrics per arm, mean ± std over seeds."""
    rows = []
    for arm in experiment.arms:
        row = [arm.label]
        for name in experiment.metric_names:
            row.append(_format(*_mean_std([experiment.metrics[(arm.name, s)][name] for s in experiment.seeds])))
        rows.append(row)
    return ["## Results per arm (mean ± std over seeds, percent)", "", _markdown(rows, ["arm", *experiment.metric_names])]


def gbw_effect_section(experiment: ExperimentResults, figures: Path) -> List[str]:
    """GBW arm − its baseline, paired by seed, per headline metric; the per-class recall change figure."""
    names = [arm.name for arm in experiment.arms]
    pairs = [(ARMS[arm.baseline], arm) for arm in experiment.arms if arm.baseline in names]
    if not pairs:
        return []
    seeds = experiment.seeds
    lines = [
        "## Effect of GBW (with − without, paired by seed)",
        "",
        "A difference is called *clear* when its mean is more than twice its standard error "
        "(std/√seeds); with one seed there is no noise estimate.",
        "",
    ]
    rows = []
    recall_deltas: Dict[str, np.ndarray] = {}
    for baseline, arm in pairs:
        for name in experiment.metric_names:
            diffs = [experiment.metrics[(arm.name, s)][name] - experiment.metrics[(baseline.name, s)][name] for s in seeds]
            mean, std = _mean_std(diffs)
            if len(seeds) < 2 or math.isnan(std):
                verdict = "single seed"
            elif abs(mean) > 2 * std / math.sqrt(len(seeds)):
                verdict = "clear " + ("gain" if mean > 0 else "loss")
            else:
                verdict = "within noise"
            rows.append([f"{arm.label} vs {baseline.label}", name, _format(mean, std, signed=True), verdict])
        recall_deltas[f"{arm.label} − {baseline.label}"] = np.array(
            [
                [
                    row_b["recall"] - row_a["recall"]
                    for row_a, row_b in zip(
                        experiment.results[(baseline.name, s)]["sem_seg"]["per_class"],
                        experiment.results[(arm.name, s)]["sem_seg"]["per_class"],
                    )
                ]
                for s in seeds
            ],
            dtype=np.float64,
        )
    lines.append(_markdown(rows, ["comparison", "metric", "difference", "verdict"]))
    plot_recall_deltas(experiment.class_names, experiment.fractions, recall_deltas, figures / "recall_delta.png")
    return lines + ["![per-class recall change](figures/recall_delta.png)", ""]


def per_class_section(experiment: ExperimentResults) -> List[str]:
    """Per-class recall of every arm, classes by target pixel frequency."""
    order = [c for c in np.argsort(-experiment.fractions) if experiment.fractions[c] > 0]
    rows = []
    for c in order:
        row = [experiment.class_names[c], f"{100 * experiment.fractions[c]:.2f}%"]
        for arm in experiment.arms:
            values = [experiment.results[(arm.name, s)]["sem_seg"]["per_class"][c]["recall"] for s in experiment.seeds]
            row.append(_format(*_mean_std(values)))
        rows.append(row)
    header = ["class", "target pixels", *[arm.label for arm in experiment.arms]]
    return ["## Per-class recall (mean over seeds, percent; classes by target frequency)", "", _markdown(rows, header)]


def gbw_weights_section(experiment: ExperimentResults, figures: Path, datasets_root: Path) -> List[str]:
    """The GBW class weights during training of each GBW arm (first seed), plotted by plot_training.py."""
    seed = experiment.seeds[0]
    lines: List[str] = []
    for arm in [arm for arm in experiment.arms if arm.baseline is not None]:
        run_dir = experiment.run_of[(arm.name, seed)].output_dir
        _tool("plot_training.py", str(run_dir), "--output-dir", str(figures / arm.name), datasets_root=datasets_root)
        lines += [
            f"## GBW class weights during training: {arm.label} (seed {seed})",
            "",
            f"![GBW weights](figures/{arm.name}/gbw_weights.png)",
            "",
        ]
    return lines


def examples_section(experiment: ExperimentResults, out: Path, datasets_root: Path) -> List[str]:
    """Two target val images with ground truth and prediction of DACS and DACS + GBW (or the last arm)."""
    figures = out / "figures"
    shown = [arm for arm in experiment.arms if arm.name in ("dacs", "dacs_gbw")] or experiment.arms[-1:]
    lines = ["## Example predictions (target val; input | ground truth | prediction)", ""]
    for arm in shown:
        eval_dir = experiment.run_of[(arm.name, experiment.seeds[0])].eval_dir
        target = figures / f"predictions_{arm.name}"
        _tool("visualize.py", "--dataset", VAL_DATASET, "--predictions", str(eval_dir), "--output-dir", str(target),
              "--max-images", "2", datasets_root=datasets_root)
        for png in sorted(target.glob("*.png"))[:2]:
            lines += [f"{arm.label}: ![{png.stem}]({png.relative_to(out)})", ""]
    return lines


def write_report(
    preset_name: str,
    preset: Preset,
    runs: List[RunSpec],
    out: Path,
    datasets_root: Path,
    seconds: float,
) -> Path:
    """Read every run's evaluation, write ``out/report.md`` with tables and figures and
    ``out/results.json``; returns the path of the report."""
    experiment = collect_results(preset_name, preset, runs, datasets_root)
    figures = out / "figures"
    lines = setting_section(experiment, seconds)
    lines += arms_section(experiment)
    lines += gbw_effect_section(experiment, figures)
    lines += per_class_section(experiment)
    lines += gbw_weights_section(experiment, figures, datasets_root)
    lines += examples_section(experiment, out, datasets_root)
    report = out / "report.md"
    atomic_write(report, lambda tmp_path: Path(tmp_path).write_text("\n".join(lines)))
    summary = {
        "preset": preset_name,
        "seconds": seconds,
        "runs": {f"{arm}/seed{seed}": values for (arm, seed), values in experiment.metrics.items()},
    }
    write_json(out / "results.json", summary)
    return report
