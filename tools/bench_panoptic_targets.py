#!/usr/bin/env python
"""Benchmark gbw_panoptic's Panoptic-DeepLab target generator against Detectron2's.

Generates Cityscapes-like panoptic id maps (stuff bands, 10-60 thing instances of random size,
a crowd region and VOID), runs ``detectron2.projects.panoptic_deeplab.PanopticDeepLabTargetGenerator``
(the reference) and ``gbw_panoptic.data.PanopticTargetGenerator`` on each, checks that every
target is identical (after the documented layout differences), prints a table of the mean time per
image and the speed-up, and writes a JSON report. The tests compare the two generators with
:func:`from_detectron2_layout` from here too.

Example:
    python tools/bench_panoptic_targets.py --num-images 10 --height 1024 --width 2048 \\
        --out output/bench/bench_panoptic_targets.json
"""
import argparse
import os
import platform
import time
from typing import Any, Dict, List, Tuple

import cv2
import numpy as np
import torch
from tabulate import tabulate
from tqdm import tqdm

import gbw_panoptic  # noqa: F401  (before Detectron2: its warning filter covers fvcore's import-time scripting)
from detectron2.projects.panoptic_deeplab.target_generator import PanopticDeepLabTargetGenerator
from gbw_panoptic.data import PanopticTargetGenerator
from gbw_panoptic.utils.io import write_json

# (Cityscapes label id, train id) of the stuff and thing classes.
STUFF = [(7, 0), (8, 1), (11, 2), (21, 8), (23, 10)]
THINGS = [(24, 11), (25, 12), (26, 13), (27, 14), (28, 15), (31, 16), (32, 17), (33, 18)]


def generate_scene(rng: np.random.Generator, height: int, width: int) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """A panoptic id map (int32 HxW) and its segments_info (contiguous category ids)."""
    panoptic = np.zeros((height, width), dtype=np.int32)
    segments = []
    borders = np.linspace(0, height, len(STUFF) + 1).astype(int)
    for (label_id, train_id), top, bottom in zip(STUFF, borders[:-1], borders[1:]):
        panoptic[top:bottom] = label_id
        segments.append({"id": label_id, "category_id": train_id, "iscrowd": 0})
    for index in range(int(rng.integers(10, 61))):
        label_id, train_id = THINGS[int(rng.integers(len(THINGS)))]
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(3, width // 12)), int(rng.integers(3, height // 8)))
        segment_id = label_id * 1000 + index
        cv2.ellipse(panoptic, center, axes, 0, 0, 360, segment_id, -1)
        segments.append({"id": segment_id, "category_id": train_id, "iscrowd": 0})
    label_id, train_id = THINGS[2]
    panoptic[height - height // 10 :, : width // 5] = label_id  # crowd of cars
    segments.append({"id": label_id, "category_id": train_id, "iscrowd": 1})
    panoptic[: height // 20] = 0  # VOID
    return panoptic, segments


def from_detectron2_layout(targets: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Detectron2 ``PanopticDeepLabTargetGenerator`` output in :class:`PanopticTargetGenerator`'s layout.

    Args:
        targets: the reference generator's dict (``center`` ``HxW``, weights ``1xHxW``).

    Returns:
        the same values with the keys and shapes of :meth:`PanopticTargetGenerator.__call__`.
    """
    return {
        "sem_seg": targets["sem_seg"],
        "sem_seg_weights": targets["sem_seg_weights"],
        "center": targets["center"][None],
        "center_weights": targets["center_weights"][0],
        "offset": targets["offset"],
        "offset_weights": targets["offset_weights"][0],
    }


def same_targets(ours: Dict[str, torch.Tensor], reference: Dict[str, Any]) -> bool:
    """Equality after undoing the layout differences documented in gbw_panoptic.data.panoptic_target."""
    return all(torch.equal(ours[key], value) for key, value in from_detectron2_layout(reference).items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=10, help="generated scenes (default: %(default)s)")
    parser.add_argument("--height", type=int, default=1024, help="scene height in pixels (default: %(default)s)")
    parser.add_argument("--width", type=int, default=2048, help="scene width in pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="scene generator seed (default: %(default)s)")
    parser.add_argument(
        "--out", "--output", default="output/bench/bench_panoptic_targets.json",
        help="JSON report path (--output: its former name, still accepted)",
    )  # fmt: skip
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    options = {"ignore_label": 255, "thing_ids": [train_id for _, train_id in THINGS], "ignore_stuff_in_offset": True}
    generators = {
        "detectron2 PanopticDeepLabTargetGenerator": PanopticDeepLabTargetGenerator(**options),
        "gbw_panoptic PanopticTargetGenerator": PanopticTargetGenerator(**options),
    }
    seconds = {name: 0.0 for name in generators}
    instances = 0
    for _ in tqdm(range(args.num_images), desc="scenes"):
        panoptic, segments = generate_scene(rng, args.height, args.width)
        instances += len(segments) - len(STUFF) - 1
        outputs = {}
        for name, generator in generators.items():
            start = time.perf_counter()
            outputs[name] = generator(panoptic, segments)
            seconds[name] += time.perf_counter() - start
        reference, ours = outputs.values()
        if not same_targets(ours, reference):
            raise SystemExit("Targets differ from Detectron2's generator; the benchmark is void")

    reference_ms = 1000 * seconds[next(iter(generators))] / args.num_images
    rows = []
    for name, total in seconds.items():
        ms = 1000 * total / args.num_images
        rows.append({"generator": name, "ms_per_image": ms, "speedup_vs_detectron2": reference_ms / ms})
    print(f"{args.num_images} scenes of {args.height}x{args.width}, {instances / args.num_images:.1f} "
          f"thing segments on average; all targets identical to Detectron2's")
    print(tabulate([list(r.values()) for r in rows], headers=list(rows[0]), floatfmt=".2f", tablefmt="github"))
    report = {
        "num_images": args.num_images,
        "height": args.height,
        "width": args.width,
        "mean_thing_segments": instances / args.num_images,
        "identical": True,
        "results": rows,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
