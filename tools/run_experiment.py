#!/usr/bin/env python
"""Run the synthetic-benchmark experiment: GBW against its baselines, with a report.

`make demo` runs `--preset demo` (one seed of source-only, DACS, DACS + GBW; ~20 min on a 2-core CPU);
`make experiment` runs `--preset experiment` (3 seeds per arm; longer). Steps:

1. generate + prepare the synthetic two-domain benchmark under $DETECTRON2_DATASETS/synthetic
   (default ./datasets/synthetic) with the same scripts as the real datasets; `--preset imbalance`
   generates one benchmark per level of the rare classes' target frequency under
   $DETECTRON2_DATASETS/imbalance_<level>/synthetic and keeps each level's runs and report in
   OUT/imbalance_<level>, OUT/report.md comparing the levels;
2. train every (arm, seed) with tools/train_net.py (OUTPUT_DIR = OUT/runs/<arm>/<N>it_seed<k>), evaluated
   on the target val and held-out source val splits at the end; the adaptation arms (DACS ± GBW) and the
   target oracle start from the final source-only model of their seed, so source-only is trained first;
   finished runs are skipped, interrupted ones resume, and a run made with another command or config,
   or on another benchmark design, is kept as <folder>.old<k> and trained again; with --reuse-from, a run
   that an earlier experiment has already made (same config but for its folders, same benchmark, same
   starting run) is copied from there instead of trained;
3. write OUT/report.md (tables: mean ± std per arm, GBW − baseline paired by seed, per-class recall;
   figures: recall change per class, GBW weights during training, example predictions) and
   OUT/results.json.

The logic lives in tools/experiment/ (runs.py: arms, presets, training; report.py: the report).
"""
import argparse
import logging
import os
import sys
from pathlib import Path

from experiment import run_experiment
from experiment.runs import ARMS, PRESETS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                        help="experiment size (default: demo). " + "; ".join(
                            f"{name}: {preset.description}" for name, preset in PRESETS.items()))
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: output/<preset>)")
    parser.add_argument("--datasets-root", type=Path,
                        default=Path(os.environ.get("DETECTRON2_DATASETS", "datasets")),
                        help="datasets root holding synthetic/ (default: $DETECTRON2_DATASETS or ./datasets)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="training runs in parallel, each with CPU cores ÷ jobs threads (at least 1; a run that "
                        "every other run starts from gets every core); default: 3 for demo, 2 otherwise")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), help="override the preset's arms")
    parser.add_argument("--seeds", nargs="+", type=int, help="override the preset's seeds")
    parser.add_argument("--max-iter", type=int,
                        help="override the preset's iterations per run (at the configs' 2 source + 2 target images per "
                        "step; an arm with a larger batch trains on as many images in fewer iterations)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report of the preset's finished runs without training (a missing run is an "
                        "error; their configs are not compared with what the current code gives)")
    parser.add_argument("--reuse-from", nargs="+", type=Path, default=(), metavar="DIR",
                        help="output folders of earlier experiments (e.g. output/experiment): a run of this preset that "
                        "one of them has finished (same config but for OUTPUT_DIR and the path of the model it starts "
                        "from, same benchmark, started from the same run) is copied, its checkpoints hard-linked, "
                        "instead of trained; its experiment_run.json names the folder (reused_from). The thread count is not "
                        "compared (results differ slightly with it): reuse runs made with the same --jobs on a machine "
                        "with as many cores")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    report = run_experiment(
        args.preset, args.out or Path("output") / args.preset, args.datasets_root.resolve(),
        jobs=args.jobs, arms=args.arms, seeds=args.seeds, max_iter=args.max_iter, report_only=args.report_only,
        reuse_from=args.reuse_from,
    )
    print(f"\nReport written to {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
