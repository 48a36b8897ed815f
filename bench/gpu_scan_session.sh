#!/usr/bin/env bash
# The scan kernels' GPU check in one call: every gpu-marked scan test (all kernel variants), bench/scan.py's
# backends beside mamba-ssm's CUDA scan (built from its sdist), the Vim-S MAE training step (bench/pretrain.py,
# synthetic data) eager and compiled with CUDA graphs, and, when a baseline revision is prepared, the default
# backend and the eager Vim-S step of that revision in the same call (an A/B on one machine).
#
#   here (CPU, with network):  bash bench/gpu_scan_session.sh prepare
#       downloads mamba-ssm's sdist and the pure-Python wheels the device image lacks (webdataset, braceexpand,
#       pytest-xdist and execnet for the test modes, pydicom and nibabel for tests that curate)
#       into .gpu_run/ (git-ignored; a new checkout starts without it)
#   here (CPU, with network):  bash bench/gpu_scan_session.sh sass [bench.scan_sass flags]
#       the offline SASS report (bench/scan_sass.py) compiled with the GPU image's Triton (DEVICE_TRITON below, unpacked
#       once into .gpu_run/) instead of this machine's: the twelfth session found a kernel whose hot loops were the
#       same as before under Triton 3.8 here and 40 % longer, with spills, under the image's 3.6
#   here (CPU):                bash bench/gpu_scan_session.sh baseline [REV]     (default 8c09aba)
#       exports revision REV of this repository into .gpu_run/baseline (about 3 MB)
#   on the GPU machine:        bash bench/gpu_scan_session.sh tests
#       (carry .gpu_run/whl) every test file with CUDA paths, compiled, each bounded; logs in $OUT/<file>.log
#   on the GPU machine:        bash bench/gpu_scan_session.sh vim
#       (carry .gpu_run/whl) the Vim-S MAE step on torch's conv and on the Triton conv (a Vim block channel-last end
#       to end), eager and compiled, in one call (about 6 minutes): what decides the conv default; $OUT/vim_*.json;
#       with .gpu_run/baseline carried, the baseline revision's eager rows too (about 1.5 minutes more)
#   on the GPU machine:        bash bench/gpu_scan_session.sh quick
#       (carry .gpu_run/whl, .gpu_run/baseline) about 3 minutes: CUDA tests of the conv and attention kernels,
#       bench.conv against the baseline's conv, bench.attention (SDPA against ours)
#   on the GPU machine:        bash bench/gpu_scan_session.sh conv
#       (carry .gpu_run/whl, .gpu_run/baseline) the causal conv's CUDA tests, bench.conv and the compiled Vim-S step,
#       here and in the baseline revision, in one call (about 6 minutes); CONV_LAUNCHES="WARPS:CHUNK ..." adds
#       bench.conv rows of other tilings of this tree's kernels
#   on the GPU machine:        bash bench/gpu_scan_session.sh variants
#       (carry .gpu_run/whl, .gpu_run/mamba_ssm-*) kernel variants side by side: CUDA tests, bench.scan, the L=50 host
#       path, the compiled Vim-S step on each
#   on the GPU machine:        bash bench/gpu_scan_session.sh layout
#       (carry .gpu_run/whl, .gpu_run/mamba_ssm-*) GPU tests of the chunk tiles and the copied backward,
#       bench.scan_cross's v2t / v2x / v2g pairs and bench.scan's defaults beside mamba-ssm (about 6 minutes)
#   on the GPU machine:        bash bench/gpu_scan_session.sh vimsweep
#       (carry .gpu_run/whl) bench.scan's v1 / v2 tile sweep at a Vim-S batch-768 step's channel-last scans (about
#       5 minutes); $OUT/vim_sweep.json
#   on the GPU machine:        bash bench/gpu_scan_session.sh chlast
#       (carry .gpu_run/whl) the channel-last forward default: compiled tests, then bench.scan_cross's forward widths
#       (v2 / v2d16 / v2d32 / v1d32) behind the default backward at a Vim-S batch-512 / 768 step's scans (about 5 min)
#   on the GPU machine:        bash bench/gpu_scan_session.sh bf16states
#       (carry .gpu_run/whl, .gpu_run/mamba_ssm-*) the chunk states saved in bfloat16: GPU tests, bench.scan_cross
#       against float32 states at the issue's shapes and a Vim-S step's (about 5 minutes)
#   on the GPU machine:        bash bench/gpu_scan_session.sh segments
#       (carry .gpu_run/whl, .gpu_run/mamba_ssm-*) v2's sequence segments at batch 16: GPU tests, bench.scan_cross with
#       1 / 2 / 4 / 8 / 16 segments beside mamba-ssm (about 6 minutes)
#   on the GPU machine:        bash bench/gpu_scan_session.sh ncu
#       (carry .gpu_run/whl) Nsight Compute's stall reasons, issue use and occupancy of the default forward and
#       backward kernels (bench/scan_ncu.py) at a Vim-S step's scan shape and at batch 16, L=1024; $OUT/ncu_*.txt
#   on the GPU machine:        bash bench/gpu_scan_session.sh run
#       carrying .gpu_run/mamba_ssm-2.3.2.post1, .gpu_run/whl and .gpu_run/baseline (all of .gpu_run, with the
#       results data, is over the 64 MiB a call carries)
#       writes $OUT/scan_tests.log, $OUT/scan.json, $OUT/scan_host.log, (V4_SWEEP=1) $OUT/scan_v4_sweep.json,
#       $OUT/vim_{eager,eager_torch_conv,cudagraphs}.json (vim_eager with a device-time profile), with a
#       baseline $OUT/scan_baseline.json, $OUT/scan_host_baseline.log and $OUT/vim_eager_baseline.json, and prints
#       the tables; VIM_CUDAGRAPHS=1 adds the compiled Vim-S step (about 2.5 minutes; off by default since the
#       thirteenth session added the v4 and resident-loader tests and two backends, which it would push past the
#       10-minute call)
set -euo pipefail
cd "$(dirname "$0")/.."
MAMBA_VERSION=2.3.2.post1
DEVICE_TRITON=3.6.0  # the GPU image's (torch 2.11); kernels must be checked with it, not only with ours

