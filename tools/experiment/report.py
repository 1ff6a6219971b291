"""The report of an experiment: ``<out>/report.md`` and ``<out>/results.json``.

:func:`write_report` reads every run's evaluation reports (target val and source val) and its
``metrics.json``, then writes one section after another: setting; domain gap (source-val and
target-val mIoU, fraction of the source-only → oracle gap closed); semantic and panoptic results per
arm; paired differences against DACS with 95 % Student-t intervals over seeds; each swept setting
(λ, batch size) against its value; per-class IoU, recall and precision; the GBW weight and teacher
confidence curves; the benchmark's design checks; a conclusion worded from the intervals; example
predictions. :func:`write_levels_report` compares the benchmarks of a preset with imbalance levels.
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

from gbw_panoptic.utils.io import atomic_write, write_json
from gbw_panoptic.evaluation.report import read_report

from _common import read_metrics

from .figures import plot_curves, plot_intervals, plot_recall_deltas, plot_sweep
from .gradient import HORIZON, WINDOW, correlations, runs_logged_every_step, summarize
from .runs import (
    ARMS, ORACLE, REFERENCE, REPO_ROOT, SOURCE_ONLY, SOURCE_VAL_DATASET, SWEEP_REFERENCES, VAL_DATASET, Arm, Preset,
    RunSpec, environment, level_folder,
)
from .stats import Interval, gap_closed, paired_differences, t_interval

__all__ = [
    "RARE_PIXEL_FRACTION",
    "ExperimentResults",
    "run_metrics",
    "collect_results",
    "conclusion_section",
    "write_report",
    "write_levels_report",
]

# A class is "rare" when it covers less than this fraction of the target train pixels
# (Cityscapes' pole, rider, motorcycle ... are all below 1%).
RARE_PIXEL_FRACTION = 0.01
# The teacher's confident fraction at the end of training: mean over this last fraction of the run.
FINAL_FRACTION = 0.1
CONFIDENCE_KEY = "dacs/pseudo_confidence"

SEMANTIC_METRICS = (
    "mIoU", "mIoU16", "mRecall", "mPrecision",
    "IoU (rare)", "recall (rare)", "precision (rare)",
    "IoU (frequent)", "recall (frequent)", "precision (frequent)",
)
PANOPTIC_METRICS = ("mPQ", "mSQ", "mRQ", "mPQ16", "mSQ16", "mRQ16")
# The metrics of the paired comparison and of the conclusion.
COMPARED_METRICS = ("mIoU", "mPQ", "recall (rare)", "precision (rare)", "recall (frequent)", "precision (frequent)")


def _read_reports(eval_dir: Path) -> Dict[str, dict]:
    """``{"sem_seg": report, "panoptic_seg": report}`` of one evaluation folder (panoptic optional)."""
    reports = {}
    for name in ("sem_seg", "panoptic_seg"):
        path = eval_dir / f"{name}.json"
        if path.is_file():
            reports[name] = read_report(str(path))
    if "sem_seg" not in reports:
        raise FileNotFoundError(f"{eval_dir / 'sem_seg.json'} is missing: the run was not evaluated")
    return reports


def confidence_curve(run_dir: Path) -> Tuple[np.ndarray, np.ndarray]:
    """Iterations and the teacher's confident fraction logged in ``run_dir/metrics.json`` (empty
    arrays for a method without a teacher)."""
    records = [r for r in read_metrics(run_dir) if CONFIDENCE_KEY in r]
    return (
        np.asarray([r["iteration"] for r in records], dtype=np.int64),
        np.asarray([r[CONFIDENCE_KEY] for r in records], dtype=np.float64),
    )


def _group_mean(values: np.ndarray, mask: np.ndarray) -> float:
    chosen = values[mask]
    return float(np.nanmean(chosen)) if np.isfinite(chosen).any() else math.nan


def run_metrics(
    target: Mapping[str, dict],
    source: Mapping[str, dict],
    curve: Tuple[np.ndarray, np.ndarray],
    rare: np.ndarray,
    frequent: np.ndarray,
) -> "OrderedDict[str, float]":
    """Headline numbers of one run (percent, NaN where undefined).

    Args:
        target, source: evaluation reports on target val and source val (:func:`_read_reports`).
        curve: the teacher's confident fraction over iterations (:func:`confidence_curve`).
        rare, frequent: boolean masks over the train ids.
    Returns:
        :data:`SEMANTIC_METRICS` and :data:`PANOPTIC_METRICS` on target val, ``source-val mIoU`` and
        ``confident fraction`` (percent of pixels over the pseudo-label threshold, mean over the last
        :data:`FINAL_FRACTION` of the run).
    """
    sem = target["sem_seg"]
    per_class = {key: np.array([row[key] for row in sem["per_class"]], dtype=np.float64) for key in ("IoU", "recall", "precision")}
    metrics: "OrderedDict[str, float]" = OrderedDict()
    metrics["mIoU"] = sem["summary"]["mIoU"]
    metrics["mIoU16"] = sem["summary"].get("mIoU16", math.nan)
    metrics["mRecall"] = sem["summary"]["mACC"]
    metrics["mPrecision"] = _group_mean(per_class["precision"], rare | frequent)
    for group, mask in (("rare", rare), ("frequent", frequent)):
        for key in ("IoU", "recall", "precision"):
            metrics[f"{key} ({group})"] = _group_mean(per_class[key], mask)
    pan = target.get("panoptic_seg")
    for key in PANOPTIC_METRICS:
        metrics[key] = pan["summary"].get(key, math.nan) if pan is not None else math.nan
    metrics["source-val mIoU"] = source["sem_seg"]["summary"]["mIoU"]
    iterations, confidence = curve
    if iterations.size:
        final = iterations >= iterations.max() * (1 - FINAL_FRACTION)
        metrics["confident fraction"] = 100 * float(confidence[final].mean())
    else:
        metrics["confident fraction"] = math.nan
    return metrics


@dataclass
class ExperimentResults:
    """What the report sections read. ``metrics``, ``per_class`` and ``curves`` are keyed by
    ``(arm name, seed)``; ``per_class[key]`` holds the target-val ``{"IoU", "recall", "precision"}``
    arrays (train id order); ``fractions`` are the target train pixel fractions per class, ``rare`` /
    ``frequent`` boolean masks over the same classes."""

    preset_name: str
    preset: Preset
    arms: List[Arm]
    run_of: Dict[Tuple[str, int], RunSpec]
    metrics: Dict[Tuple[str, int], "OrderedDict[str, float]"]
    per_class: Dict[Tuple[str, int], Dict[str, np.ndarray]]
    curves: Dict[Tuple[str, int], Tuple[np.ndarray, np.ndarray]]
    class_names: List[str]
    fractions: np.ndarray
    rare: np.ndarray
    frequent: np.ndarray

    @property
    def seeds(self) -> Tuple[int, ...]:
        return self.preset.seeds

    def has(self, arm_name: str) -> bool:
        return any(arm.name == arm_name for arm in self.arms)

    def by_seed(self, arm_name: str, metric: str) -> Dict[int, float]:
        """``{seed: value}`` of one metric of one arm."""
        return {seed: self.metrics[(arm_name, seed)][metric] for seed in self.seeds}

    def interval(self, arm_name: str, metric: str) -> Interval:
        return t_interval(list(self.by_seed(arm_name, metric).values()))

    def difference(self, arm_name: str, reference: str, metric: str) -> Interval:
        """``arm - reference`` paired by seed, with its 95 % t-interval."""
        return t_interval(paired_differences(self.by_seed(arm_name, metric), self.by_seed(reference, metric)))

    def gap_closed(self, arm_name: str, metric: str = "mIoU") -> Interval:
        """Percent of the source-only → oracle gap the arm closes, paired by seed (NaN without both bounds)."""
        if not (self.has(SOURCE_ONLY) and self.has(ORACLE)):
            return t_interval([])
        return t_interval(
            gap_closed(self.by_seed(arm_name, metric), self.by_seed(SOURCE_ONLY, metric), self.by_seed(ORACLE, metric))
        )


def class_pixel_fractions(datasets_root: Path) -> Tuple[List[str], np.ndarray]:
    """Class names and pixel fractions of the target train split (what defines 'rare')."""
    path = datasets_root / "synthetic" / "target" / "gtFine" / "class_frequencies_train.json"
    stats = json.loads(path.read_text())
    return list(stats["classes"]), np.asarray(stats["pixel_fraction"], dtype=np.float64)


def collect_results(preset_name: str, preset: Preset, runs: List[RunSpec], datasets_root: Path) -> ExperimentResults:
    """Read the evaluation reports and training logs of every run; compute their metrics."""
    class_names, fractions = class_pixel_fractions(datasets_root)
    rare = (fractions > 0) & (fractions < RARE_PIXEL_FRACTION)
    frequent = fractions >= RARE_PIXEL_FRACTION
    run_of = {(run.arm.name, run.seed): run for run in runs}
    metrics, per_class, curves = {}, {}, {}
    for key, run in run_of.items():
        target = _read_reports(run.eval_dir(VAL_DATASET))
        source = _read_reports(run.eval_dir(SOURCE_VAL_DATASET))
        curves[key] = confidence_curve(run.output_dir)
        metrics[key] = run_metrics(target, source, curves[key], rare, frequent)
        per_class[key] = {
            name: np.array([row[name] for row in target["sem_seg"]["per_class"]], dtype=np.float64)
            for name in ("IoU", "recall", "precision")
        }
    arms = [ARMS[name] for name in preset.arms]
    return ExperimentResults(
        preset_name, preset, arms, run_of, metrics, per_class, curves, class_names, fractions, rare, frequent
    )


def _markdown(rows: List[List[str]], header: List[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _tool(name: str, *args: str, datasets_root: Path) -> None:
    command = [sys.executable, str(REPO_ROOT / "tools" / name), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=environment(datasets_root, threads=2))
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def starting_points(runs: Sequence[RunSpec]) -> str:
    """Which arms start from another arm's final model, as a clause of the setting sentence ("" if none)."""
    starts = OrderedDict((run.arm.label, run.starts_from.arm.label) for run in runs if run.starts_from is not None)
    if not starts:
        return ""
    labels = ", ".join(starts)
    sources = sorted(set(starts.values()))
    return f"; {labels} start from the final model of {' / '.join(sources)} of the same seed (`MODEL.WEIGHTS`)"


