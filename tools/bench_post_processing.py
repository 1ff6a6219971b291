#!/usr/bin/env python
"""Benchmark of the model's Panoptic-DeepLab post-processing against Detectron2's.

Times the path users run: ``GBWPanopticSegmentor.postprocess`` calls :func:`panoptic_segmentation` once
per image (each image is resized to its own output size first), and Detectron2's
``get_panoptic_segmentation`` is run on the same images one after the other. Both run in the same
process on the same synthetic predictions (stuff bands, rectangular thing instances with Gaussian
center peaks and offsets pointing at them, plus noise), on the CPU and, when available, on CUDA. For
each size it checks that the panoptic maps are identical, prints a table (median, min and max over
the repeats, in ms per batch of images) and writes the numbers, the speed-up ratios (Detectron2 time /
ours) and the load averages before and after the run as JSON.

    python tools/bench_post_processing.py                       # 512x1024 and 1024x2048, 2 images
    python tools/bench_post_processing.py --sizes 1024x2048 --repeats 10 --device cuda
"""
import argparse
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
import gbw_panoptic  # noqa: F401  (before Detectron2: its warning filter covers fvcore's import-time scripting)
from detectron2.projects.panoptic_deeplab.post_processing import get_panoptic_segmentation
from tabulate import tabulate

from gbw_panoptic.modeling.post_processing import panoptic_segmentation
from gbw_panoptic.utils.io import write_json

THING_IDS = tuple(range(11, 19))
STUFF_BANDS = (10, 2, 8, 0, 1)  # sky, building, vegetation, road, sidewalk from top to bottom
LABEL_DIVISOR = 1000
SETTINGS = dict(label_divisor=LABEL_DIVISOR, stuff_area=2048, void_label=-1, threshold=0.1, nms_kernel=7, top_k=200)


def synthetic_predictions(
    batch: int, height: int, width: int, instances: int, seed: int, device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sem_seg B x H x W, center B x 1 x H x W, offsets B x 2 x H x W) resembling a trained model's."""
    generator = torch.Generator().manual_seed(seed)
    ys = torch.arange(height, dtype=torch.float32).view(-1, 1).expand(height, width)
    xs = torch.arange(width, dtype=torch.float32).view(1, -1).expand(height, width)
    sem_seg = torch.empty((batch, height, width), dtype=torch.long)
    center = torch.zeros((batch, 1, height, width))
    offsets = torch.randn((batch, 2, height, width), generator=generator)
    band = height // len(STUFF_BANDS)
    for image in range(batch):
        for index, class_id in enumerate(STUFF_BANDS):
            sem_seg[image, index * band :] = class_id
        for _ in range(instances):
            box_h = int(torch.randint(height // 40, height // 8, (1,), generator=generator))
            box_w = int(torch.randint(width // 80, width // 16, (1,), generator=generator))
            y0 = int(torch.randint(0, height - box_h, (1,), generator=generator))
            x0 = int(torch.randint(0, width - box_w, (1,), generator=generator))
            class_id = THING_IDS[int(torch.randint(0, len(THING_IDS), (1,), generator=generator))]
            cy, cx = y0 + box_h / 2, x0 + box_w / 2
            box = (slice(y0, y0 + box_h), slice(x0, x0 + box_w))
            sem_seg[image][box] = class_id
            offsets[image, 0][box] += cy - ys[box]
            offsets[image, 1][box] += cx - xs[box]
            peak = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * 8.0**2))
            center[image, 0] = torch.maximum(center[image, 0], peak)
    return sem_seg.to(device), center.to(device), offsets.to(device)


def detectron2_batch(sem_seg: torch.Tensor, center: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Detectron2's post-processing, one image after the other."""
    return torch.stack(
        [
            get_panoptic_segmentation(
                sem_seg[i : i + 1], center[i].clone(), offsets[i], thing_ids=set(THING_IDS), **SETTINGS
            )[0][0]
            for i in range(sem_seg.size(0))
        ]
    )


def ours_batch(sem_seg: torch.Tensor, center: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The model's post-processing, one image after the other as ``GBWPanopticSegmentor.postprocess``."""
    images = zip(sem_seg, center, offsets)
    return torch.stack([panoptic_segmentation(*image, THING_IDS, **SETTINGS) for image in images])


def time_ms(function: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> List[float]:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["512x1024", "1024x2048"], help="HxW of the predictions")
    parser.add_argument("--batch", type=int, default=2, help="images timed together (each post-processed alone)")
    parser.add_argument("--instances", type=int, default=30, help="thing instances per image")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method and size (after a warm-up)")
    parser.add_argument("--device", nargs="+", default=None, help="devices (default: cpu, and cuda if available)")
    parser.add_argument(
        "--out", "--output", default="output/bench/bench_post_processing.json",
        help="JSON report path (--output: its former name, still accepted)",
    )  # fmt: skip
    args = parser.parse_args()
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])

    load_before = os.getloadavg()
    rows, results = [], []
    for device_name in devices:
        device = torch.device(device_name)
        for size in args.sizes:
            height, width = (int(v) for v in size.split("x"))
            inputs = synthetic_predictions(args.batch, height, width, args.instances, seed=0, device=device)
            reference, ours = detectron2_batch(*inputs), ours_batch(*inputs)
            if not torch.equal(reference, ours):
                raise RuntimeError(f"results differ from Detectron2's at {size} on {device_name}")
            timings: Dict[str, List[float]] = {
                "detectron2": time_ms(lambda: detectron2_batch(*inputs), args.repeats, device),
                "ours": time_ms(lambda: ours_batch(*inputs), args.repeats, device),
            }
            medians = {name: statistics.median(values) for name, values in timings.items()}
            speedup = medians["detectron2"] / medians["ours"]
            for name, values in timings.items():
                rows.append([device_name, size, args.batch, name, medians[name], min(values), max(values),
                             medians["detectron2"] / medians[name]])  # fmt: skip
            results.append(
                {"device": device_name, "size": size, "batch": args.batch, "instances": args.instances,
                 "identical": True, "ms": timings, "median_ms": medians, "speedup_vs_detectron2": speedup}
            )  # fmt: skip
    headers = ["device", "HxW", "batch", "method", "median ms", "min ms", "max ms", "speed-up"]
    print(tabulate(rows, headers=headers, floatfmt=".1f"))
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }
    load = {"before": load_before, "after": os.getloadavg()}
    print(f"load averages (1, 5, 15 min): before {load_before}, after {load['after']}")
    write_json(args.out, {"machine": machine, "load_averages": load, "repeats": args.repeats, "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