# device_setup: see bench/gpu_device_setup.sh.
source bench/gpu_device_setup.sh  # after the cd above: paths are from the repository root

# On the GPU machine, when the mamba-ssm sdist was carried: sets mamba=(--mamba-src DIR) for bench.scan and builds
# its extension into torch's extension cache in the background (nvcc is CPU work: it overlaps the tests' Triton
# compiles, and bench.scan then finds it built); the caller waits. Without the sdist mamba=() and nothing starts.
start_mamba_build() {
    mamba=()
    local src=".gpu_run/mamba_ssm-${MAMBA_VERSION}"
    if [ -d "$src" ]; then
        mamba=(--mamba-src "$src")
        python3 -c "import sys; from pathlib import Path; from bench.scan import load_mamba_ssm_cuda; \
load_mamba_ssm_cuda(Path(sys.argv[1]))" "$src" >"$1/mamba_build.log" 2>&1 &
    fi
}

# begin_with_mamba: a part's start on the GPU machine: $out made, the wheels installed, mamba-ssm's build started in
# the background (the caller waits for it before timing).
begin_with_mamba() {
    out="${OUT:-/tmp/gpu_scan_out}"
    mkdir -p "$out"
    device_setup
    start_mamba_build "$out"
}

# gpu_tests NAME BOUND PYTEST_ARGS...: a pytest run bounded to BOUND seconds, logged to $out/NAME.log; prints its
# failures and summary.
gpu_tests() {
    local name=$1 bound=$2
    shift 2
    timeout "$bound" python3 -m pytest -q -rf -p no:cacheprovider "${xdist[@]}" "$@" >"$out/$name.log" 2>&1 || true
    grep -E "^(FAILED|ERROR)|passed|failed" "$out/$name.log" | tail -8 || true
}