def setting_section(experiment: ExperimentResults, seconds: float) -> List[str]:
    """Title, how the report was made, the benchmark and its rare classes."""
    preset, runs = experiment.preset, list(experiment.run_of.values())
    train_minutes = sum(run.made_with()["seconds"] for run in runs) / 60
    reused = sum("reused_from" in run.made_with() for run in runs)
    reused_note = (
        f" ({reused} of them made by an earlier experiment and reused: `--reuse-from`, their `experiment_run.json` "
        "names the folder)" if reused else ""
    )
    height, width = preset.image_size
    rare_classes = ", ".join(
        f"{experiment.class_names[c]} ({100 * experiment.fractions[c]:.2f}%)" for c in np.flatnonzero(experiment.rare)
    )
    return [
        f"# Synthetic benchmark: {preset.description}",
        "",
        f"Generated by `python tools/run_experiment.py --preset {experiment.preset_name}` (this machine: "
        f"{os.cpu_count()} CPU threads): {len(runs)} training runs{reused_note} of {train_minutes:.1f} min in total (sum of the "
        f"runs' wall times; `--jobs` of them run in parallel), this call {seconds / 60:.1f} min. Every number below "
        "was computed by these runs.",
        "",
        f"Setting: the synthetic two-domain benchmark (`datasets/prepare_synthetic.py`, design in "
        f"`datasets/README.md`): {preset.num_source} source, {preset.num_source_val} held-out source, "
        f"{preset.num_target_train} target train and {preset.num_target_val} target val images of {height}×{width} px; "
        f"configs under `configs/synthetic/` (MiT-B0 encoder from random weights, 64-channel DAFormer decoders), "
        f"{preset.max_iter} iterations per run, seeds {', '.join(map(str, preset.seeds))}{starting_points(runs)}. "
        "Unless said otherwise, "
        "numbers are on the target val split, in percent; `mean [low, high]` is the mean over seeds with its 95 % "
        "Student-t interval (none with one seed).",
        "",
        f"Rare classes (< {100 * RARE_PIXEL_FRACTION:.0f}% of the target train pixels): {rare_classes}. Classes absent "
        "from the target are left out of every mean; precision is undefined (left out) for a class never predicted.",
        "",
    ]


