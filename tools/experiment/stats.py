"""Statistics of an experiment over seeds: means with Student-t confidence intervals, paired by seed."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

__all__ = ["Interval", "t_interval", "paired_differences", "gap_closed"]


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with its standard error and two-sided confidence interval ``[low, high]``
    (NaN bounds when ``n < 2``: one value has no noise estimate)."""

    mean: float
    low: float
    high: float
    std_error: float
    n: int

    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (NaN bounds: False)."""
        return bool(self.low > 0 or self.high < 0)

    def beyond_two_std_errors(self, threshold: float) -> bool:
        """True when ``mean - 2 * std_error > threshold`` (NaN standard error: False)."""
        return bool(self.mean - 2 * self.std_error > threshold)

    def format(self, signed: bool = False) -> str:
        """``mean [low, high]`` with 2 decimals (``n/a`` for no value, the mean alone for one)."""
        if math.isnan(self.mean):
            return "n/a"
        number = "{:+.2f}" if signed else "{:.2f}"
        text = number.format(self.mean)
        if math.isnan(self.low):
            return text
        return f"{text} [{number.format(self.low)}, {number.format(self.high)}]"


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean and Student-t confidence interval of ``values``; NaN values are left out.

    The interval is ``mean ± t_{(1+confidence)/2, n-1} · s / √n`` with ``s`` the sample standard
    deviation (ddof 1).
    """
    array = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    n = int(array.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0)
    mean = float(array.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, math.nan, 1)
    std_error = float(array.std(ddof=1) / math.sqrt(n))
    half_width = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std_error
    return Interval(mean, mean - half_width, mean + half_width, std_error, n)


def paired_differences(values: Mapping[int, float], reference: Mapping[int, float]) -> Sequence[float]:
    """``values[s] - reference[s]`` for every seed ``s`` both have, in seed order."""
    return [values[seed] - reference[seed] for seed in sorted(set(values) & set(reference))]


def gap_closed(
    values: Mapping[int, float], lower: Mapping[int, float], upper: Mapping[int, float]
) -> Sequence[float]:
    """Per seed, the fraction (percent) of the ``lower`` → ``upper`` gap that ``values`` closes:
    ``100 · (value - lower) / (upper - lower)``, for the seeds all three have (NaN where the gap is 0)."""
    fractions = []
    for seed in sorted(set(values) & set(lower) & set(upper)):
        gap = upper[seed] - lower[seed]
        fractions.append(100 * (values[seed] - lower[seed]) / gap if gap != 0 else math.nan)
    return fractions