case "${1:-}" in
prepare)
    mkdir -p .gpu_run
    # The sdist file itself (pip download would run its setup.py, which wants CUDA).
    python3 - "$MAMBA_VERSION" <<'PY'
import json, sys, urllib.request
meta = json.load(urllib.request.urlopen("https://pypi.org/pypi/mamba-ssm/json"))
url = next(u["url"] for u in meta["releases"][sys.argv[1]] if u["packagetype"] == "sdist")
urllib.request.urlretrieve(url, f".gpu_run/mamba_ssm-{sys.argv[1]}.tar.gz")
PY
    python3 -m pip download --no-deps -q -d .gpu_run/whl webdataset braceexpand pytest-xdist execnet pydicom nibabel
    tar -xzf .gpu_run/mamba_ssm-${MAMBA_VERSION}.tar.gz -C .gpu_run
    rm .gpu_run/mamba_ssm-${MAMBA_VERSION}.tar.gz
    du -sh .gpu_run
    ;;
sass)
    shift
    py=python3
    if [ -x .venv/bin/python ]; then
        py=.venv/bin/python
    fi
    lib=.gpu_run/triton-$DEVICE_TRITON
    if [ ! -d "$lib/triton" ]; then
        wheels=$(mktemp -d)
        "$py" -m pip download --no-deps -q -d "$wheels" "triton==$DEVICE_TRITON"
        "$py" -m pip install -q --no-deps --target "$lib" "$wheels"/triton-*.whl
        rm -rf "$wheels"
    fi
    PYTHONPATH="$lib:$PWD" "$py" -c "import triton; print('triton', triton.__version__, 'from', triton.__file__)"
    PYTHONPATH="$lib:$PWD" "$py" -m bench.scan_sass "$@"
    ;;
baseline)
    # 8c09aba: the tenth session's timed kernels and host path (as 140c035), with bench/scan_host.py --cuda.
    rev="${2:-8c09aba}"
    rm -rf .gpu_run/baseline
    mkdir -p .gpu_run/baseline
    git archive "$rev" | tar -x -C .gpu_run/baseline
    git rev-parse --short "$rev" > .gpu_run/baseline/REVISION
    du -sh .gpu_run/baseline
    ;;
