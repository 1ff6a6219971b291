#!/usr/bin/env python
"""Plot GBW class weights against lambda, absolute and relative.

Builds one Cityscapes-like batch (logits of a half-trained model, labels drawn from the synthetic
long-tailed class distribution of ``tools/bench_gbw.py``, which is shaped after Cityscapes but is
not its published statistics), computes the squared gradient norms g_c^2 once, and sweeps lambda:

- absolute: ``lam`` as given; the reference value is 1.0;
- relative: ``lam * mean_c g_c^2``, independent of image size and batch size.

Left panel: weights vs absolute lambda; right: vs relative lambda. Also prints g^2 and the weights
at lambda = 1 in both modes for one scene at the resolutions given with ``--sizes``, to show the
scale issue, and writes them to a JSON next to the PNG.

Example:
    python tools/plot_gbw_lambda.py --out docs/gbw_weights_vs_lambda.png
"""
import argparse
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench_gbw import CITYSCAPES_CLASS_NAMES, CITYSCAPES_LIKE_FREQUENCIES, cityscapes_like_batch  # noqa: E402
from gbw_panoptic.gbw import ce_grad_sq_norms, qp_class_weights  # noqa: E402
from gbw_panoptic.utils.io import atomic_write, write_json  # noqa: E402

# Cityscapes colour palette (RGB) of the 19 train ids.
CITYSCAPES_COLORS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)


def sweep(sq_norms: torch.Tensor, lambdas: np.ndarray, lam_mode: str, desc: str) -> np.ndarray:
    """Weights [len(lambdas), C] for each lambda."""
    return np.stack(
        [qp_class_weights(sq_norms, lam=float(lam), lam_mode=lam_mode).numpy() for lam in tqdm(lambdas, desc=desc)]
    )


def plot(
    absolute_lambdas: np.ndarray,
    absolute_weights: np.ndarray,
    relative_lambdas: np.ndarray,
    relative_weights: np.ndarray,
    title: str,
    out: Path,
) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    panels = (
        (axes[0], absolute_lambdas, absolute_weights, "absolute $\\lambda$", 1.0, "reference $\\lambda$ = 1"),
        (axes[1], relative_lambdas, relative_weights, "relative $\\lambda$ (units of mean$_c\\,g_c^2$)", None, None),
    )
    for axis, lambdas, weights, xlabel, mark, mark_label in panels:
        for c, name in enumerate(CITYSCAPES_CLASS_NAMES):
            color = np.array(CITYSCAPES_COLORS[c]) / 255.0
            axis.plot(lambdas, weights[:, c], color=color, label=name, linewidth=1.6)
        if mark is not None:
            axis.axvline(mark, color="black", linestyle="--", linewidth=1.0, label=mark_label)
        axis.axhline(1.0, color="grey", linestyle=":", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("class weight $w_c$ (mean 1)")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        figure.savefig(f, format="png", dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"), help="plotted crop (default 512 512)")
    parser.add_argument("--batch", type=int, default=2, help="images per batch (default 2)")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[256, 512, 1024],
        help="square sizes of one scene for the printed scale comparison (default 256 512 1024)",
    )
    parser.add_argument("--mode", choices=["channel", "class"], default="channel", help="gradient norm mode")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the batch")
    parser.add_argument("--out", default="docs/gbw_weights_vs_lambda.png", help="output PNG path")
    args = parser.parse_args()

    height, width = args.size
    logits, labels = cityscapes_like_batch(args.batch, height, width, seed=args.seed)
    sq_norms = ce_grad_sq_norms(logits, labels, mode=args.mode).double()
    absolute_lambdas = np.logspace(-8, 2, 81)
    relative_lambdas = np.logspace(-2, 2, 41)
    absolute_weights = sweep(sq_norms, absolute_lambdas, "absolute", "absolute lambda")
    relative_weights = sweep(sq_norms, relative_lambdas, "relative", "relative lambda")
    title = (
        f"GBW weights vs $\\lambda$: {args.batch}x19x{height}x{width} logits, synthetic Cityscapes-like "
        f"class frequencies, g$^2$ in [{float(sq_norms.min()):.1e}, {float(sq_norms.max()):.1e}]"
    )
    out = Path(args.out)
    plot(absolute_lambdas, absolute_weights, relative_lambdas, relative_weights, title, out)
    print(f"wrote {out}")

    # The same scene at several resolutions (nearest upsampling of the smallest): same class
    # proportions, N_c x4 per doubling, so g^2 shrinks ~4x while the relative weights stay put.
    base = min(args.sizes)
    if any(size % base for size in args.sizes):
        parser.error(f"--sizes must be multiples of the smallest ({base}), got {args.sizes}")
    base_logits, base_labels = cityscapes_like_batch(args.batch, base, base, seed=args.seed)
    summary: Dict[str, Dict[str, List[float]]] = {}
    for size in sorted(args.sizes):
        factor = size // base
        size_logits = base_logits.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
        size_labels = base_labels.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
        size_sq_norms = ce_grad_sq_norms(size_logits, size_labels, mode=args.mode).double()
        summary[f"{size}x{size}"] = {
            "sq_norms": size_sq_norms.tolist(),
            "weights_absolute_lambda_1": qp_class_weights(size_sq_norms).tolist(),
            "weights_relative_lambda_1": qp_class_weights(size_sq_norms, lam_mode="relative").tolist(),
        }
    header = f"{'class':>14} {'freq':>7} " + " ".join(
        f"{key + ' g2':>14} {'abs w':>7} {'rel w':>7}" for key in summary
    )
    print(header)
    for c, name in enumerate(CITYSCAPES_CLASS_NAMES):
        cells = " ".join(
            f"{entry['sq_norms'][c]:>14.3e} {entry['weights_absolute_lambda_1'][c]:>7.4f} "
            f"{entry['weights_relative_lambda_1'][c]:>7.3f}"
            for entry in summary.values()
        )
        print(f"{name:>14} {CITYSCAPES_LIKE_FREQUENCIES[c]:>7.4f} {cells}")
    summary_path = out.with_suffix(".json")
    write_json(summary_path, {"class_names": CITYSCAPES_CLASS_NAMES, "sizes": summary}, indent=1)
    print(f"wrote {summary_path}")


if __name__ == "__main__":
    main()