def domain_section(experiment: ExperimentResults) -> List[str]:
    """Per arm: source-val and target-val mIoU, the gap closed and the teacher's final confident fraction."""
    rows = []
    for arm in experiment.arms:
        rows.append([
            arm.label,
            experiment.interval(arm.name, "source-val mIoU").format(),
            experiment.interval(arm.name, "mIoU").format(),
            experiment.gap_closed(arm.name).format(signed=True),
            experiment.interval(arm.name, "confident fraction").format(),
        ])
    header = ["arm", "source val mIoU (16 classes)", "target val mIoU", "gap closed (%)", "teacher confident (%)"]
    return [
        "## Domain gap",
        "",
        "*gap closed*: `100 · (arm − source only) / (oracle − source only)` of the target mIoU, per seed; "
        "*teacher confident*: pixels whose teacher probability reaches the pseudo-label threshold, mean over the last "
        f"{100 * FINAL_FRACTION:.0f}% of the iterations.",
        "",
        _markdown(rows, header),
    ]


def metrics_section(experiment: ExperimentResults, title: str, names: Sequence[str]) -> List[str]:
    """One table: the metrics ``names`` per arm."""
    rows = [[arm.label] + [experiment.interval(arm.name, name).format() for name in names] for arm in experiment.arms]
    return [f"## {title}", "", _markdown(rows, ["arm", *names])]


def differences_section(experiment: ExperimentResults, figures: Path) -> List[str]:
    """Every arm − DACS (and each GBW arm − its own baseline when that is not DACS), paired by seed."""
    comparisons = [(arm, ARMS[REFERENCE]) for arm in experiment.arms if arm.name != REFERENCE and experiment.has(REFERENCE)]
    comparisons += [
        (arm, ARMS[arm.baseline])
        for arm in experiment.arms
        if arm.baseline not in (None, REFERENCE) and experiment.has(arm.baseline)
    ]
    if not comparisons:
        return []
    rows = []
    for arm, reference in comparisons:
        rows.append(
            [f"{arm.label} − {reference.label}"]
            + [experiment.difference(arm.name, reference.name, name).format(signed=True) for name in COMPARED_METRICS]
        )
    deltas = {
        arm.label: np.stack([
            experiment.per_class[(arm.name, s)]["recall"] - experiment.per_class[(REFERENCE, s)]["recall"]
            for s in experiment.seeds
        ])
        for arm, reference in comparisons
        if reference.name == REFERENCE and arm.baseline == REFERENCE
    }
    lines = [
        "## Paired differences (95 % t-interval over seeds)",
        "",
        f"Differences of the target-val metrics, paired by seed ({len(experiment.seeds)} seed(s)); an interval that "
        "contains 0 does not show a difference.",
        "",
        _markdown(rows, ["comparison", *COMPARED_METRICS]),
    ]
    if deltas:
        plot_recall_deltas(experiment.class_names, experiment.fractions, deltas, figures / "recall_delta.png")
        lines += ["![per-class recall change against DACS](figures/recall_delta.png)", ""]
    return lines