run)
    out="${OUT:-/tmp/gpu_scan_out}"
    mkdir -p "$out"
    device_setup
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    start_mamba_build "$out"
    # Each stage is bounded so that a slow one leaves time for the rest of one call (about 8 minutes): correctness
    # first (the newest GPU-only tests, the launch cache's, before the rest), then the backends side by side, the
    # host's profile and the Vim-S step.
    timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_scan_launch.py 2>&1 \
        | tee "$out/scan_tests.log" | tail -5 || true
    timeout 75 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_scan_triton.py tests/test_scan_options.py \
        tests/test_scan_variant.py tests/test_scan_compile.py 2>&1 | tee -a "$out/scan_tests.log" \
        | tail -15 || true
    # The v4 forward (parallel over positions, thirteenth session) compiled for the first time: its reverse scan
    # and the v1 / v2 backward behind it on sm_90; and the resident pretraining loader's pinned index copy.
    # (Only the resident loader's CUDA test: the others read ../shared, which does not travel.)
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_scan_v4.py \
        tests/test_data_resident.py::test_resident_batches_on_cuda_equal_the_cpu_ones 2>&1 \
        | tee -a "$out/scan_tests.log" | tail -5 || true
    # The Triton causal conv1d (sixteenth session) compiled for the first time, forward and every gradient.
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_causal_conv1d.py 2>&1 \
        | tee -a "$out/scan_tests.log" | tail -3 || true
    wait
    # v3 with the thirteenth session's register cut and the v4 forward (behind the v2 backward) beside the rest.
    timeout 110 python3 -m bench.scan "${mamba[@]}" --backends triton triton_v2 triton_v3 triton_v4 mamba_ssm \
        --json "$out/scan.json" || true
    # The v4 forward's tiles at L=1024 / 4096 (its default is one guess made offline).
    # Recorded in the seventeenth session (docs/results/scan_h100_s17_v4_sweep.json); V4_SWEEP=1 runs it again.
    if [ "${V4_SWEEP:-0}" = 1 ]; then
        timeout 90 python3 -m bench.scan --backends triton_v4 --sweep-v4 --json "$out/scan_v4_sweep.json" 2>&1 \
            | tail -8 || true
    fi
    if [ -f .gpu_run/baseline/REVISION ]; then
        # The same benchmark from the baseline revision's own tree, in this call: host-path changes show at L=50.
        echo "== baseline revision $(cat .gpu_run/baseline/REVISION): bench.scan --backends triton"
        (cd .gpu_run/baseline && timeout 45 python3 -m bench.scan --backends triton \
            --json "$out/scan_baseline.json") || true
    fi
    # Where the host's time goes at L=50 (the wall clock there is the host's), here and in the baseline.
    timeout 50 python3 -m bench.scan_host --cuda --iters 100 --backends triton --python-profile 30 2>&1 \
        | tee "$out/scan_host.log" \
        | grep -v "USDT" || true
    if [ -f .gpu_run/baseline/bench/scan_host.py ] && grep -q -- "--cuda" .gpu_run/baseline/bench/scan_host.py; then
        echo "== baseline revision $(cat .gpu_run/baseline/REVISION): bench.scan_host --cuda"
        (cd .gpu_run/baseline && timeout 40 python3 -m bench.scan_host --cuda --iters 100 --backends triton 2>&1 \
            | tee "$out/scan_host_baseline.log" | grep -v "USDT") || true
    fi
    # The Vim-S MAE step eager, then compiled with CUDA graphs: the eager step seems bound by the host's kernel
    # launches (1,636 img/s in the fifth session, 1,115 in the eighth on another host, with the same scan times at
    # L=197 and 4096), which CUDA graphs remove.
    # With the default (Triton) conv, its device time by kernel kind profiled after the timed steps.
    timeout 45 python3 -m bench.pretrain --models mae_vim_small_patch16 --input_sizes 224 --modes synthetic \
        --row_seconds 8 --profile_steps 2 --json "$out/vim_eager.json" || true
    # The same step with torch's depthwise conv (the default until the eighteenth session).
    timeout 40 python3 -m bench.pretrain --models mae_vim_small_patch16 --input_sizes 224 --modes synthetic \
        --row_seconds 8 --conv_backend torch --json "$out/vim_eager_torch_conv.json" || true
    if [ -f .gpu_run/baseline/REVISION ]; then
        echo "== baseline revision $(cat .gpu_run/baseline/REVISION): Vim-S eager"
        (cd .gpu_run/baseline && timeout 30 python3 -m bench.pretrain --models mae_vim_small_patch16 \
            --input_sizes 224 --modes synthetic --row_seconds 8 --json "$out/vim_eager_baseline.json") || true
    fi
    if [ "${VIM_CUDAGRAPHS:-0}" = 1 ]; then
        timeout 150 python3 -m bench.pretrain --models mae_vim_small_patch16 --input_sizes 224 --modes synthetic \
            --compile --compile_mode reduce-overhead --warmup 8 --row_seconds 10 --json "$out/vim_cudagraphs.json" \
            || true
    fi
    ;;
