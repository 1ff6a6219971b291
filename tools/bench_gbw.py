#!/usr/bin/env python
"""Benchmark the GBW class weights: the reference path against gbw_panoptic.gbw.

For logits of each requested size (default 2x19x512x512 and 2x19x1024x1024, float32; bfloat16 too
on CUDA) and Cityscapes-like long-tailed labels, times in one run and on one device:

1. ``reference weights``: the authors' recipe: a second autograd backward of the per-class mean
   losses on detached logits, per-class channel norms, copy to the host, ``cvxopt`` QP (their
   solver settings: 20 iterations, tolerances 1e-4);
2. ``gbw weights``: :func:`ce_grad_sq_norms` (analytic) + :func:`qp_class_weights` (projection):
   the forward that :class:`GBWCrossEntropyLoss` runs in training (one log-softmax, the scaled
   residual, its channel norms), here without an autograd graph;
3. ``plain CE fwd+bwd``: a pixel-weighted cross-entropy (Detectron2's ``DeepLabCE``), forward and
   backward, the cost that GBW adds to;
4. ``GBW CE fwd+bwd``: :class:`GBWCrossEntropyLoss`, forward and backward;
5. ``reference GBW CE fwd+bwd``: reference weights then the weighted cross-entropy.

The paths run round-robin (one repeat of each in turn) so that load from other processes hits
all of them alike; the table gives median, min and max wall-clock time over the repeats and the
median CPU time of this process (steadier on a shared machine), and the ratios of the medians
``reference / gbw`` (weights) and ``GBW CE / plain CE`` (loss overhead) in both.

Example:
    python tools/bench_gbw.py --device cpu --repeats 20 --out output/bench/bench_gbw.json
"""
import argparse
import os
import statistics
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from tabulate import tabulate
from tqdm import tqdm

from gbw_panoptic.gbw import GBWCrossEntropyLoss, ce_grad_sq_norms, qp_class_weights

from _common import machine_info, time_round_robin, write_report

IGNORE = 255
# A Cityscapes-like long-tailed class distribution over the 19 train ids (fraction of labelled
# pixels). Synthetic: shaped after Cityscapes (road, building, vegetation dominate; rider,
# motorcycle, train, bus, truck are rare) and rounded, not the published statistics.
CITYSCAPES_LIKE_FREQUENCIES = (
    0.33, 0.055, 0.20, 0.0065, 0.008, 0.011, 0.0019, 0.005, 0.14, 0.0095,
    0.035, 0.011, 0.0012, 0.062, 0.0024, 0.0021, 0.0021, 0.0009, 0.0037,
)
CITYSCAPES_CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)


def cityscapes_like_batch(
    batch: int, height: int, width: int, seed: int = 0, device: str = "cpu", block: int = 16
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, 19, H, W] of a half-trained model and labels [B, H, W] with the class
    frequencies above: one class per ``block``x``block`` cell, the bottom 6% of rows ignored
    (ego vehicle); logits = N(0, 1) noise + 3 on the true class."""
    generator = torch.Generator().manual_seed(seed)
    probabilities = torch.tensor(CITYSCAPES_LIKE_FREQUENCIES, dtype=torch.float64)
    cells = torch.multinomial(
        probabilities, batch * (-(-height // block)) * (-(-width // block)), replacement=True, generator=generator
    ).view(batch, -(-height // block), -(-width // block))
    labels = cells.repeat_interleave(block, dim=1).repeat_interleave(block, dim=2)[:, :height, :width].contiguous()
    labels[:, int(0.94 * height) :, :] = IGNORE
    logits = torch.randn(batch, len(probabilities), height, width, generator=generator)
    logits.scatter_add_(1, torch.where(labels == IGNORE, 0, labels).unsqueeze(1), torch.full((batch, 1, height, width), 3.0))
    return logits.to(device), labels.to(device)


def reference_class_weights(logits: torch.Tensor, labels: torch.Tensor, lam: float) -> torch.Tensor:
    """The reference recipe: autograd gradient of sum_c L_c on detached logits, channel norms,
    host copy, cvxopt with the authors' settings."""
    detached = logits.detach().float().requires_grad_()
    num_classes = detached.shape[1]
    pixel_losses = F.cross_entropy(detached, labels, ignore_index=IGNORE, reduction="none")
    valid = labels != IGNORE
    safe = torch.where(valid, labels, 0).flatten()
    sums = torch.zeros(num_classes, device=logits.device).scatter_add_(0, safe, pixel_losses.flatten())
    counts = torch.zeros(num_classes, device=logits.device).scatter_add_(0, safe, valid.flatten().float())
    (grad,) = torch.autograd.grad((sums / (counts + 1)).sum(), detached)
    sq_norms = grad.square().sum(dim=(0, 2, 3)).cpu()
    return qp_class_weights(sq_norms, lam=lam, solver="cvxopt").to(logits.device)


def gbw_class_weights(logits: torch.Tensor, labels: torch.Tensor, lam: float) -> torch.Tensor:
    return qp_class_weights(ce_grad_sq_norms(logits, labels), lam=lam)