SWEEP_METRICS = ("recall (rare)", "precision (rare)", "mIoU")


@dataclass(frozen=True)
class SweepRow:
    """One arm at one value of a swept setting (``value`` NaN: a baseline shown beside the sweep, not part
    of it): its :data:`SWEEP_METRICS` over seeds and, when its baseline ran, arm − baseline per seed
    (``paired``: ``{metric: {seed: difference}}``) and their interval (``differences``); both empty without
    a baseline."""

    series: str
    value: float
    baseline: str  # the baseline's label; "" without one
    metrics: Dict[str, Interval]
    paired: Dict[str, Dict[int, float]]

    @property
    def differences(self) -> Dict[str, Interval]:
        return {metric: t_interval(list(by_seed.values())) for metric, by_seed in self.paired.items()}


def sweep_rows(experiment: ExperimentResults, points: Mapping[str, Tuple[str, float]]) -> List[SweepRow]:
    """The :class:`SweepRow` of every arm of ``points`` (``{arm name: (series, value)}``) in ``experiment``."""
    rows = []
    for name, (series, value) in points.items():
        baseline = ARMS[name].baseline
        compared = baseline is not None and experiment.has(baseline)
        paired = {}
        for metric in SWEEP_METRICS if compared else ():
            values, reference = experiment.by_seed(name, metric), experiment.by_seed(baseline, metric)
            paired[metric] = {seed: values[seed] - reference[seed] for seed in sorted(set(values) & set(reference))}
        rows.append(SweepRow(
            series, value, ARMS[baseline].label if compared else "",
            {metric: experiment.interval(name, metric) for metric in SWEEP_METRICS}, paired,
        ))
    return rows


def sweep_lines(
    title: str, axis: str, rows: Sequence[SweepRow], out: Path, reference: Optional[float] = None
) -> List[str]:
    """A report section of ``rows``: a table (per row its series, value of ``axis``, baseline, and each of
    :data:`SWEEP_METRICS` with its difference against the baseline) and the figure of the differences
    against ``axis``, one line per series (rows without a baseline are in the table only), written to
    ``out/figures/sweep_<axis>.png`` (``out``: the report's folder); with a ``reference`` value, also
    :func:`change_from_reference_lines`."""
    figure = out / "figures" / f"sweep_{axis.replace(' ', '_')}.png"
    table, points = [], {}
    for row in sorted(rows, key=lambda row: (math.isnan(row.value), row.series, row.value)):
        cells = [row.series, "–" if math.isnan(row.value) else f"{row.value:g}", row.baseline or "–"]
        for metric in SWEEP_METRICS:
            difference = row.differences.get(metric)
            cells += [row.metrics[metric].format(), difference.format(signed=True) if difference else "–"]
            if difference is not None:
                points.setdefault((row.series, metric), []).append(
                    (row.value, difference.mean, difference.low, difference.high)
                )
        table.append(cells)
    header = ["series", axis, "baseline", *(name for metric in SWEEP_METRICS for name in (metric, "− baseline"))]
    lines = [
        f"## {title}",
        "",
        "Each arm's mean over seeds and, next to it, its difference against its baseline (the arm it adds its "
        "treatment to, at the same value) paired by seed, with 95 % t-intervals.",
        "",
        _markdown(table, header),
    ]
    if points:
        plot_sweep(points, SWEEP_METRICS, axis, "arm − baseline (points)",
                   f"{title}: arm − baseline (mean and 95 % interval over seeds)", figure)
        lines += [f"![arm − baseline against {axis}]({figure.relative_to(out)})", ""]
    if reference is not None:
        lines += change_from_reference_lines(axis, rows, reference)
    return lines


def change_from_reference_lines(axis: str, rows: Sequence[SweepRow], reference: float) -> List[str]:
    """Whether an arm's difference against its baseline changes along the sweep: for each row with a
    baseline, (arm − baseline) − (arm − baseline at ``axis`` = ``reference``, same series), paired by seed,
    with its 95 % t-interval (empty when no series has a row at ``reference``)."""
    at_reference = {row.series: row for row in rows if row.paired and row.value == reference}
    table = []
    for row in sorted(rows, key=lambda row: (row.series, row.value)):
        if not row.paired or row.series not in at_reference or row.value == reference:
            continue
        cells = [row.series, f"{row.value:g}"]
        for metric in SWEEP_METRICS:
            cells.append(t_interval(paired_differences(
                row.paired[metric], at_reference[row.series].paired[metric]
            )).format(signed=True))
        table.append(cells)
    if not table:
        return []
    return [
        f"### Change from {axis} = {reference:g}",
        "",
        f"(arm − baseline at the value) − (arm − baseline at {reference:g}), paired by seed (every run of a seed "
        "starts from the same model), with 95 % t-intervals: an interval that excludes 0 shows that the treatment's "
        f"effect differs from its effect at {reference:g}.",
        "",
        _markdown(table, ["series", axis, *(f"Δ {metric} − baseline" for metric in SWEEP_METRICS)]),
        "",
    ]


