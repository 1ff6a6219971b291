"""Does a class's gradient track how hard it is to learn? (datasets/README.md, "Study: gradient and
difficulty")

GBW weights a class by its squared gradient norm g_c² (the ``sq_norm`` the cross-entropy logs as
``gbw_stats/<pass>/sem_seg/<class>/sq_norm`` next to the class's pixel count and mean unweighted
cross-entropy ``ce``). For a run logged at every step, at step t and for a class c in that step's batch:

- ``g_c²(t)``: the squared norm GBW solved its weights from at t;
- the loss decrease over the next K steps, ``D_c(t) = mean L_c[t − W, t) − mean L_c[t + K − W, t + K)``:
  the class's mean cross-entropy over the W steps before t minus that over the W steps ending K steps
  later (each mean over the steps of its window whose batch holds the class, at least
  :data:`MIN_STEPS_IN_WINDOW`), so that neither mean contains step t and the batch noise of L_c(t)
  does not enter both sides;
- the loss level before t, ``mean L_c[t − W, t)``, the control: a class with a higher loss has more
  to lose whatever its gradient.

Per run: Spearman's ρ of g_c²(t) with D_c(t) over the steps of each class, and pooled over every
(class, step) pair; the same for the loss level; and the partial ρ of g_c² with D_c given the level
(the Pearson correlation of the ranks' residuals after a linear fit of each on the level's ranks).
Over seeds: the mean with its 95 % t-interval (:func:`.stats.t_interval`).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
from scipy import stats

from _common import read_metrics

from .stats import Interval, t_interval

__all__ = [
    "HORIZON",
    "WINDOW",
    "ClassSeries",
    "class_series",
    "difficulty_pairs",
    "Correlations",
    "correlations",
    "summarize",
    "runs_logged_every_step",
]

# K: the steps over which a class's loss decrease is measured, and W: the steps of each loss mean.
HORIZON = 50
WINDOW = 25
# A window mean needs the class in at least this many of the window's batches.
MIN_STEPS_IN_WINDOW = 5
# A per-class correlation needs at least this many steps.
MIN_PAIRS = 20
STATISTIC_PREFIX = "gbw_stats"


@dataclass(frozen=True)
class ClassSeries:
    """One class's statistics of one loss call at every logged iteration (float64 [T] each, in
    iteration order; ``ce`` and ``sq_norm`` NaN where the class has no pixels)."""

    iterations: np.ndarray
    sq_norm: np.ndarray
    ce: np.ndarray
    pixels: np.ndarray


def class_series(run_dir: Path) -> Dict[str, "OrderedDict[str, ClassSeries]"]:
    """The per-class statistics logged in ``run_dir/metrics.json``
    (``gbw_stats/<pass>/<loss>/<class>/<sq_norm|pixels|ce>``), read once, by loss call:
    ``{"<pass>/<loss>" (e.g. "source/sem_seg"): {class name: ClassSeries}}``; empty when the run logged
    none (GBW off)."""
    prefix = f"{STATISTIC_PREFIX}/"
    rows: Dict[str, Dict[str, Dict[str, List[float]]]] = OrderedDict()
    for record in read_metrics(run_dir):
        values: Dict[Tuple[str, str], Dict[str, float]] = {}
        for key, value in record.items():
            if key.startswith(prefix):
                call, statistic = key[len(prefix):].rsplit("/", 1)
                call, name = call.rsplit("/", 1)
                values.setdefault((call, name), {})[statistic] = float(value)
        for (call, name), entry in values.items():
            row = rows.setdefault(call, OrderedDict()).setdefault(
                name, {"iterations": [], "sq_norm": [], "ce": [], "pixels": []}
            )
            row["iterations"].append(float(record["iteration"]))
            for statistic in ("sq_norm", "ce", "pixels"):
                row[statistic].append(entry.get(statistic, math.nan))
    series: Dict[str, "OrderedDict[str, ClassSeries]"] = OrderedDict()
    for call, classes in rows.items():
        for name, row in classes.items():
            arrays = {key: np.asarray(value, dtype=np.float64) for key, value in row.items()}
            absent = ~(arrays["pixels"] > 0)
            arrays["ce"][absent] = math.nan
            arrays["sq_norm"][absent] = math.nan
            series.setdefault(call, OrderedDict())[name] = ClassSeries(**arrays)
    return series


def _window_means(iterations: np.ndarray, values: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Mean of ``values`` (NaN: absent) over the iterations in ``[start, start + length)`` for each start;
    NaN where fewer than :data:`MIN_STEPS_IN_WINDOW` values are present."""
    present = ~np.isnan(values)
    cumulative_sum = np.concatenate([[0.0], np.cumsum(np.where(present, values, 0.0))])
    cumulative_count = np.concatenate([[0], np.cumsum(present)])
    low = np.searchsorted(iterations, starts, side="left")
    high = np.searchsorted(iterations, starts + length, side="left")
    counts = cumulative_count[high] - cumulative_count[low]
    sums = cumulative_sum[high] - cumulative_sum[low]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts >= MIN_STEPS_IN_WINDOW, sums / np.maximum(counts, 1), math.nan)


