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

__all__ = ["plot_recall_deltas", "plot_curves"]


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