def sweep_section(experiment: ExperimentResults, figures: Path) -> List[str]:
    """One section per swept setting (``Arm.sweep.axis``) with at least two arms: :func:`sweep_lines` of
    those arms and of the baselines they are compared with that are not swept themselves (e.g. DACS beside
    the λ arms); ``figures``: the report's ``figures`` folder."""
    lines: List[str] = []
    for axis in dict.fromkeys(arm.sweep.axis for arm in experiment.arms if arm.sweep is not None):
        swept = [arm for arm in experiment.arms if arm.sweep is not None and arm.sweep.axis == axis]
        if len(swept) < 2:
            continue
        points = {arm.name: (arm.sweep.series, arm.sweep.value) for arm in swept}
        for arm in swept:
            if arm.baseline is not None and experiment.has(arm.baseline) and arm.baseline not in points:
                points[arm.baseline] = (ARMS[arm.baseline].label, math.nan)
        lines += sweep_lines(
            f"Sweep: {axis}", axis, sweep_rows(experiment, points), figures.parent, SWEEP_REFERENCES.get(axis)
        )
    return lines


def per_class_section(experiment: ExperimentResults) -> List[str]:
    """Per-class IoU, recall and precision of every arm (mean over seeds), classes by target frequency."""
    order = [c for c in np.argsort(-experiment.fractions) if experiment.fractions[c] > 0]
    lines = []
    for key in ("IoU", "recall", "precision"):
        rows = []
        for c in order:
            mark = " (rare)" if experiment.rare[c] else ""
            row = [experiment.class_names[c] + mark, f"{100 * experiment.fractions[c]:.2f}%"]
            for arm in experiment.arms:
                row.append(t_interval([experiment.per_class[(arm.name, s)][key][c] for s in experiment.seeds]).format())
            rows.append(row)
        header = ["class", "target pixels", *[arm.label for arm in experiment.arms]]
        lines += [f"## Per-class {key} (target val)", "", _markdown(rows, header)]
    return lines


def gbw_weight_series(run_dir: Path, call: str) -> Dict[str, np.ndarray]:
    """The GBW weights of loss call ``call`` (e.g. ``"mixed/sem_seg"``) logged in ``run_dir/metrics.json``:
    ``{class name: weights over the logged iterations}`` (empty when that call was not weighted)."""
    prefix = f"gbw/{call}/"
    series: Dict[str, List[float]] = OrderedDict()
    for record in read_metrics(run_dir):
        for key, value in record.items():
            if key.startswith(prefix):
                series.setdefault(key[len(prefix):], []).append(float(value))
    return {name: np.asarray(values) for name, values in series.items()}


def weight_stability_section(experiment: ExperimentResults) -> List[str]:
    """Per arm weighted by GBW, per class: the mean of the semantic loss's class weight over the logged
    iterations and its standard deviation over them (how much the weights move from step to step),
    each averaged over seeds; the mixed-batch call for DACS arms, the source call otherwise."""
    columns, rows_of = [], {}
    for arm in experiment.arms:
        per_seed = []
        for seed in experiment.seeds:
            run_dir = experiment.run_of[(arm.name, seed)].output_dir
            series = gbw_weight_series(run_dir, "mixed/sem_seg") or gbw_weight_series(run_dir, "source/sem_seg")
            if series:
                per_seed.append(series)
        if len(per_seed) != len(experiment.seeds):
            continue
        columns.append(arm.label)
        for name in per_seed[0]:
            mean = np.mean([series[name].mean() for series in per_seed])
            std = np.mean([series[name].std() for series in per_seed])
            rows_of.setdefault(name, {})[arm.label] = f"{mean:.2f} ± {std:.2f}"
    if not columns:
        return []
    rows = [[name, *(values.get(label, "") for label in columns)] for name, values in rows_of.items()]
    return [
        "## GBW class weights over training (semantic loss)",
        "",
        "Mean ± standard deviation of each class's weight over the logged iterations (every "
        "`UDA.LOG_PERIOD`), averaged over seeds: the mixed-batch loss for DACS arms, the source loss "
        "otherwise. The standard deviation is the weights' instability from step to step.",
        "",
        _markdown(rows, ["class", *columns]),
        "",
    ]


