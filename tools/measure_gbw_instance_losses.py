#!/usr/bin/env python
"""Measure what GBW does to the instance losses (center MSE, offset L1) on the synthetic benchmark.

Builds the training targets of the source images with the config's recipe (the model's target
generator at the images' own size, no augmentation), groups them into batches as training does, and
reports, per batch and summarised:

- **center**: the share of the center target (sum of the heatmap over pixels with center weight) that
  lies on stuff pixels, and on road: with the center pixels grouped by their semantic class, that
  part of every Gaussian takes the weight of the stuff class it lies on; the class weights at an
  untrained prediction (0 everywhere, so the gradient is the target itself), grouped by semantic
  class and by the class of the instance whose Gaussian covers each pixel (``center_class``), with
  absolute lambda = 1 (the reference) and relative lambda = 1;
- **offset**: with L1 the gradient of a pixel is +-1 per channel whatever the prediction, so
  g_c^2 = 2 * sum_{i in c} q_i^2 / (N_c + 1)^2 depends on the pixel counts only: the script checks
  this for two random predictions and reports the class weights (absolute and relative lambda = 1)
  next to the pixel counts, i.e. GBW on the offsets is per-batch inverse-frequency weighting.

Example:
    python tools/measure_gbw_instance_losses.py --out output/bench/gbw_instance_losses.json
"""
import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch
import gbw_panoptic  # noqa: F401  (before Detectron2: its warning filter covers fvcore's import-time scripting)
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from panopticapi.utils import rgb2id
from tabulate import tabulate

from _common import write_report
from bench_train_step import prepare_datasets
from gbw_panoptic.config import add_gbw_panoptic_config
from gbw_panoptic.data.mapper import build_target_generator
from gbw_panoptic.gbw import qp_class_weights, regression_grad_sq_norms

REPO_ROOT = Path(__file__).resolve().parents[1]
IGNORE = 255


def load_targets(cfg, dataset_name: str, num_images: int) -> List[Dict[str, torch.Tensor]]:
    """Training targets of the first ``num_images`` images of ``dataset_name`` that have instances."""
    generator = build_target_generator(cfg, dataset_name)
    records = [r for r in DatasetCatalog.get(dataset_name) if r.get("has_instances", True)][:num_images]
    if not records:
        raise ValueError(f"dataset {dataset_name} has no image with instance labels")
    targets = []
    for record in records:
        panoptic = rgb2id(utils.read_image(record["pan_seg_file_name"], format="RGB"))
        targets.append(generator(panoptic, record["segments_info"]))
    return targets


