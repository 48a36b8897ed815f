#!/usr/bin/env bash
# The pretraining step's GPU checks in one call each (bench/gpu_scan_session.sh is the scan kernels'):
#
#   here (CPU):              bash bench/gpu_scan_session.sh prepare      (.gpu_run/whl)
#                            bash bench/gpu_scan_session.sh baseline REV (.gpu_run/baseline: the revision to beat)
#   on the GPU machine:      bash bench/gpu_pretrain_session.sh vitb     (carry .gpu_run/whl, .gpu_run/baseline)
#       the gpu-marked tests of the pretraining loop, then ViT-B/16 MAE (224 px, batch 256, synthetic, --compile)
#       here and in the baseline revision in the order A B B A on one fresh machine, then this tree's step with CUDA
#       graphs and with inductor's GEMM autotuning (max-autotune-no-cudagraphs) in what is left of the call;
#       $OUT/vitb_*.json, $OUT/gpu_tests.log, $OUT/clocks.log
# Each row is its own process (bench.pretrain, --steps 60 at most, 10 s at most), bounded by timeout; the SM clock,
# power and throttle reasons are logged between rows, so a slow row can be told from a slow machine.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_device_setup.sh  # after the cd above: paths are from the repository root
CALL_BUDGET_S=${CALL_BUDGET_S:-570}  # stop starting rows past this (the device call's limit is 600 s)

clocks() {
    echo "$1 $(nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
        --format=csv,noheader)" | tee -a "$out/clocks.log"
}

# vitb_row TREE NAME LIMIT_S [bench.pretrain flags]: one ViT-B/16 row from TREE's own code.
vitb_row() {
    local tree=$1 name=$2 limit=$3
    shift 3
    local left=$((CALL_BUDGET_S - SECONDS))
    if [ "$left" -lt 30 ]; then
        echo "$name: skipped, $left s left in the call"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    clocks "before $name"
    (cd "$tree" && timeout "$limit" python3 -m bench.pretrain --models mae_vit_base_patch16 --input_sizes 224 \
        --batch_size 256 --modes synthetic --steps 60 --row_seconds 10 --compile "$@" --json "$out/vitb_$name.json" \
        2>&1 | grep -E "^synthetic ") || echo "$name: no row (limit $limit s)"
}

case "${1:-}" in
vitb)
    out="${OUT:-/tmp/gpu_pretrain_out}"
    mkdir -p "$out"
    device_setup
    timeout 180 python3 -m pytest -q -ra -m gpu tests/test_pretrain.py "${xdist[@]}" 2>&1 | tee "$out/gpu_tests.log" \
        | tail -4 || echo "tests: stopped by their limit"
    base=.gpu_run/baseline
    [ -f "$base/REVISION" ] && echo "baseline revision $(cat "$base/REVISION")"
    vitb_row . new_a 150
    [ -f "$base/REVISION" ] && vitb_row "$base" base_a 150
    [ -f "$base/REVISION" ] && vitb_row "$base" base_b 90
    vitb_row . new_b 90
    vitb_row . cudagraphs 120 --compile_mode reduce-overhead
    vitb_row . autotune 400 --compile_mode max-autotune-no-cudagraphs
    clocks "end"
    ;;
*)
    echo "usage: bash bench/gpu_pretrain_session.sh vitb" >&2
    exit 2
    ;;
esac