def gradient_section(experiment: ExperimentResults, figures: Path) -> List[str]:
    """For each GBW arm whose runs logged their class statistics at every step: the rank correlation of a
    class's g² with the decrease of its loss over the next K steps (:mod:`.gradient`), per class and
    pooled, on the source batch (true labels) and the mixed batch (pseudo-labels), mean over seeds with
    95 % t-intervals; ``figures/gradient_difficulty_<arm>.png`` per class."""
    lines: List[str] = []
    for arm in experiment.arms:
        run_dirs = {seed: experiment.run_of[(arm.name, seed)].output_dir for seed in experiment.seeds}
        pooled_rows, per_class_of = [], {}
        for call, found in runs_logged_every_step(run_dirs, experiment.preset.max_iter).items():
            per_seed = [correlations(found[seed]) for seed in sorted(found)]
            per_class, pooled = summarize(per_seed)
            per_class_of[call] = per_class
            pairs = int(np.mean([result.pairs for result in per_seed]))
            pooled_rows.append([call, str(pairs), *(interval.format(signed=True) for interval in pooled.values())])
        if not pooled_rows:
            continue
        names = [name for name in experiment.class_names if name in next(iter(per_class_of.values()))]
        share = dict(zip(experiment.class_names, experiment.fractions))
        rows = [
            [name, f"{100 * share[name]:.2f}", *(per_class_of[call][name].format(signed=True) for call in per_class_of)]
            for name in names
        ]
        figure = figures / f"gradient_difficulty_{arm.name}.png"
        plot_intervals(
            names,
            {call: [(i.mean, i.low, i.high) for i in (per_class_of[call][name] for name in names)] for call in per_class_of},
            "Spearman ρ(g²(t), ΔL over the next K steps)",
            f"{arm.label}: does a class's gradient track its loss decrease? (mean over seeds, 95 % interval)",
            figure,
        )
        lines += [
            f"## Gradient and difficulty: {arm.label}",
            "",
            f"Spearman's ρ between a class's squared gradient norm g² at step t (the one GBW solves its weights "
            f"from) and ΔL, the decrease of its mean cross-entropy over the next K = {HORIZON} steps (mean over "
            f"the {WINDOW} steps before t minus the mean over the {WINDOW} steps ending at t + K, neither "
            "containing t), over the steps whose batch holds the class; mean over seeds with 95 % t-intervals. "
            "Control: the loss level before t (the first of the two means) in place of g², and the partial ρ "
            "of g² with ΔL given that level (datasets/README.md, \"Study: gradient and difficulty\").",
            "",
            _markdown(pooled_rows, ["loss call", "pairs per run", "ρ(g², ΔL)", "ρ(loss level, ΔL)",
                                    "partial ρ(g², ΔL | level)"]),
            "",
            _markdown(rows, ["class", "target pixels (%)", *(f"ρ(g², ΔL), {call}" for call in per_class_of)]),
            "",
            f"![gradient and difficulty](figures/{figure.name})",
            "",
        ]
    return lines


def curves_section(experiment: ExperimentResults, figures: Path, datasets_root: Path) -> List[str]:
    """The teacher's confident fraction over training (mean over seeds) and the GBW weight curves (first seed)."""
    lines: List[str] = []
    curves = {}
    for arm in experiment.arms:
        per_seed = [experiment.curves[(arm.name, s)] for s in experiment.seeds]
        if all(iterations.size for iterations, _ in per_seed):
            length = min(iterations.size for iterations, _ in per_seed)
            curves[arm.label] = (per_seed[0][0][:length], np.mean([values[:length] for _, values in per_seed], axis=0))
    if curves:
        plot_curves(
            curves, "confident fraction", "Teacher pixels at or above the pseudo-label threshold (mean over seeds)",
            figures / "pseudo_confidence.png",
        )
        lines += ["## Pseudo-label confidence during training", "", "![teacher confidence](figures/pseudo_confidence.png)", ""]
    seed = experiment.seeds[0]
    for arm in [arm for arm in experiment.arms if arm.baseline is not None]:
        run_dir = experiment.run_of[(arm.name, seed)].output_dir
        _tool("plot_training.py", str(run_dir), "--output-dir", str(figures / arm.name), datasets_root=datasets_root)
        if (figures / arm.name / "gbw_weights.png").is_file():  # arms without GBW log no weights
            lines += [
                f"## GBW class weights during training: {arm.label} (seed {seed})", "",
                f"![GBW weights](figures/{arm.name}/gbw_weights.png)", "",
            ]
    return lines


