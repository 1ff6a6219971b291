#!/usr/bin/env python
"""Check on CUDA that GBW adds no host synchronisation to a training step.

Builds the model of a config twice, with GBW off and with GBW on for the losses the config enables,
and counts the synchronising CUDA operations (``torch.cuda.set_sync_debug_mode("warn")``) of one
training forward and backward on the same random batch, with the class weights taken as a UDA method
takes them after each pass (``gbw_weights``; the trainer reads them back only when it writes the
metrics, every ``UDA.LOG_PERIOD`` iterations). The check passes when GBW on synchronises no more often
than GBW off; it prints where each extra synchronisation happens and writes the counts as JSON.

    python tools/check_gbw_sync.py --config-file configs/synthia2cityscapes/mit_b5_gbw.yaml \\
        --out output/check_cuda/gbw_sync.json MODEL.MIT.PRETRAINED ""

Exit status: 0 pass, 1 GBW adds synchronisations, 2 no CUDA device.
"""
import argparse
import collections
import os
import sys
import warnings
from typing import Dict, List, Tuple

import torch

import gbw_panoptic  # noqa: F401  (before Detectron2: its warning filter covers fvcore's import-time scripting)
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import gbw_panoptic.modeling  # noqa: F401  (registers the meta-architecture)
from gbw_panoptic.config import add_gbw_panoptic_config
from gbw_panoptic.uda.method import gbw_weights
from gbw_panoptic.utils.io import write_json

SYNC_MESSAGE = "called a synchronizing CUDA operation"
GBW_LOSSES = ("SEM_SEG", "CENTER", "OFFSET")


def random_batch(num_images: int, height: int, width: int, num_classes: int, device: str) -> List[Dict]:
    """Training dicts of random images and targets: labels in 32x32 blocks of random classes (void
    included), center heatmaps in [0, 1], offsets of up to 64 pixels, unit weights."""
    generator = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(num_images):
        blocks = torch.randint(0, num_classes + 1, (height // 32 + 1, width // 32 + 1), generator=generator)
        labels = blocks.repeat_interleave(32, 0).repeat_interleave(32, 1)[:height, :width]
        labels[labels == num_classes] = 255
        record = {
            "image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator),
            "sem_seg": labels,
            "sem_seg_weights": torch.ones(height, width),
            "center": torch.rand(1, height, width, generator=generator),
            "center_weights": torch.ones(height, width),
            "offset": (torch.rand(2, height, width, generator=generator) - 0.5) * 128,
            "offset_weights": torch.ones(height, width),
            "height": height,
            "width": width,
        }
        batch.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in record.items()})
    return batch


def count_syncs(model: torch.nn.Module, batch: List[Dict], amp: bool) -> Tuple[int, collections.Counter]:
    """Synchronising operations of one forward and backward of ``model``'s training losses and of taking
    the class weights of its GBW losses."""
    for _ in range(2):  # the first step initialises caches (cuDNN, allocator); not counted
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.autocast("cuda", enabled=amp):
                    losses = model(batch)
                gbw_weights(model, "source")
                sum(losses.values()).backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    places = collections.Counter(
        f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught if SYNC_MESSAGE in str(w.message)
    )
    return sum(places.values()), places


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="a *_gbw.yaml config")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"), help="crop size")
    parser.add_argument("--batch", type=int, default=2, help="images per batch")
    parser.add_argument("--no-amp", action="store_true", help="float32 instead of autocast")
    parser.add_argument("--out", default="output/check_cuda/gbw_sync.json", help="JSON report path")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("check_gbw_sync: no CUDA device; this check needs a GPU", file=sys.stderr)
        return 2

    results = {}
    for gbw_on in (False, True):
        cfg = get_cfg()
        add_gbw_panoptic_config(cfg)
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
        enabled = [name for name in GBW_LOSSES if cfg.MODEL.GBW[name].ENABLED]
        for name in GBW_LOSSES:
            cfg.MODEL.GBW[name].ENABLED = gbw_on and name in enabled
        cfg.MODEL.DEVICE = "cuda"
        model = build_model(cfg).train()
        batch = random_batch(args.batch, *args.size, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, "cuda")
        count, places = count_syncs(model, batch, amp=not args.no_amp)
        results["gbw_on" if gbw_on else "gbw_off"] = {"syncs": count, "places": dict(places), "losses": enabled}
        del model
        torch.cuda.empty_cache()

    extra = results["gbw_on"]["syncs"] - results["gbw_off"]["syncs"]
    added = collections.Counter(results["gbw_on"]["places"]) - collections.Counter(results["gbw_off"]["places"])
    print(f"synchronisations per training step: GBW off {results['gbw_off']['syncs']}, GBW on {results['gbw_on']['syncs']}")
    for place, times in sorted(added.items()):
        print(f"  added by GBW: {place} ({times}x)")
    report = {"config": args.config_file, "size": args.size, "batch": args.batch, "amp": not args.no_amp, **results}
    report["passed"] = extra <= 0
    write_json(args.out, report)
    print(f"{'PASS' if report['passed'] else 'FAIL'}: GBW adds {max(extra, 0)} synchronisations; report {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