vim)
    out="${OUT:-/tmp/gpu_scan_out}"
    mkdir -p "$out"
    device_setup
    for compiled in "" --compile; do
        for conv in auto triton; do
            timeout 170 python3 -m bench.pretrain --models mae_vim_small_patch16 --input_sizes 224 --modes synthetic \
                --row_seconds 8 --conv_backend "$conv" $compiled --json "$out/vim${compiled:+_compiled}_conv_$conv.json" \
                2>&1 | grep -E "^synthetic " || echo "conv $conv $compiled: no row"
        done
    done
    if [ -f .gpu_run/baseline/REVISION ]; then
        # The eager rows from the baseline revision's own tree in the same call (bash bench/gpu_scan_session.sh
        # baseline bd7cd8d: before the strided scan and the channel-last Vim block), an A/B on one machine.
        for conv in auto triton; do
            echo "== baseline revision $(cat .gpu_run/baseline/REVISION): Vim-S eager, conv $conv"
            (cd .gpu_run/baseline && timeout 60 python3 -m bench.pretrain --models mae_vim_small_patch16 \
                --input_sizes 224 --modes synthetic --row_seconds 8 --conv_backend "$conv" \
                --json "$out/vim_baseline_conv_$conv.json" 2>&1 | grep -E "^synthetic ") || echo "no row"
        done
    fi
    ;;
conv)
    # The causal conv kernels on CUDA (tests), bench.conv (backends at the Vim shapes) and the compiled Vim-S step,
    # each also from the baseline revision's tree when one is prepared (bench/conv.py copied into it): an A/B of a
    # conv kernel change on one machine, about 6 minutes. $OUT/conv*.json, $OUT/vim_compiled*.json
    out="${OUT:-/tmp/gpu_scan_out}"
    mkdir -p "$out"
    device_setup
    timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_causal_conv1d.py tests/test_conv_bench.py 2>&1 \
        | tail -3 || true
    # shellcheck disable=SC2086  # CONV_LAUNCHES is a word list (WARPS:CHUNK tilings of the Triton kernels)
    timeout 75 python3 -m bench.conv --launches ${CONV_LAUNCHES:-} --json "$out/conv.json" || true
    if [ -f .gpu_run/baseline/REVISION ]; then
        cp bench/conv.py .gpu_run/baseline/bench/
        echo "== baseline revision $(cat .gpu_run/baseline/REVISION): bench.conv --backends triton"
        (cd .gpu_run/baseline && timeout 45 python3 -m bench.conv --backends triton \
            --json "$out/conv_baseline.json") || true
    fi
    timeout 90 python3 -m bench.pretrain --models mae_vim_small_patch16 --input_sizes 224 --modes synthetic \
        --row_seconds 8 --compile --json "$out/vim_compiled.json" 2>&1 | grep -E "^synthetic " || true
    if [ -f .gpu_run/baseline/REVISION ]; then
        echo "== baseline revision $(cat .gpu_run/baseline/REVISION): Vim-S compiled"
        (cd .gpu_run/baseline && timeout 90 python3 -m bench.pretrain --models mae_vim_small_patch16 \
            --input_sizes 224 --modes synthetic --row_seconds 8 --compile --json "$out/vim_compiled_baseline.json" \
            2>&1 | grep -E "^synthetic ") || true
    fi
    ;;
quick)
    # A first look at kernels not yet timed, about 3 minutes (for when device time is short): the CUDA tests of the
    # causal conv and the attention kernels, bench.conv here and (with .gpu_run/baseline) in the baseline tree,
    # bench.attention (SDPA against kernels/triton_attention.py). $OUT/conv*.json, $OUT/attention.json
    out="${OUT:-/tmp/gpu_scan_out}"
    mkdir -p "$out"
    device_setup
    timeout 90 python3 -m pytest -q -p no:cacheprovider "${xdist[@]}" tests/test_causal_conv1d.py \
        tests/test_attention_triton.py 2>&1 | tail -4 || true
    timeout 50 python3 -m bench.conv --json "$out/conv.json" || true
    if [ -f .gpu_run/baseline/REVISION ]; then
        cp bench/conv.py .gpu_run/baseline/bench/
        echo "== baseline revision $(cat .gpu_run/baseline/REVISION): bench.conv --backends triton"
        (cd .gpu_run/baseline && timeout 35 python3 -m bench.conv --backends triton \
            --json "$out/conv_baseline.json") || true
    fi
    timeout 60 python3 -m bench.attention --backends default triton --json "$out/attention.json" || true
    ;;