def design_checks(experiment: ExperimentResults) -> List[Tuple[str, str, Optional[bool]]]:
    """The bounds the benchmark was designed to meet on the baseline arms: ``(check, measured, passed)``;
    ``passed`` is None when the arms it needs are not in the experiment."""
    checks: List[Tuple[str, str, Optional[bool]]] = []
    if experiment.has(ORACLE):
        oracle = experiment.interval(ORACLE, "mIoU")
        checks.append(("oracle mIoU ≥ 50", oracle.format(), oracle.mean >= 50))
        with warnings.catch_warnings():  # classes absent from target val are all-NaN columns
            warnings.simplefilter("ignore", RuntimeWarning)
            recall = np.nanmean([experiment.per_class[(ORACLE, s)]["recall"] for s in experiment.seeds], axis=0)
        present = np.isfinite(recall)
        worst = int(np.flatnonzero(present)[np.argmin(recall[present])])
        checks.append((
            "oracle recall ≥ 20 on every class in target val",
            f"lowest: {experiment.class_names[worst]} {recall[worst]:.1f}",
            bool(recall[worst] >= 20),
        ))
    if experiment.has(ORACLE) and experiment.has(SOURCE_ONLY):
        gap = experiment.difference(ORACLE, SOURCE_ONLY, "mIoU")
        checks.append(("oracle − source only ≥ 15 mIoU", gap.format(signed=True), gap.mean >= 15))
        if experiment.has(REFERENCE):
            closed = experiment.gap_closed(REFERENCE)
            check = "DACS closes ≥ 25 % of the gap, beyond 2 std errors"
            if closed.n < 2:
                checks.append((check, f"{closed.format(signed=True)} (one seed, no standard error)", None))
            else:
                text = f"{closed.format(signed=True)}, std error {closed.std_error:.1f}"
                checks.append((check, text, closed.beyond_two_std_errors(25)))
    if experiment.has(REFERENCE):
        confident = experiment.interval(REFERENCE, "confident fraction")
        checks.append(("DACS teacher confident fraction > 50 % at the end", confident.format(), confident.mean > 50))
    rare_count = int(experiment.rare.sum())
    checks.append(("≥ 6 classes under 1 % of the target pixels", str(rare_count), rare_count >= 6))
    for name in (SOURCE_ONLY, REFERENCE):
        if experiment.has(name):
            rare = experiment.interval(name, "recall (rare)").mean
            frequent = experiment.interval(name, "recall (frequent)").mean
            checks.append((
                f"{ARMS[name].label}: rare-class recall clearly below frequent",
                f"{rare:.1f} vs {frequent:.1f}",
                bool(rare < frequent - 10),
            ))
    return checks


def checks_section(experiment: ExperimentResults) -> List[str]:
    rows = [[check, measured, {True: "yes", False: "**no**", None: "n/a"}[passed]] for check, measured, passed in design_checks(experiment)]
    return [
        "## Benchmark design checks (baseline arms only)",
        "",
        "The bounds the benchmark was designed to meet (`datasets/README.md`, \"Design\"); "
        "\"clearly below\" means more than 10 points.",
        "",
        _markdown(rows, ["check", "measured", "met"]),
    ]


def _describe(label: str, reference: str, metric: str, interval: Interval) -> str:
    if interval.n == 0:  # e.g. a precision of classes one arm never predicts
        return f"{label} − {reference}, {metric}: undefined in every seed"
    if interval.n < 2:
        return f"{label} − {reference}, {metric}: {interval.format(signed=True)} (one seed, no interval)"
    if not interval.excludes_zero():
        return f"{label} − {reference}, {metric}: no difference shown ({interval.format(signed=True)} contains 0)"
    direction = "higher" if interval.mean > 0 else "lower"
    return f"{label} − {reference}, {metric}: {direction} ({interval.format(signed=True)})"


def conclusion_section(experiment: ExperimentResults) -> List[str]:
    """The conclusion, worded from the intervals only: for each GBW arm against its baseline, whether
    rare-class recall rises without a loss of mIoU (supported), whether it falls or mIoU falls
    (contradicted), or neither at this number of seeds (undecided)."""
    # An arm whose own baseline is not in the experiment is compared with DACS.
    baseline_of = {
        arm.name: arm.baseline if experiment.has(arm.baseline) else REFERENCE
        for arm in experiment.arms
        if arm.baseline is not None and (experiment.has(arm.baseline) or experiment.has(REFERENCE))
    }
    gbw_arms = [arm for arm in experiment.arms if arm.name in baseline_of]
    if not gbw_arms:
        return []
    lines = [
        "## Conclusion",
        "",
        "The claim tested: the treatment of each arm (what it adds to its baseline: GBW, frequency weighting, a "
        "GBW-trained starting point, or DACS) raises the recall of rare classes without lowering mIoU, against the "
        "arm it is added to.",
        "",
    ]
    for arm in gbw_arms:
        baseline = ARMS[baseline_of[arm.name]]
        rare = experiment.difference(arm.name, baseline.name, "recall (rare)")
        miou = experiment.difference(arm.name, baseline.name, "mIoU")
        if rare.n < 2:
            verdict = "cannot be judged from one seed"
        elif rare.low > 0 and not miou.high < 0:
            verdict = "is supported"
        elif rare.high < 0 or miou.high < 0:
            verdict = "is contradicted"
        else:
            verdict = "is neither supported nor contradicted at this number of seeds"
        details = "; ".join(
            _describe(arm.label, baseline.label, metric, experiment.difference(arm.name, baseline.name, metric))
            for metric in ("recall (rare)", "precision (rare)", "mIoU")
        )
        lines += [f"- **{arm.label}** vs {baseline.label}: the claim {verdict}. {details}.", ""]
    return lines