def stack(batch: List[Dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    return torch.stack([targets[key] for targets in batch])


def class_weights(sq_norms: torch.Tensor, active: torch.Tensor) -> Dict[str, List[float]]:
    """Weights at absolute and relative lambda = 1 over the ``active`` classes."""
    return {
        mode: qp_class_weights(sq_norms.double(), lam=1.0, lam_mode=mode, active=active).tolist()
        for mode in ("absolute", "relative")
    }


def measure_batch(batch: List[Dict[str, torch.Tensor]], num_classes: int, thing_ids: List[int]) -> Dict:
    labels = stack(batch, "sem_seg")
    center, center_weights = stack(batch, "center"), stack(batch, "center_weights")
    offset, offset_weights = stack(batch, "offset"), stack(batch, "offset_weights")
    owner = stack(batch, "center_class")
    instance_class = torch.where(owner == IGNORE, labels, owner)
    things = torch.zeros(num_classes, dtype=torch.bool)
    things[thing_ids] = True
    labelled = labels != IGNORE
    stuff = labelled & ~things[torch.where(labelled, labels, 0)]
    mass = center[:, 0] * center_weights
    total = float(mass.sum())

    untrained = torch.zeros_like(center)
    center_norms = {
        grouping: regression_grad_sq_norms(untrained, center, class_map, center_weights, num_classes, "mse")
        for grouping, class_map in (("semantic", labels), ("instance", instance_class))
    }
    all_classes = torch.ones(num_classes, dtype=torch.bool)

    generator = torch.Generator().manual_seed(0)
    offset_norms = [
        regression_grad_sq_norms(
            offset + 5.0 * torch.randn(offset.shape, generator=generator), offset, labels, offset_weights,
            num_classes, "l1",
        )
        for _ in range(2)
    ]
    covered = (offset_weights != 0) & labelled
    counts = torch.bincount(labels[covered], minlength=num_classes)[:num_classes].double()
    sums = torch.zeros(num_classes, dtype=torch.float64).index_add_(
        0, labels[covered], offset_weights[covered].double().square()
    )
    from_counts = 2.0 * sums / (counts + 1.0) ** 2
    return {
        "center_mass_on_stuff": float((mass * stuff).sum()) / total if total else 0.0,
        "center_mass_on_road": float((mass * (labels == 0)).sum()) / total if total else 0.0,
        "center_sq_norms": {k: v.tolist() for k, v in center_norms.items()},
        "center_weights": {k: class_weights(v, all_classes) for k, v in center_norms.items()},
        "offset_pixels": counts.tolist(),
        "offset_sq_norms": offset_norms[0].tolist(),
        "offset_norms_prediction_dependence": float((offset_norms[0] - offset_norms[1]).abs().max()),
        "offset_norms_vs_counts_max_relative_error": float(
            ((offset_norms[0].double() - from_counts).abs() / from_counts.clamp(min=1e-30))[things].max()
        ),
        "offset_weights": class_weights(offset_norms[0], things),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config-file", default=str(REPO_ROOT / "configs" / "synthetic" / "dacs_gbw.yaml"),
        help="config giving the target recipe and the dataset (default: configs/synthetic/dacs_gbw.yaml)",
    )
    parser.add_argument("--datasets", default=None, help="prepared $DETECTRON2_DATASETS root (default: generate one)")
    parser.add_argument("--images", type=int, default=16, help="source images (default: 16)")
    parser.add_argument("--batch", type=int, default=2, help="images per batch (default: 2, the configs')")
    parser.add_argument("--out", default="output/bench/gbw_instance_losses.json", help="JSON report path")
    args = parser.parse_args()

    cfg = get_cfg()
    add_gbw_panoptic_config(cfg)
    cfg.merge_from_file(args.config_file)
    dataset_name = cfg.DATASETS.TRAIN[0]
    with tempfile.TemporaryDirectory(prefix="gbw_instance_losses_") as scratch:
        prepare_datasets(args.datasets, Path(scratch), args.images)
        targets = load_targets(cfg, dataset_name, args.images)
    meta = MetadataCatalog.get(dataset_name)
    class_names = list(meta.stuff_classes)
    thing_ids = sorted(meta.thing_dataset_id_to_contiguous_id.values())
    num_classes = len(class_names)
    batches = [targets[i : i + args.batch] for i in range(0, len(targets) - args.batch + 1, args.batch)]
    results = [measure_batch(batch, num_classes, thing_ids) for batch in batches]

    def spread(values: List[float]) -> str:
        return f"{statistics.median(values):.3g} (min {min(values):.3g}, max {max(values):.3g})"

    def deviation(key: str, grouping: Optional[str], mode: str, classes: List[int]) -> List[float]:
        entries = [r[key][grouping] if grouping else r[key] for r in results]
        return [max(abs(e[mode][c] - 1.0) for c in classes) for e in entries]

    everything = list(range(num_classes))
    summary = [
        ["center target on stuff pixels (share of sum of heatmap x weight)", spread([r["center_mass_on_stuff"] for r in results])],
        ["center target on road pixels", spread([r["center_mass_on_road"] for r in results])],
        ["center, semantic grouping: max |w - 1|, absolute lambda 1", spread(deviation("center_weights", "semantic", "absolute", everything))],
        ["center, instance grouping: max |w - 1|, absolute lambda 1", spread(deviation("center_weights", "instance", "absolute", everything))],
        ["offset: |g^2(prediction 1) - g^2(prediction 2)|, max over classes", spread([r["offset_norms_prediction_dependence"] for r in results])],
        ["offset: g^2 vs 2 sum q^2 / (N_c + 1)^2, max relative error", spread([r["offset_norms_vs_counts_max_relative_error"] for r in results])],
        ["offset: max |w - 1|, absolute lambda 1", spread(deviation("offset_weights", None, "absolute", thing_ids))],
    ]
    print(f"{len(targets)} images of {dataset_name} in {len(batches)} batches of {args.batch}, sigma {cfg.INPUT.GAUSSIAN_SIGMA}")
    print(tabulate(summary, headers=["quantity", "median over batches"], tablefmt="github"))

    per_class = []
    for c, name in enumerate(class_names):
        semantic = [r["center_weights"]["semantic"]["relative"][c] for r in results]
        instance = [r["center_weights"]["instance"]["relative"][c] for r in results]
        row = [name, f"{statistics.mean(semantic):.3f}", f"{statistics.mean(instance):.3f}"]
        if c in thing_ids:
            pixels = [r["offset_pixels"][c] for r in results]
            offset = [r["offset_weights"]["relative"][c] for r in results]
            row += [f"{statistics.mean(pixels):.0f}", f"{statistics.mean(offset):.3f}"]
        else:
            row += ["", ""]
        per_class.append(row)
    print(tabulate(
        per_class,
        headers=["class", "center w, semantic (rel. 1)", "center w, instance (rel. 1)", "offset N_c", "offset w (rel. 1)"],
        tablefmt="github",
    ))

    report = {
        "config_file": args.config_file,
        "dataset": dataset_name,
        "images": len(targets),
        "batch": args.batch,
        "class_names": class_names,
        "thing_ids": thing_ids,
        "summary": {quantity: value for quantity, value in summary},
        "batches": results,
    }
    print(f"wrote {write_report(args.out, report)}")


if __name__ == "__main__":
    main()