def plain_ce_step(logits: torch.Tensor, labels: torch.Tensor, pixel_weights: torch.Tensor) -> None:
    """DeepLabCE (top-k 1.0) with pixel weights, forward and backward."""
    loss = (F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none") * pixel_weights).mean()
    loss.backward()


def benchmark_case(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device, lam: float, repeats: int, warmup: int, progress: tqdm
) -> Dict[str, object]:
    batch, num_classes, height, width = shape
    if num_classes != len(CITYSCAPES_LIKE_FREQUENCIES):
        raise ValueError(f"logit shapes need {len(CITYSCAPES_LIKE_FREQUENCIES)} classes, got {num_classes}")
    logits, labels = cityscapes_like_batch(batch, height, width, device=str(device))
    logits = logits.to(dtype).requires_grad_()
    pixel_weights = torch.ones(batch, height, width, device=device)
    gbw_loss = GBWCrossEntropyLoss(num_classes, ignore_index=IGNORE, lam=lam)

    def reference_loss_step() -> None:
        weights = reference_class_weights(logits, labels, lam)
        loss = (F.cross_entropy(logits.float(), labels, weight=weights, ignore_index=IGNORE, reduction="none") * pixel_weights).mean()
        loss.backward()

    paths = {
        "reference weights": lambda: reference_class_weights(logits, labels, lam),
        "gbw weights": lambda: gbw_class_weights(logits, labels, lam),
        "plain CE fwd+bwd": lambda: plain_ce_step(logits.float(), labels, pixel_weights),
        "GBW CE fwd+bwd": lambda: gbw_loss(logits, labels, pixel_weights).backward(),
        "reference GBW CE fwd+bwd": reference_loss_step,
    }
    # The two weight paths must agree (up to cvxopt's reference tolerance).
    difference = (reference_class_weights(logits, labels, lam) - gbw_class_weights(logits, labels, lam)).abs().max()
    times, cpu_times = time_round_robin(paths, repeats, warmup, device, progress)
    stats = {
        name: {
            "median_ms": 1e3 * statistics.median(t),
            "min_ms": 1e3 * min(t),
            "max_ms": 1e3 * max(t),
            "median_cpu_ms": 1e3 * statistics.median(cpu_times[name]),
        }
        for name, t in times.items()
    }
    median = {name: s["median_ms"] for name, s in stats.items()}
    median_cpu = {name: s["median_cpu_ms"] for name, s in stats.items()}
    return {
        "shape": list(shape),
        "dtype": str(dtype).replace("torch.", ""),
        "repeats": repeats,
        "max_weight_difference_reference_vs_gbw": float(difference),
        "timings": stats,
        "ratios": {
            "reference_weights_over_gbw_weights": median["reference weights"] / median["gbw weights"],
            "gbw_ce_over_plain_ce": median["GBW CE fwd+bwd"] / median["plain CE fwd+bwd"],
            "reference_gbw_ce_over_plain_ce": median["reference GBW CE fwd+bwd"] / median["plain CE fwd+bwd"],
        },
        "cpu_time_ratios": {
            "reference_weights_over_gbw_weights": median_cpu["reference weights"] / median_cpu["gbw weights"],
            "gbw_ce_over_plain_ce": median_cpu["GBW CE fwd+bwd"] / median_cpu["plain CE fwd+bwd"],
            "reference_gbw_ce_over_plain_ce": median_cpu["reference GBW CE fwd+bwd"] / median_cpu["plain CE fwd+bwd"],
        },
    }


def _parse_shape(text: str) -> Tuple[int, int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected a shape BxCxHxW such as 2x19x512x512, got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument(
        "--shapes", nargs="+", type=_parse_shape, default=[(2, 19, 512, 512), (2, 19, 1024, 1024)],
        help="logit shapes BxCxHxW (C must be 19; default: 2x19x512x512 2x19x1024x1024)",
    )
    parser.add_argument(
        "--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"], default=None,
        help="logit dtypes (default: float32, plus bfloat16 on CUDA)",
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per path (default: 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repeats first (default: 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--lam", type=float, default=1.0, help="GBW lambda, absolute (default: 1.0, the reference)")
    parser.add_argument("--out", default="output/bench/bench_gbw.json", help="JSON report path")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    dtype_names = args.dtypes or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    cases = [(shape, getattr(torch, name)) for shape in args.shapes for name in dtype_names]

    load_before = os.getloadavg()
    with tqdm(total=len(cases) * args.repeats, desc="bench_gbw", unit="repeat") as progress:
        results = [benchmark_case(s, d, device, args.lam, args.repeats, args.warmup, progress) for s, d in cases]
    load_after = os.getloadavg()

    rows = []
    for result in results:
        label = f"{'x'.join(map(str, result['shape']))} {result['dtype']}"
        for name, stat in result["timings"].items():
            rows.append([
                label, name, f"{stat['median_ms']:.1f}", f"{stat['min_ms']:.1f}", f"{stat['max_ms']:.1f}",
                f"{stat['median_cpu_ms']:.1f}",
            ])
        ratios, cpu_ratios = result["ratios"], result["cpu_time_ratios"]
        for name, key, digits in (
            ("ratio reference / gbw weights", "reference_weights_over_gbw_weights", 1),
            ("ratio GBW CE / plain CE", "gbw_ce_over_plain_ce", 2),
            ("ratio reference GBW CE / plain CE", "reference_gbw_ce_over_plain_ce", 2),
        ):
            rows.append([label, name, f"{ratios[key]:.{digits}f}x", "", "", f"{cpu_ratios[key]:.{digits}f}x"])
    machine = machine_info(device, load_before, load_after)
    print(f"device {device} ({machine['device']}), {machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads")
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")
    print(tabulate(rows, headers=["logits", "path", "median ms", "min ms", "max ms", "median CPU ms"], tablefmt="github"))

    out = write_report(args.out, {"machine": machine, "lam": args.lam, "results": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