def examples_section(experiment: ExperimentResults, out: Path, datasets_root: Path) -> List[str]:
    """Two target val images with ground truth and prediction of DACS and DACS + GBW (or the last arm
    with panoptic predictions; semantic-only arms have none)."""
    figures = out / "figures"
    panoptic = [
        arm for arm in experiment.arms
        if (experiment.run_of[(arm.name, experiment.seeds[0])].eval_dir() / "panoptic_predictions.json").is_file()
    ]
    shown = [arm for arm in panoptic if arm.name in (REFERENCE, "dacs_gbw")] or panoptic[-1:]
    if not shown:
        return []
    lines = ["## Example predictions (target val; input | ground truth | prediction)", ""]
    for arm in shown:
        eval_dir = experiment.run_of[(arm.name, experiment.seeds[0])].eval_dir()
        target = figures / f"predictions_{arm.name}"
        _tool("visualize.py", "--dataset", VAL_DATASET, "--predictions", str(eval_dir), "--output-dir", str(target),
              "--max-images", "2", datasets_root=datasets_root)
        for png in sorted(target.glob("*.png"))[:2]:
            lines += [f"{arm.label}: ![{png.stem}]({png.relative_to(out)})", ""]
    return lines


def _metrics_by_run(experiment: ExperimentResults) -> Dict[str, "OrderedDict[str, float]"]:
    """The metrics of every run, keyed ``<arm>/seed<k>`` (``results.json``)."""
    return {f"{arm}/seed{seed}": values for (arm, seed), values in experiment.metrics.items()}


def write_report(
    preset_name: str,
    preset: Preset,
    runs: List[RunSpec],
    out: Path,
    datasets_root: Path,
    seconds: float,
) -> Path:
    """Read every run, write ``out/report.md`` (sections above, figures under ``out/figures``) and
    ``out/results.json`` (the metrics of every run); returns the path of the report."""
    experiment = collect_results(preset_name, preset, runs, datasets_root)
    figures = out / "figures"
    lines = setting_section(experiment, seconds)
    lines += domain_section(experiment)
    lines += metrics_section(experiment, "Semantic segmentation (target val)", SEMANTIC_METRICS)
    lines += metrics_section(experiment, "Panoptic segmentation (target val; 19 and 16 classes)", PANOPTIC_METRICS)
    lines += differences_section(experiment, figures)
    lines += sweep_section(experiment, figures)
    lines += conclusion_section(experiment)
    lines += checks_section(experiment)
    lines += per_class_section(experiment)
    lines += weight_stability_section(experiment)
    lines += gradient_section(experiment, figures)
    lines += curves_section(experiment, figures, datasets_root)
    lines += examples_section(experiment, out, datasets_root)
    report = out / "report.md"
    with atomic_write(report, "w") as f:
        f.write("\n".join(lines))
    summary = {
        "preset": preset_name,
        "seconds": seconds,
        "runs": _metrics_by_run(experiment),
        "design_checks": [{"check": c, "measured": m, "met": p} for c, m, p in design_checks(experiment)],
    }
    write_json(out / "results.json", summary)
    return report


def write_levels_report(
    preset_name: str, preset: Preset, experiments: Mapping[float, ExperimentResults], out: Path, seconds: float
) -> Path:
    """``out/report.md`` of a preset with imbalance levels, from the results of each level (``{level:
    results}``; each level has its own report in ``out/imbalance_<level>``): per level the rare classes'
    share of the target train pixels, then every arm against the level (:func:`sweep_lines`: DACS + GBW −
    DACS paired by seed at each level, table and ``figures/sweep_rare-class_frequency_factor.png``);
    ``out/results.json`` holds every run's metrics by level. Returns the path of the report."""
    levels = sorted(experiments, reverse=True)
    shares = [[
        f"{level:g}",
        f"{100 * experiments[level].fractions[experiments[level].rare].sum():.2f}%",
        f"[{level_folder(level)}/report.md]({level_folder(level)}/report.md)",
    ] for level in levels]
    rows = [
        row for level in levels
        for row in sweep_rows(experiments[level], {arm.name: (arm.label, level) for arm in experiments[level].arms})
    ]
    lines = [
        f"# Synthetic benchmark: {preset.description}",
        "",
        f"Generated by `python tools/run_experiment.py --preset {preset_name}` (this machine: {os.cpu_count()} CPU "
        f"threads; this call {seconds / 60:.1f} min): one benchmark per level, generated by `prepare_synthetic.py "
        "--rare-frequency <level>` (each object of the rare classes in the target train split kept with that "
        "probability, the rest of the images, the source splits and target val as in the standard benchmark) "
        "under `<datasets root>/imbalance_<level>/synthetic`, and one set of runs per level, each with its own "
        f"report (seeds {', '.join(map(str, preset.seeds))}, {preset.max_iter} iterations). Numbers are on the "
        "(identical) target val split of each level, in percent.",
        "",
        _markdown(shares, ["level", "rare classes' share of the target train pixels", "report"]),
    ]
    lines += sweep_lines(
        "Against the rare-class frequency", "rare-class frequency factor", rows, out, 1.0 if 1.0 in levels else None
    )
    with atomic_write(out / "report.md", "w") as f:
        f.write("\n".join(lines))
    write_json(out / "results.json", {
        "preset": preset_name,
        "seconds": seconds,
        "levels": {f"{level:g}": _metrics_by_run(experiments[level]) for level in levels},
    })
    return out / "report.md"
