"""Figures of the experiment report: per-class recall changes and the teacher's confidence curve."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gbw_panoptic.utils.io import atomic_write  # noqa: E402

__all__ = ["plot_recall_deltas", "plot_curves", "plot_sweep", "plot_intervals"]


def _save(fig: "plt.Figure", path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def plot_recall_deltas(
    class_names: Sequence[str], fractions: np.ndarray, deltas: Mapping[str, np.ndarray], path: Path
) -> None:
    """Bar chart of per-class recall changes against a reference arm.

    Args:
        class_names, fractions: class names and target train pixel fractions (train id order);
            classes are drawn by decreasing frequency, absent classes left out.
        deltas: label → ``seeds x classes`` recall differences in points (NaN: class absent);
            bars show the mean over seeds, error bars the std.
    """
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
    ax.set_title("Per-class recall on target val: arm − DACS (classes by target pixel frequency)")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_curves(curves: Mapping[str, Tuple[np.ndarray, np.ndarray]], ylabel: str, title: str, path: Path) -> None:
    """One line per label: ``(iterations, values)``, e.g. the teacher's confident fraction."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, (iterations, values) in curves.items():
        ax.plot(iterations, values, label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_sweep(
    points: Mapping[Tuple[str, str], Sequence[Tuple[float, float, float, float]]],
    metrics: Sequence[str],
    xlabel: str,
    ylabel: str,
    title: str,
    path: Path,
) -> None:
    """One panel per metric, one line per series of ``(x, mean, low, high)`` points (x on a log axis with
    a tick at every value, the 95 % interval as error bars), and a line at 0 (the points are differences).

    Args:
        points: ``{(series, metric): points}``; NaN bounds (one seed) draw no error bar.
        ylabel: the unit of a panel, after the metric's name (e.g. ``"arm − baseline (points)"``).
    """
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        values = set()
        for (name, of), series in points.items():
            if of != metric or not series:
                continue
            x, mean, low, high = (np.asarray(column, dtype=float) for column in zip(*sorted(series)))
            error = np.vstack([mean - low, high - mean])
            axis.errorbar(x, mean, yerr=np.where(np.isfinite(error), error, 0.0), marker="o", capsize=3, label=name)
            values.update(x)
        axis.axhline(0, color="grey", linestyle="--", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_xticks(sorted(values))
        axis.set_xticklabels([f"{value:g}" for value in sorted(values)])
        axis.minorticks_off()
        axis.set_xlabel(xlabel)
        axis.set_ylabel(f"{metric}: {ylabel}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def plot_intervals(
    labels: Sequence[str], intervals: Mapping[str, Sequence[Tuple[float, float, float]]], ylabel: str, title: str,
    path: Path,
) -> None:
    """Points with 95 % intervals, one group of series per label (e.g. per class), and a line at 0.

    Args:
        labels: the x tick labels, in order.
        intervals: ``{series: [(mean, low, high) per label]}``; NaN bounds draw no error bar, a NaN mean
            no point.
    """
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(labels)), 4.5))
    offset = 0.6 / max(len(intervals), 1)
    for index, (name, values) in enumerate(intervals.items()):
        mean, low, high = (np.asarray(column, dtype=float) for column in zip(*values))
        error = np.vstack([mean - low, high - mean])
        xs = np.arange(len(labels)) + (index - (len(intervals) - 1) / 2) * offset
        ax.errorbar(xs, mean, yerr=np.where(np.isfinite(error), error, 0.0), fmt="o", capsize=3, label=name)
    ax.axhline(0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(np.arange(len(labels)))
    ax.set_xticklabels(labels, rotation=60, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
