#!/usr/bin/env python
"""Compare the evaluation results of two runs class by class (e.g. without and with GBW).

Reads the ``sem_seg.json`` and ``panoptic_seg.json`` that the evaluators write under
``<run>/inference/<dataset>/`` (a report that only one run has gives n/a for the other run, shown as
``-``, and a note says which file is missing), prints a per-class table of PQ, IoU and recall of run A,
run B and their difference (B - A), writes it as ``compare.{json,md,csv}``, and draws
``recall_delta.png``: the per-class recall difference, classes sorted by their pixel frequency in
the ground truth (most frequent left), the figure that shows whether rare classes gained.

Example:
    python tools/compare_runs.py output/dacs output/dacs_gbw --output-dir output/dacs_vs_gbw
"""
import argparse
import math
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tabulate import tabulate  # noqa: E402

from gbw_panoptic.utils.io import atomic_write  # noqa: E402
from gbw_panoptic.evaluation.report import read_report, write_report  # noqa: E402

REPORTS = (("sem_seg", ("IoU", "recall")), ("panoptic_seg", ("PQ",)))


def find_report(run: Path, name: str, dataset: Optional[str]) -> Optional[Path]:
    """``<name>.json`` under ``run`` (a run folder or an evaluation folder); None if absent.

    Raises ValueError when several datasets have one and ``dataset`` does not choose.
    """
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist")
    candidates = sorted(path for path in run.rglob(f"{name}.json") if dataset is None or dataset in path.parts)
    if len(candidates) > 1:
        raise ValueError(
            f"{run} has several {name}.json ({', '.join(str(c) for c in candidates)}); choose one with --dataset"
        )
    return candidates[0] if candidates else None


def missing_reports(reports_a: Dict[str, Dict[str, Any]], reports_b: Dict[str, Dict[str, Any]]) -> List[str]:
    """One note per report that only one of the runs has (its metrics are n/a for the other run)."""
    return [
        f"run {side} has no {name}.json: its {', '.join(metrics)} are n/a (-)"
        for name, metrics in REPORTS
        for side, reports, other in (("A", reports_a, reports_b), ("B", reports_b, reports_a))
        if name in other and name not in reports
    ]


def compare_rows(reports_a: Dict[str, Dict[str, Any]], reports_b: Dict[str, Dict[str, Any]]) -> List["OrderedDict[str, Any]"]:
    """Per-class rows: name, ground-truth pixels, and each metric of A, B and B - A (NaN for a run without
    the report that has the metric, see :func:`missing_reports`)."""
    rows: Dict[int, "OrderedDict[str, Any]"] = OrderedDict()
    for name, metrics in REPORTS:
        # Per run: its rows by class id, or None when the run has no such report.
        per_run = [{row["class_id"]: row for row in r[name]["per_class"]} if name in r else None for r in (reports_a, reports_b)]
        present = [classes for classes in per_run if classes is not None]
        if not present:
            continue
        for class_id, row_x in present[0].items():
            for side, classes in zip("AB", per_run):
                if classes is not None and class_id not in classes:
                    raise ValueError(f"class {class_id} ({row_x['name']}) is missing from run {side}'s {name} report")
            row = rows.setdefault(class_id, OrderedDict(class_id=class_id, name=row_x["name"]))
            if "gt_pixels" in row_x:
                row["gt_pixels"] = row_x["gt_pixels"]
            for metric in metrics:
                value_a, value_b = (math.nan if classes is None else classes[class_id][metric] for classes in per_run)
                row[f"{metric} A"], row[f"{metric} B"], row[f"{metric} B-A"] = value_a, value_b, value_b - value_a
    return list(rows.values())


def plot_recall_delta(rows: List[Dict[str, Any]], path: Path, title: str) -> None:
    """Bar chart of ``recall B-A`` per class, classes by decreasing ground-truth pixel count."""
    ordered = sorted(rows, key=lambda row: -row["gt_pixels"])
    deltas = [0.0 if math.isnan(row["recall B-A"]) else row["recall B-A"] for row in ordered]
    figure, axis = plt.subplots(figsize=(max(6, 0.5 * len(ordered)), 4))
    axis.bar(range(len(ordered)), deltas, color=["tab:green" if d >= 0 else "tab:red" for d in deltas])
    axis.set_xticks(range(len(ordered)))
    axis.set_xticklabels([row["name"] for row in ordered], rotation=60, ha="right")
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_ylabel("recall B - A (points)")
    axis.set_xlabel("classes, most frequent (ground-truth pixels) first")
    axis.set_title(title)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    with atomic_write(path) as f:
        figure.savefig(f, format="png", dpi=100)
    plt.close(figure)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path, help="run A (baseline): run folder or evaluation folder")
    parser.add_argument("run_b", type=Path, help="run B (compared to A)")
    parser.add_argument("--dataset", default=None, help="dataset name, when a run evaluated several")
    parser.add_argument("--output-dir", type=Path, default=Path("compare_runs"), help="where to write compare.{json,md,csv} and recall_delta.png")
    args = parser.parse_args(argv)

    reports: List[Dict[str, Dict[str, Any]]] = []
    for run in (args.run_a, args.run_b):
        found = {}
        for name, _metrics in REPORTS:
            path = find_report(run, name, args.dataset)
            if path is not None:
                found[name] = read_report(str(path))
        if "sem_seg" not in found:
            print(f"error: no sem_seg.json under {run} (run an evaluation first: tools/train_net.py --eval-only)", file=sys.stderr)
            return 1
        reports.append(found)
    rows = compare_rows(reports[0], reports[1])
    notes = missing_reports(reports[0], reports[1])
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    summary: "OrderedDict[str, float]" = OrderedDict()
    for name, _metrics in REPORTS:
        if name in reports[0] and name in reports[1]:
            for key, value_a in reports[0][name]["summary"].items():
                if key in reports[1][name]["summary"]:
                    summary[f"{key} A"] = value_a
                    summary[f"{key} B"] = reports[1][name]["summary"][key]
                    summary[f"{key} B-A"] = reports[1][name]["summary"][key] - value_a
    columns = list(rows[0].keys())
    title = f"{args.run_b} vs {args.run_a}"
    print(tabulate([[row[c] for c in columns] for row in rows], headers=columns, floatfmt=".2f", tablefmt="github"))
    for key in ("mIoU", "mPQ"):
        if f"{key} B-A" in summary:
            print(f"{key}: {summary[f'{key} A']:.2f} -> {summary[f'{key} B']:.2f} ({summary[f'{key} B-A']:+.2f})")
    write_report(str(args.output_dir), "compare", f"Per-class comparison: {title}", summary, rows, columns,
                 notes=[f"A = {args.run_a}", f"B = {args.run_b}", "B-A: difference in points", *notes])
    plot_recall_delta(rows, args.output_dir / "recall_delta.png", f"Recall per class: {args.run_b.name} - {args.run_a.name}")
    print(f"wrote {args.output_dir}/compare.{{json,md,csv}} and recall_delta.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