def difficulty_pairs(
    series: ClassSeries, horizon: int = HORIZON, window: int = WINDOW
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every step t with the class in the batch and both loss windows defined (module docstring):
    ``(g_c²(t), D_c(t), loss level before t)``, float64 [n] each."""
    t = series.iterations
    before = _window_means(t, series.ce, t - window, window)
    after = _window_means(t, series.ce, t + horizon - window, window)
    last = t.max() if t.size else 0.0
    keep = ~np.isnan(series.sq_norm) & ~np.isnan(before) & ~np.isnan(after) & (t - window >= t.min(initial=0.0))
    keep &= t + horizon - 1 <= last
    return series.sq_norm[keep], (before - after)[keep], before[keep]


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < MIN_PAIRS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def _partial_spearman(x: np.ndarray, y: np.ndarray, control: np.ndarray) -> float:
    """Rank correlation of ``x`` and ``y`` with the (linear) part of ``control``'s ranks removed from both."""
    if x.size < MIN_PAIRS:
        return math.nan
    ranks = [stats.rankdata(v) for v in (x, y, control)]
    design = np.stack([np.ones_like(ranks[2]), ranks[2]], axis=1)
    residuals = [r - design @ np.linalg.lstsq(design, r, rcond=None)[0] for r in ranks[:2]]
    if residuals[0].std() == 0 or residuals[1].std() == 0:
        return math.nan
    return float(np.corrcoef(residuals[0], residuals[1])[0, 1])


@dataclass(frozen=True)
class Correlations:
    """The rank correlations of one run: per class ``{name: ρ(g², D)}``, and pooled over every
    (class, step) pair ρ(g², D), ρ(level, D), partial ρ(g², D | level), with the number of pairs."""

    per_class: Dict[str, float]
    pooled_sq_norm: float
    pooled_level: float
    pooled_partial: float
    pairs: int


def correlations(series: Mapping[str, ClassSeries], horizon: int = HORIZON, window: int = WINDOW) -> Correlations:
    """:class:`Correlations` of one run's :func:`class_series`."""
    parts = [difficulty_pairs(one, horizon, window) for one in series.values()]
    per_class = {name: _spearman(sq_norm, decrease) for name, (sq_norm, decrease, _) in zip(series, parts)}
    sq_norm, decrease, level = (np.concatenate([part[i] for part in parts]) if parts else np.zeros(0) for i in range(3))
    return Correlations(
        per_class,
        _spearman(sq_norm, decrease),
        _spearman(level, decrease),
        _partial_spearman(sq_norm, decrease, level),
        int(sq_norm.size),
    )


def summarize(per_seed: Sequence[Correlations]) -> Tuple[Dict[str, Interval], Dict[str, Interval]]:
    """Per class and pooled (``"ρ(g², ΔL)"``, ``"ρ(loss level, ΔL)"``, ``"partial ρ(g², ΔL | level)"``):
    the mean over seeds with its 95 % t-interval."""
    names = list(dict.fromkeys(name for result in per_seed for name in result.per_class))
    per_class = {name: t_interval([result.per_class.get(name, math.nan) for result in per_seed]) for name in names}
    pooled = {
        "ρ(g², ΔL)": t_interval([result.pooled_sq_norm for result in per_seed]),
        "ρ(loss level, ΔL)": t_interval([result.pooled_level for result in per_seed]),
        "partial ρ(g², ΔL | level)": t_interval([result.pooled_partial for result in per_seed]),
    }
    return per_class, pooled


def logged_every_step(series: Mapping[str, ClassSeries], max_iter: int) -> bool:
    """Whether the run logged its class statistics at (nearly) every step: at least 90 % of ``max_iter``."""
    return bool(series) and max(one.iterations.size for one in series.values()) >= 0.9 * max_iter


def runs_logged_every_step(
    run_dirs: Mapping[int, Path], max_iter: int
) -> Dict[str, Dict[int, "OrderedDict[str, ClassSeries]"]]:
    """``{loss call: {seed: its class series}}`` of an arm's runs (:func:`class_series`, each run read
    once), for the loss calls that every run logged at (nearly) every step, the source batch's first; empty
    when there are none."""
    found = {seed: class_series(run_dir) for seed, run_dir in run_dirs.items()}
    # The source batch (true labels) first.
    calls = sorted(
        {call for series in found.values() for call in series}, key=lambda call: (not call.startswith("source/"), call)
    )
    return {
        call: {seed: series[call] for seed, series in found.items()}
        for call in calls
        if found and all(logged_every_step(series.get(call, {}), max_iter) for series in found.values())
    }