variants)
    # Kernel variants side by side in one call (about 8 minutes): the CUDA tests of TEST_FILES, bench.scan's
    # SCAN_BACKENDS with mamba-ssm's CUDA scan, the host's path at L=50 per backend, and the compiled Vim-S step on
    # each of VIM_BACKENDS with its device time by kernel kind. $OUT/variant_tests.log, $OUT/scan.json,
    # $OUT/scan_host.log, $OUT/vim_compiled_<backend>.json
    out="${OUT:-/tmp/gpu_scan_out}"
    mkdir -p "$out"
    device_setup
    start_mamba_build "$out"
    # shellcheck disable=SC2086  # word lists
    timeout "${TESTS_S:-150}" python3 -m pytest -q -rf -p no:cacheprovider "${xdist[@]}" \
        ${TEST_FILES:-tests/test_scan_strides.py tests/test_scan_variant.py tests/test_models_ssm.py} 2>&1 \
        | tee "$out/variant_tests.log" | tail -8 || true
    wait
    # shellcheck disable=SC2086
    timeout 100 python3 -m bench.scan "${mamba[@]}" --backends ${SCAN_BACKENDS:-triton triton_v1 mamba_ssm} \
        --json "$out/scan.json" || true
    # shellcheck disable=SC2086
    timeout 60 python3 -m bench.scan_host --cuda --iters 100 --backends ${HOST_BACKENDS:-triton triton_v1} \
        --python-profile 25 2>&1 | tee "$out/scan_host.log" | grep -v "USDT" || true
    for backend in ${VIM_BACKENDS:-auto triton_v1}; do
        timeout 110 python3 -m bench.pretrain --models mae_vim_small_patch16 --input_sizes 224 --modes synthetic \
            --row_seconds 8 --compile --scan_backend "$backend" --profile_steps 2 \
            --json "$out/vim_compiled_$backend.json" 2>&1 | grep -vE "USDT|Warning|warn" | tail -22 || true
    done
    ;;
tests)
    # Every test file whose cases run compiled on CUDA when a GPU is present (not only the gpu-marked ones), each
    # bounded (TESTS_FILE_S, default 150 s) so that one slow file leaves the others their turn, all of them within
    # TESTS_TOTAL_S (default 540 s); newest code first. TEST_FILES (space-separated) runs those files instead.
    out="${OUT:-/tmp/gpu_scan_out}"
    mkdir -p "$out"
    device_setup
    deadline=$((SECONDS + ${TESTS_TOTAL_S:-540}))
    all_files="tests/test_scan_v4.py tests/test_models_ssm.py tests/test_mambamic.py tests/test_scan_compile.py
               tests/test_scan_ref.py tests/test_scan_launch.py tests/test_scan_variant.py tests/test_causal_conv1d.py
               tests/test_scan_strides.py tests/test_scan_triton.py tests/test_scan_options.py"
    for f in ${TEST_FILES:-$all_files}; do
        bound=$((deadline - SECONDS))
        if [ "$bound" -gt "${TESTS_FILE_S:-150}" ]; then
            bound=${TESTS_FILE_S:-150}
        fi
        if [ "$bound" -lt 10 ]; then
            echo "== $f: not run (no time left)"
            continue
        fi
        echo "== $f (at most $bound s)"
        log="$out/$(basename "$f" .py).log"
        rc=0
        timeout "$bound" python3 -m pytest -q -rf -p no:cacheprovider "${xdist[@]}" "$f" >"$log" 2>&1 || rc=$?
        if [ "$rc" = 124 ]; then
            echo "stopped at the time bound: $(tr -cd '.' <"$log" | wc -c) passed before it"
        fi
        grep -E "^(FAILED|ERROR)|passed|failed" "$log" | tail -12 || true
    done
    ;;
