#!/usr/bin/env python
"""Measure how far GBW's class weights move from 1 with the paper configs' λ, at their real crop sizes.

GBW's squared gradient norms g_c² scale like 1/N_c (N_c: labelled pixels of class c in the loss
call), so the absolute λ = 1 of the released code means something different at every crop size and
batch size. For each given config this tool builds the model and the source training loader of the
config (its crop size, batch, mapper), takes ``--batches`` source batches and runs the model's
training forward on each, whose GBW losses solve their class weights (``last_weights``), once with
λ as the config sets it (absolute λ = 1 in the paper configs) and once with relative λ = 1; it
reports max_c |w_c − 1| over the batches and the classes that share the loss's simplex (the thing
classes for the offsets) for every GBW loss of the model (semantic, center, offset; HRDA's fused and
detail losses).

The images are the synthetic benchmark generated at ``--height`` × ``--width`` (default 512 × 1024),
resized by the config's mapper to its training size and cropped as in training. The model starts
from random weights (no download): its near-uniform softmax gives larger residuals, hence larger g²
and weights further from 1, than a trained model's; the spreads measured bound a trained model's at
the same λ from above. Only source batches are measured: the mixed batches of DACS have the same
crop size, so the same scale of N_c.

Example (writes docs/results/lambda_scale/{report.md,results.json}):
    python tools/measure_gbw_lambda_scale.py --out docs/results/lambda_scale
"""
import argparse
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import gbw_panoptic  # noqa: F401  (before Detectron2: its warning filter covers fvcore's import-time scripting)
from detectron2.modeling import build_model

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = (
    "configs/synthia2cityscapes/mit_b5_gbw.yaml",
    "configs/gta2cityscapes/semantic_mit_b5_gbw.yaml",
    "configs/gta2cityscapes/semantic_hrda_mit_b5_gbw.yaml",
)


def prepare_images(datasets_root: Path, height: int, width: int) -> None:
    """A small synthetic benchmark (8 source images) at ``height`` × ``width`` (idempotent)."""
    command = [
        sys.executable, str(REPO_ROOT / "datasets" / "prepare_synthetic.py"), str(datasets_root / "synthetic"),
        "--num-source", "8", "--num-source-val", "1", "--num-target-train", "1", "--num-target-val", "1",
        "--height", str(height), "--width", str(width),
    ]
    subprocess.run(command, check=True, env=dict(os.environ, DETECTRON2_DATASETS=str(datasets_root)),
                   stdout=subprocess.DEVNULL)


def measure(config: str, batches: int, device: str) -> Dict:
    """Per GBW loss of ``config``'s model and per λ setting: max |w − 1| over classes and ``batches``
    source batches, and the weights of the last batch."""
    from gbw_panoptic.data import build_source_train_loader
    from gbw_panoptic.uda.cli import build_parser, load_config

    opts = [
        "MODEL.DEVICE", device, "MODEL.MIT.PRETRAINED", "", "MODEL.WEIGHTS", "", "SEED", "0",
        "DATASETS.TRAIN", "('synthetic_source_panoptic_train',)", "DATASETS.TARGET_TRAIN", "()",
        "DATASETS.TEST", "('synthetic_target_panoptic_val',)", "DATALOADER.NUM_WORKERS", "0",
        "UDA.METHOD", "source_only",
    ]
    cfg = load_config(build_parser().parse_args(["--config-file", str(REPO_ROOT / config), *opts]))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    losses = {name: module for name, module in model.gbw_losses().items() if module.enabled}
    if not losses:
        raise ValueError(f"{config}: no GBW loss is enabled (MODEL.GBW.*.ENABLED)")
    configured = {name: (module.lam, module.lam_mode) for name, module in losses.items()}
    settings = {"as configured": None, "relative λ = 1": (1.0, "relative")}
    deviation = {setting: {name: 0.0 for name in losses} for setting in settings}
    last: Dict[str, Dict[str, List[float]]] = {setting: {} for setting in settings}
    loader = iter(build_source_train_loader(cfg, seed=0))
    for batch in itertools.islice(loader, batches):
        for setting, override in settings.items():
            for name, module in losses.items():
                module.lam, module.lam_mode = override or configured[name]
            with torch.no_grad():
                model(batch)
            for name, module in losses.items():
                # Classes outside the loss's simplex (e.g. stuff classes of the offset loss) have weight 0
                # by construction: only the classes that share the simplex count.
                weights = module.last_weights.cpu()
                shared = weights[module.fixed_active.cpu()]
                deviation[setting][name] = max(deviation[setting][name], float((shared - 1).abs().max()))
                last[setting][name] = [round(w, 6) for w in weights.tolist()]
    return {
        "config": config,
        "crop": list(cfg.INPUT.CROP.SIZE),
        "source_batch": cfg.SOLVER.IMS_PER_BATCH,
        "configured_lambda": {name: {"lambda": lam, "mode": mode} for name, (lam, mode) in configured.items()},
        "max_abs_deviation": deviation,
        "last_weights": last,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    from gbw_panoptic.utils.io import atomic_write, write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                        help="GBW configs, relative to the repository (default: the paper's MiT-B5 GBW configs)")
    parser.add_argument("--out", type=Path, required=True, help="folder of report.md and results.json")
    parser.add_argument("--datasets-root", type=Path, default=Path("output/lambda_scale/datasets"),
                        help="where the synthetic images are generated (default: output/lambda_scale/datasets)")
    parser.add_argument("--batches", type=int, default=3, help="source batches per config (default 3)")
    parser.add_argument("--height", type=int, default=512, help="height of the generated images (default 512)")
    parser.add_argument("--width", type=int, default=1024, help="width of the generated images (default 1024)")
    parser.add_argument("--device", default="cpu", help="MODEL.DEVICE (default cpu)")
    args = parser.parse_args(argv)
    if args.batches < 1:
        parser.error(f"--batches must be >= 1, got {args.batches}")
    datasets_root = args.datasets_root.resolve()
    prepare_images(datasets_root, args.height, args.width)
    os.environ["DETECTRON2_DATASETS"] = str(datasets_root)
    from gbw_panoptic.data.datasets import register_all

    register_all(str(datasets_root))
    results = []
    for number, config in enumerate(args.configs, start=1):
        start = time.perf_counter()
        print(f"[{number}/{len(args.configs)}] {config}: {args.batches} source batches ...", flush=True)
        results.append(measure(config, args.batches, args.device))
        print(f"    done in {time.perf_counter() - start:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", {
        "height": args.height, "width": args.width, "batches": args.batches, "device": args.device, "configs": results,
    })
    lines = [
        "# GBW weight spread at the paper configs' crop sizes",
        "",
        f"`python tools/measure_gbw_lambda_scale.py --out {args.out}`: max over classes and {args.batches} "
        "source batches of |w_c − 1|, random initial weights (an upper bound for a trained model), synthetic "
        f"images generated at {args.height}×{args.width}, resized and cropped by each config's mapper.",
        "",
        "| config | crop | source batch | GBW loss | λ as configured | max abs(w − 1), as configured | max abs(w − 1), relative λ = 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for name, configured in result["configured_lambda"].items():
            lines.append(
                f"| `{result['config']}` | {'×'.join(map(str, result['crop']))} | {result['source_batch']} | {name} | "
                f"{configured['mode']} {configured['lambda']:g} | "
                f"{result['max_abs_deviation']['as configured'][name]:.1e} | "
                f"{result['max_abs_deviation']['relative λ = 1'][name]:.2f} |"
            )
    with atomic_write(args.out / "report.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
