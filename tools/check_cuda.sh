#!/usr/bin/env bash
# CUDA checks of gbw-panoptic, prepared to run in under 10 minutes on one GPU:
#   1. the CUDA rows of the benchmarks (tools/bench_gbw.py, tools/bench_post_processing.py);
#   2. GBW adds no host synchronisation to a training step (tools/check_gbw_sync.py);
#   3. ITERS iterations (default 200) of configs/synthia2cityscapes/mit_b5_gbw.yaml (MiT-B5, DACS,
#      GBW on the three losses, 512x512 crops, per-domain scales) on a synthetic benchmark of
#      1024x2048 images, with AMP and the feature distance on (initial weights saved as MODEL.WEIGHTS):
#      seconds per iteration and peak GPU memory.
# Results (JSON, logs, summary.txt) go to $OUT if set, else output/check_cuda. Each stage has its own
# time limit within a total of BUDGET seconds (default 540); a failed or skipped stage does not stop
# the others. Exit status: 0 all stages passed, 1 a stage failed, 2 no CUDA device.
#
#   tools/check_cuda.sh                     # PYTHON=python, OUT=output/check_cuda, ITERS=200
#   OUT=/tmp/cuda ITERS=300 tools/check_cuda.sh
#   tools/check_cuda.sh --help              # this text; runs nothing
set -uo pipefail

case "${1:-}" in
    -h | --help)
        echo "usage: [PYTHON=...] [OUT=DIR] [ITERS=N] [BUDGET=SECONDS] tools/check_cuda.sh [--help]"
        echo
        sed -n '2,/^set -uo pipefail$/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
        exit 0
        ;;
    "") ;;
    *)
        echo "check_cuda: unknown argument '$1'; it takes none (settings: PYTHON, OUT, ITERS, BUDGET; see --help)" >&2
        exit 64
        ;;
esac

cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD/projects/gbw_panoptic${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}
OUT_DIR=${OUT:-output/check_cuda}
ITERS=${ITERS:-200}
BUDGET=${BUDGET:-540}
CONFIG=configs/synthia2cityscapes/mit_b5_gbw.yaml

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "check_cuda: no CUDA device is visible to PyTorch ($PYTHON); these checks need a GPU, nothing was run." >&2
    exit 2
fi

mkdir -p "$OUT_DIR" || exit 1
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/check_cuda.XXXXXX") || exit 1
trap 'rm -rf "$WORK"' EXIT
exec > >(tee "$OUT_DIR/check_cuda.log") 2>&1
DEADLINE=$((SECONDS + BUDGET))
FAILED=0
: > "$OUT_DIR/summary.txt"

# run_stage NAME LIMIT_S COMMAND...: run COMMAND with at most LIMIT_S seconds (less if the budget
# is nearly spent), log its status in summary.txt.
run_stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    ((limit > left)) && limit=$left
    if ((limit < 20)); then
        echo "SKIPPED $name: time budget spent" | tee -a "$OUT_DIR/summary.txt"
        FAILED=1
        return
    fi
    echo "=== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local status=$?
    local state=PASSED
    ((status != 0)) && state="FAILED (exit $status$( ((status == 124)) && echo ', time limit'))" && FAILED=1
    echo "$state $name in $((SECONDS - start))s" | tee -a "$OUT_DIR/summary.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"

run_stage "bench_gbw (CUDA)" 120 \
    "$PYTHON" tools/bench_gbw.py --device cuda --repeats 20 --out "$OUT_DIR/bench_gbw.json"
run_stage "bench_post_processing (CUDA)" 90 \
    "$PYTHON" tools/bench_post_processing.py --device cuda --repeats 5 --out "$OUT_DIR/bench_post_processing.json"
run_stage "GBW adds no host sync" 120 \
    "$PYTHON" tools/check_gbw_sync.py --config-file "$CONFIG" --out "$OUT_DIR/gbw_sync.json" MODEL.MIT.PRETRAINED ""

DATA=$WORK/datasets
TRAIN_ARGS=(
    --config-file "$CONFIG"
    DATASETS.TRAIN '("synthetic_source_panoptic_train",)'
    DATASETS.TARGET_TRAIN '("synthetic_target_panoptic_train",)'
    DATASETS.TEST '()'
    MODEL.MIT.PRETRAINED '' MODEL.WEIGHTS "$WORK/initial_weights.pth" MODEL.DEVICE cuda
    SOLVER.AMP.ENABLED True SOLVER.MAX_ITER "$ITERS" SOLVER.CHECKPOINT_PERIOD 1000000
    TEST.EVAL_PERIOD 0 DATALOADER.NUM_WORKERS 8 UDA.LOG_PERIOD 10 OUTPUT_DIR "$WORK/train"
)
run_stage "synthetic benchmark at 1024x2048" 120 \
    "$PYTHON" datasets/prepare_synthetic.py "$DATA/synthetic" --seed 0 --num-source 24 --num-target-train 12 \
    --num-target-val 2 --height 1024 --width 2048 --workers "$(nproc)"
# Random initial weights saved as a checkpoint, so that the feature distance (on only for a model
# that starts from weights) costs what it costs in the real runs.
run_stage "initial weights" 60 "$PYTHON" - "$CONFIG" "$WORK/initial_weights.pth" <<'PY'
import sys
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
import gbw_panoptic.modeling  # noqa: F401
from gbw_panoptic.config import add_gbw_panoptic_config
cfg = get_cfg()
add_gbw_panoptic_config(cfg)
cfg.merge_from_file(sys.argv[1])
cfg.merge_from_list(["MODEL.MIT.PRETRAINED", "", "MODEL.DEVICE", "cpu"])
torch.save({"model": build_model(cfg).state_dict()}, sys.argv[2])
PY
run_stage "train $ITERS iterations (AMP)" 300 env DETECTRON2_DATASETS="$DATA" "$PYTHON" tools/train_net.py "${TRAIN_ARGS[@]}"
cp "$WORK/train/metrics.json" "$WORK/train/log.txt" "$OUT_DIR/" 2>/dev/null
run_stage "training summary" 30 "$PYTHON" - "$OUT_DIR" "$ITERS" <<'PY'
import json
import re
import statistics
import sys
from gbw_panoptic.evaluation.panoptic_io import write_json
out_dir, iters = sys.argv[1], int(sys.argv[2])
records = [json.loads(line) for line in open(f"{out_dir}/metrics.json") if line.strip()]
# "time" is the median over the last 20 iterations at each write; leave out the first 40 (warm-up).
times = [r["time"] for r in records if "time" in r and r.get("iteration", 0) >= 40]
peaks = re.findall(r"max_mem: (\d+)M", open(f"{out_dir}/log.txt").read())
last = max((r.get("iteration", -1) for r in records), default=-1)
if last + 1 < iters or not times or not peaks:
    sys.exit(f"training did not finish {iters} iterations (last {last}) or logged no time / max_mem")
summary = {
    "iterations": iters,
    "seconds_per_iteration_median": statistics.median(times),
    "peak_memory_allocated_MiB": max(int(p) for p in peaks),
    "losses_at_end": {k: v for k, v in records[-1].items() if k.startswith("loss")},
}
write_json(f"{out_dir}/train_summary.json", summary)
print(json.dumps(summary, indent=2))
PY

echo "=== summary"
cat "$OUT_DIR/summary.txt"
exit "$FAILED"