layout)
    # (carry .gpu_run/whl, .gpu_run/mamba_ssm-*) the layout paths in one call: the GPU tests of the chunk tiles, the
    # transpose kernel and the copied backward; bench.scan_cross's pairs that tell them apart (v2t:v2t tiles both
    # ways, v2t:v2x the copied backward, v2t:v2g its gradients as tiles) beside the defaults and mamba-ssm; then
    # bench.scan's default row beside mamba-ssm (the README's scan table).
    begin_with_mamba
    gpu_tests layout_tests 150 tests/test_transpose.py tests/test_scan_triton.py tests/test_scan_options.py \
        -k "v2g or v2x or v2t or transpose or channel_last_copies or tile_io or launch_returns"
    wait  # the mamba-ssm build
    timeout 150 python3 -m bench.scan_cross --variants v2t v2x v2g --pairs v2t:v2t v2t:v2x v2t:v2g --rep-ms 60 \
        "${mamba[@]}" --json "$out/cross_layout.json" 2>&1 | tail -6 || true
    timeout 150 python3 -m bench.scan --backends triton mamba_ssm naive_loop "${mamba[@]}" --rep-ms 100 \
        --json "$out/scan_defaults.json" 2>&1 | tail -12 || true
    ;;
vimsweep)
    # (carry .gpu_run/whl) the v1 / v2 tile sweep at the scans of a Vim-S batch-768 step (channel-last u / delta / z,
    # L=50): the defaults were swept on contiguous inputs at batch 128 / 16, and these scans are about 38 % of that
    # step (twenty-fifth session's profile); VIMSWEEP_BATCH sets the batch
    out="${OUT:-/tmp/gpu_scan_out}"
    mkdir -p "$out"
    device_setup
    timeout 540 python3 -m bench.scan --backends triton --shape "${VIMSWEEP_BATCH:-768}" 768 16 50 \
        --layout channel_last --sweep v1 v2 --rep-ms 100 --json "$out/vim_sweep.json" 2>&1 | tail -6 || true
    ;;
chlast)
    # (carry .gpu_run/whl) the channel-last forward default (CHANNEL_LAST_FORWARD, thirty-second session, chosen from
    # a forward-alone sweep): its compiled tests, then the forward widths behind the default backward at a Vim-S
    # batch-512 and batch-768 step's scans
    out="${OUT:-/tmp/gpu_scan_out}"
    mkdir -p "$out"
    device_setup
    gpu_tests chlast_tests 150 tests/test_scan_configs.py tests/test_scan_strides.py
    for batch in 512 768; do
        timeout 120 python3 -m bench.scan_cross --variants v2 v2d16 v2d32 v1d32 \
            --pairs v2:v2 v2d16:v2 v2d32:v2 v1d32:v2 --layout channel_last --shape "$batch" 768 16 50 --rep-ms 60 \
            --json "$out/cross_chlast_b$batch.json" 2>&1 | tail -6 || true
    done
    ;;
bf16states)
    # (carry .gpu_run/whl, .gpu_run/mamba_ssm-*) the chunk states saved in bfloat16 (ScanLaunchConfig.bf16_states):
    # their compiled tests, then bench.scan_cross against float32 states in the same call: the issue's four shapes
    # (contiguous, chunk tiles: v2t against v2tb) beside mamba-ssm, and a Vim-S batch-512 step's scan (channel-last:
    # v2 against v2b)
    begin_with_mamba
    gpu_tests bf16_states_tests 120 tests/test_scan_options.py -k "bf16"
    wait  # the mamba-ssm build
    timeout 200 python3 -m bench.scan_cross --variants v2t v2tb --pairs v2t:v2t v2tb:v2t --rep-ms 60 \
        "${mamba[@]}" --json "$out/cross_bf16_states.json" 2>&1 | tail -14 || true
    timeout 120 python3 -m bench.scan_cross --variants v2 v2b --pairs v2:v2 v2b:v2 --layout channel_last \
        --shape 512 768 16 50 --rep-ms 60 --json "$out/cross_bf16_states_vims.json" 2>&1 | tail -8 || true
    ;;
