#!/usr/bin/env python
"""Plot a training run from its Detectron2 ``metrics.json``.

Writes three PNGs to the output folder:

- ``losses.png``: every loss (``total_loss``, ``loss_*``, ``*/loss_*``) over iterations;
- ``gbw_weights.png``: the GBW class weights (``gbw/<domain>/<loss>/<class>`` or
  ``gbw/<loss>/<class>``), one panel per loss, one line per class;
- ``eval_metrics.png``: the evaluation summaries (mIoU*, mPQ*, PQ*, pACC ...), one panel per
  dataset and task.

Example:
    python tools/plot_training.py output/synthetic_dacs_gbw --output-dir output/synthetic_dacs_gbw/plots
"""
import argparse
import logging
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gbw_panoptic.utils.io import atomic_write  # noqa: E402

from _common import read_metrics  # noqa: E402

logger = logging.getLogger("plot_training")

Series = Tuple[List[int], List[float]]
# Summary metrics of the evaluators worth a curve (per-class values have a "-" in their name).
EVAL_TASKS = ("sem_seg", "panoptic_seg")


def collect(records: Sequence[Dict[str, float]], group_of: Callable[[str], Optional[Tuple[str, str]]]) -> "OrderedDict[str, OrderedDict[str, Series]]":
    """Series grouped into panels: ``group_of(key)`` gives (panel, line label) or None to skip."""
    groups: "OrderedDict[str, OrderedDict[str, Series]]" = OrderedDict()
    for record in records:
        for key, value in record.items():
            if key == "iteration" or not isinstance(value, (int, float)):
                continue
            placement = group_of(key)
            if placement is None:
                continue
            panel, label = placement
            iterations, values = groups.setdefault(panel, OrderedDict()).setdefault(label, ([], []))
            iterations.append(int(record["iteration"]))
            values.append(float(value))
    return groups


def loss_group(key: str) -> Optional[Tuple[str, str]]:
    name = key.rsplit("/", 1)[-1]
    if key.startswith("gbw/") or not (name.startswith("loss") or name == "total_loss"):
        return None
    return ("losses", key)


def gbw_group(key: str) -> Optional[Tuple[str, str]]:
    if not key.startswith("gbw/") or key.count("/") < 2:
        return None
    panel, class_name = key.rsplit("/", 1)
    return (panel, class_name)


def eval_group(key: str) -> Optional[Tuple[str, str]]:
    parts = key.split("/")
    if key.startswith("gbw/") or len(parts) < 2 or parts[-2] not in EVAL_TASKS or "-" in parts[-1]:
        return None
    return ("/".join(parts[:-1]), parts[-1])


def plot_groups(groups: "OrderedDict[str, OrderedDict[str, Series]]", title: str, ylabel: str, path: Path, log_scale: bool = False) -> None:
    """One panel per group, one line per series, saved as a PNG (atomically)."""
    columns = min(2, len(groups))
    rows = (len(groups) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(7 * columns, 4 * rows), squeeze=False)
    for axis, (panel, lines) in zip(axes.flat, groups.items()):
        axis.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # 20 distinct colours: one per class
        for label, (iterations, values) in lines.items():
            axis.plot(iterations, values, label=label, marker="o" if len(values) < 20 else None, markersize=3)
        axis.set_title(panel)
        axis.set_xlabel("iteration")
        axis.set_ylabel(ylabel)
        if log_scale:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, ncol=2 if len(lines) > 10 else 1, loc="best")
    for axis in list(axes.flat)[len(groups):]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    with atomic_write(path) as f:
        figure.savefig(f, format="png", dpi=100)
    plt.close(figure)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run folder (cfg.OUTPUT_DIR) or its metrics.json")
    parser.add_argument("--output-dir", type=Path, default=None, help="where to write the PNGs (default: <run>/plots)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    records = read_metrics(args.run)
    run_dir = args.run if args.run.is_dir() else args.run.parent
    output_dir = args.output_dir or run_dir / "plots"
    output_dir.mkdir(parents=True, exist_ok=True)
    plots = [
        ("losses.png", loss_group, "Losses", "loss", True),
        ("gbw_weights.png", gbw_group, "GBW class weights", "weight", False),
        ("eval_metrics.png", eval_group, "Evaluation", "%", False),
    ]
    written = 0
    for file_name, group_of, title, ylabel, log_scale in plots:
        groups = collect(records, group_of)
        if not groups:
            logger.info("%s: nothing to plot in %s", file_name, args.run)
            continue
        plot_groups(groups, f"{title}: {run_dir.name}", ylabel, output_dir / file_name, log_scale)
        logger.info("wrote %s", output_dir / file_name)
        written += 1
    if written == 0:
        logger.error("%s has no loss, GBW weight or evaluation metric", args.run)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
