"""Class subsets, subset means and the JSON / Markdown / CSV result files of the evaluators.

Every evaluator reports its per-class metrics and their means over class subsets: the dataset's
``evaluation_classes`` (the 19 Cityscapes classes) and, for SYNTHIA-sourced runs, the 16 classes
SYNTHIA has (``evaluation_classes_16``). Some SYNTHIA papers instead divide the *sum* of the 19
per-class values by 16; that number is reported too, under a name that says so
(``mIoU19sum_div16``), never as ``mIoU16``.
"""
import csv
import json
import io
import math
import os
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..utils.io import atomic_write, write_json

__all__ = [
    "class_subsets",
    "subset_means",
    "subset_notes",
    "markdown_table",
    "write_report",
    "read_report",
]


def class_subsets(metadata: Any, extra: Optional[Sequence[int]] = None) -> "OrderedDict[str, List[int]]":
    """Class subsets to average over, named by their size: ``{"19": [...], "16": [...]}``.

    The first entry is the dataset's ``evaluation_classes`` (the primary subset), then
    ``evaluation_classes_16`` when the metadata has it, then ``extra`` (e.g. the source dataset's
    evaluated classes) when it is a different set.
    """
    if not hasattr(metadata, "evaluation_classes"):
        raise KeyError(
            f"metadata of dataset {getattr(metadata, 'name', '?')!r} has no 'evaluation_classes' "
            f"(list of contiguous class ids to evaluate)"
        )
    subsets: "OrderedDict[str, List[int]]" = OrderedDict()
    candidates = [metadata.evaluation_classes, getattr(metadata, "evaluation_classes_16", None), extra]
    for classes in candidates:
        if classes is None:
            continue
        classes = sorted(int(c) for c in classes)
        if classes not in subsets.values():
            subsets.setdefault(str(len(classes)), classes)
    return subsets


def subset_means(metric: str, per_class: np.ndarray, subsets: Mapping[str, Sequence[int]]) -> "OrderedDict[str, float]":
    """Means of a per-class metric over each subset; NaN entries (class absent) are left out.

    Args:
        metric: name stem, e.g. ``"IoU"`` gives ``mIoU`` (primary subset), ``mIoU19``, ``mIoU16``
            and ``mIoU19sum_div16`` (sum over the primary subset divided by the size of each smaller
            subset, the convention of some SYNTHIA papers).
        per_class: values indexed by contiguous class id (float, NaN = not counted).
        subsets: as returned by :func:`class_subsets`, primary first.
    """
    means: "OrderedDict[str, float]" = OrderedDict()
    names = list(subsets)
    for position, name in enumerate(names):
        values = per_class[list(subsets[name])]
        mean = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        if position == 0:
            means[f"m{metric}"] = mean
        means[f"m{metric}{name}"] = mean
    primary = per_class[list(subsets[names[0]])]
    for name in names[1:]:
        if len(subsets[name]) < len(subsets[names[0]]):
            means[f"m{metric}{names[0]}sum_div{name}"] = float(np.nansum(primary)) / len(subsets[name])
    return means


def subset_notes(metric: str, subsets: Mapping[str, Sequence[int]]) -> List[str]:
    """Markdown notes that explain the subset means of ``metric`` written by :func:`subset_means`."""
    names = list(subsets)
    notes = [f"m{metric}{name}: mean over {name} classes {subsets[name]}" for name in names]
    notes += [
        f"m{metric}{names[0]}sum_div{name}: sum of the {names[0]} per-class values divided by {name} "
        f"(a convention of some SYNTHIA papers; not a mean over the {name} classes)"
        for name in names[1:]
        if len(subsets[name]) < len(subsets[names[0]])
    ]
    return notes + ["classes without ground-truth and predicted pixels (shown as -) are left out of the means"]


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub Markdown table of ``rows`` (floats with 2 decimals, NaN as ``-``)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_format(row.get(column, "")) for column in columns) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    output_dir: str,
    name: str,
    title: str,
    summary: Mapping[str, float],
    per_class: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    notes: Sequence[str] = (),
) -> Dict[str, str]:
    """Write ``{name}.json``, ``{name}.md`` and ``{name}.csv`` (per class) to ``output_dir``.

    Returns the paths written, by extension.
    """
    os.makedirs(output_dir, exist_ok=True)
    paths = {ext: os.path.join(output_dir, f"{name}.{ext}") for ext in ("json", "md", "csv")}
    write_json(paths["json"], {"summary": dict(summary), "per_class": [dict(row) for row in per_class]})

    summary_rows = [{"metric": key, "value": value} for key, value in summary.items()]
    markdown = f"# {title}\n\n" + markdown_table(summary_rows, ["metric", "value"])
    markdown += "\n## Per class\n\n" + markdown_table(per_class, columns)
    if notes:
        markdown += "\n" + "\n".join(f"- {note}" for note in notes) + "\n"

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(per_class)
    with atomic_write(paths["md"], "w") as f:
        f.write(markdown)
    with atomic_write(paths["csv"], "w", newline="") as f:
        f.write(buffer.getvalue())
    return paths


def read_report(path: str) -> Dict[str, Any]:
    """Read a ``{name}.json`` written by :func:`write_report` (null values become NaN)."""
    with open(path) as f:
        report = json.load(f)
    if "summary" not in report or "per_class" not in report:
        raise ValueError(f"{path} is not an evaluation report (expected keys 'summary' and 'per_class')")

    def _nan(value: Any) -> Any:
        return float("nan") if value is None else value

    report["summary"] = {key: _nan(value) for key, value in report["summary"].items()}
    report["per_class"] = [{key: _nan(value) for key, value in row.items()} for row in report["per_class"]]
    return report