segments)
    # (carry .gpu_run/whl, .gpu_run/mamba_ssm-*) v2 with sequence segments (ScanLaunchConfig.segments, the
    # twenty-fourth session; timed in the twenty-fifth: slower than unsplit at both shapes) for the small grids: their GPU
    # tests, then bench.scan_cross at batch 16 (L=1024, 4096) with 1 (v2t), 2, 4, 8 and 16 segments both ways, the
    # split forward behind the unsplit backward and the other way round, and the split backward capped at 128
    # registers (offline: 16 resident warps instead of 13, 254 instead of 240 instructions per position, 8
    # local-memory instructions), beside mamba-ssm.
    begin_with_mamba
    gpu_tests segments_tests 120 tests/test_scan_options.py -k "v2_segments"
    wait  # the mamba-ssm build
    timeout 300 python3 -m bench.scan_cross --variants v2t v2s2 v2s4 v2s8 v2s16 v2s4r128 \
        --pairs v2t:v2t v2s2:v2s2 v2s4:v2s4 v2s8:v2s8 v2s16:v2s16 v2s4:v2t v2t:v2s4 v2s4:v2s4r128 \
        --shape 16 768 16 1024 --shape 16 768 16 4096 --rep-ms 60 "${mamba[@]}" \
        --json "$out/cross_segments.json" 2>&1 | tail -4 || true
    ;;
ncu)
    # Nsight Compute on one forward+backward (bench/scan_ncu.py): why warps wait (stall reasons), issue-slot use,
    # occupancy, memory throughput and sectors per request, per kernel; and, per SASS instruction, where the stall
    # samples land ($OUT/<name>_source.csv, when this ncu can print its source page). NCU_SHAPES overrides the list:
    # one line per run, "B D N L [bench.scan_ncu flags]" (--channel_last, --variant v3, --reverse).
    out="${OUT:-/tmp/gpu_scan_out}"
    mkdir -p "$out"
    device_setup
    shapes=${NCU_SHAPES:-$'256 768 16 50 --channel_last\n16 768 16 1024'}
    while read -r b d n l flags; do
        # shellcheck disable=SC2001  # the flags as a file-name suffix: "--variant v3 --channel_last" -> "_variant_v3_channel_last"
        suffix=$(echo "$flags" | sed -e 's/--/_/g' -e 's/ //g')
        name="ncu_${b}_${d}_${n}_${l}${suffix}"
        # shellcheck disable=SC2086  # flags: zero or more words
        timeout 200 ncu --profile-from-start off --kernel-name regex:'_scan_(fwd|bwd)_kernel' \
            --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
            --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
            --section MemoryWorkloadAnalysis_Tables --section SourceCounters --import-source yes \
            -o "$out/$name" -f \
            python3 -m bench.scan_ncu --shape "$b" "$d" "$n" "$l" $flags >"$out/$name.log" 2>&1 \
            || echo "$name: ncu failed or stopped (see $name.log)"
        if [ -f "$out/$name.ncu-rep" ]; then
            ncu --import "$out/$name.ncu-rep" --page details >"$out/$name.txt" 2>&1 || true
            ncu --import "$out/$name.ncu-rep" --page source --csv --print-source sass >"$out/${name}_source.csv" 2>&1 || true
        fi
        echo "== $name"
        grep -E "^  _scan|Duration|Registers Per|Achieved Occupancy|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Memory Throughput|L1/TEX Hit|L2 Hit|Mem Busy" \
            "$out/$name.txt" | head -40 || true
    done <<<"$shapes"
    ;;
*)
    echo "usage: bash bench/gpu_scan_session.sh prepare|sass [flags]|baseline [REV]|run|tests|vim|quick|conv|variants|ncu|layout|vimsweep|chlast|bf16states|segments" >&2
    exit 2
    ;;
esac
