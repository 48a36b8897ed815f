#!/usr/bin/env bash
# The pretraining step's GPU checks in one call each (bench/gpu_scan_session.sh is the scan kernels'):
#
#   here (CPU):              bash bench/gpu_scan_session.sh prepare      (.gpu_run/whl)
#                            bash bench/gpu_scan_session.sh baseline REV (.gpu_run/baseline: the revision to beat)
#   on the GPU machine:      bash bench/gpu_pretrain_session.sh PART...  (PARTs in the order given:)
#   tests  (carry .gpu_run/whl) the gpu-marked tests of the pretraining loop; $OUT/gpu_tests.log
#   vitb   (carry .gpu_run/whl, .gpu_run/baseline) ViT-B/16 MAE (224 px, batch 256, synthetic, --compile)
#       here and in the baseline revision in the order A B B A on one fresh machine, then this tree's step with CUDA
#       graphs (GEMM autotuning, max-autotune-no-cudagraphs, did not finish compiling in 288 s: see `inductor`);
#       $OUT/vitb_*.json, $OUT/clocks.log
#   cache  the same ViT-B row compiled afresh, then loaded from inductor's caches by a new process, then with the
#       caches off, then loaded again: whether a cached compile steps slower (the host, not the GPU)
#   inductor  the compiled ViT-B row with inductor's coordinate-descent tuning and with autotuned pointwise /
#       reduction kernels, beside the default
#   vims   Vim-S/16 with CUDA graphs at batch 256, 384 and 512 (synthetic)
#   vimsab  (carry .gpu_run/whl, .gpu_run/baseline) the compiled Vim-S/16 step at batch 512 here, in the baseline
#       revision, then here again, on one machine: a kernel change's effect on the step, same call; $OUT/vimsab_*.json
#   augment  (carry .gpu_run/whl) the fused crop-resize kernel's tests on CUDA, bench.augment, then the compiled Vim-S/16
#       step at batch 512 with the augmentation on grid_sample and on the kernel; $OUT/augment*.json
#   vimsprof  Vim-S/16 at batch 512, --compile, profiled after its timed steps: device ms by kernel kind and its 80
#       busiest kernels in $OUT/vimsprof_b512.json (the fused kernels the twenty-fifth session saw only as a lump)
#   attention  our packed-projection attention kernels (kernels/triton_attention.py): their CUDA tests, bench.attention
#       at ATTN_SHAPES (default SDPA against triton, with the triton-vs-SDPA differences; with .gpu_run/baseline
#       carried, the baseline revision's kernels too: a revision from 635dd48 on, for --shapes), then the compiled
#       ViT-B/16 (batch 256) and Vim-S/16 (batch 512) steps on SDPA and on triton; $OUT/attention*.json,
#       $OUT/attn_*.json
#   vimsattn  the compiled Vim-S/16 step at batch 512 on SDPA and on triton, 230 s per row (VIMS_ROW_S), then on
#       triton under CUDA graphs in what is left of the call
#   vimsbest  vimsattn's two rows on our kernels (without the SDPA row), for a short call
#   vitbattngraphs  the compiled ViT-B/16 step (batch 256) under CUDA graphs on SDPA, auto and triton
#   vitbauto  the compiled ViT-B/16 step (batch VITB_ATTN_BATCH, 256) on each of VITB_ATTN_BACKENDS (sdpa auto), the
#       attention backends
#   vitbhost  the compiled ViT-B/16 step (batch 256) on SDPA and on our attention kernels, each profiled after its
#       timed steps (device ms against wall ms: is ours host-bound?), then ours under CUDA graphs; $OUT/vitb_host_*.json
#   vitbcode  the compiled ViT-B/16 step at batch VITB_CODE_BATCH (1536) with inductor's caches in a fresh folder;
#       the generated wrapper modules (the forward's and backward's kernels by name, with the ops each fuses) in
#       $OUT/vitb_output_code.tar.gz, to name the step's unexplained kernels of a profile
#   vimb1024  the compiled Vim-B/16 step at 1024 px (batch 16, synthetic) on SDPA and on the default attention (auto:
#       our kernels, in the 4,097-token decoder), in the order VIMB_ORDER (sdpa auto auto sdpa); $OUT/vimb1024_*.json
#   bigbatch  (carry .gpu_run/whl, .gpu_run/results/pool) ViT-B/16 with the real loader at batch 1536, then the
#       Vim-S/16 step under CUDA graphs at batch 768 (BIG_VITB_BATCH, BIG_VIMS_BATCH; 0 skips the row); both with
#       --precision BIG_PRECISION when set (e.g. bf16_weights)
#   bf16w  --precision bf16_weights (the model in bf16, float32 master weights) against bf16 autocast: the compiled
#       ViT-B/16 step (batch 256, synthetic) in the order A B B A on one machine, the second pair profiled, then the
#       mode's CUDA tests in what is left; $OUT/vitb_bf16w_*.json, $OUT/bf16w_tests.log
#   bf16wvims  the same pair for the compiled Vim-S/16 step at batch 512 (our attention kernels in the decoder)
#   bf16wloop  (carry .gpu_run/whl, .gpu_run/results/pool) the issue's real-loader ViT-B/16 row (accelerate launch
#       pretrain/main.py, --compile, 64 px canvases, 12 workers) on autocast and on bf16_weights through bench.scaling
#       (variants 1gpu and 1gpu_bf16w: same data order, speed-up and loss curves side by side), global batch
#       BF16W_LOOP_BATCH (1024), 150 steps each; $OUT/loop_bf16w.json
#   loop   (carry .gpu_run/whl, .gpu_run/results/pool) the user's command with the real loader (accelerate launch
#       pretrain/main.py through bench.scaling's 1gpu variant, shards in .gpu_run/results/pool, 64 px canvases, 12
#       workers): Vim-S/16 at batch 256 with CUDA graphs, ViT-B/16 at batch 1024 with --compile (the row of the
#       issue's 6,500 img/s target), then ViT-B with LOOP_VITB_MODE (default reduce-overhead; empty: none);
#       $OUT/loop_*.json
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

# bounded_limit NAME LIMIT_S MIN_S: prints LIMIT_S cut to what is left of the call and logs the clocks; fails (with a
# note) when less than MIN_S is left.
bounded_limit() {
    local left=$((CALL_BUDGET_S - SECONDS))
    if [ "$left" -lt "$3" ]; then
        echo "$1: skipped, $left s left in the call" >&2
        return 1
    fi
    clocks "before $1" >&2
    echo $(($2 < left ? $2 : left))
}

# model_row TREE NAME LIMIT_S MODEL BATCH [bench.pretrain flags]: one compiled 224 px row (synthetic data) from
# TREE's own code; vitb_row TREE NAME LIMIT_S [flags]: ViT-B/16 at batch 256.
model_row() {
    local tree=$1 name=$2 model=$4 batch=$5 limit
    limit=$(bounded_limit "$name" "$3" 30) || return 0
    shift 5
    (cd "$tree" && timeout "$limit" python3 -m bench.pretrain --models "$model" --input_sizes 224 \
        --batch_size "$batch" --modes synthetic --steps 60 --row_seconds 10 --compile "$@" --json "$out/$name.json" \
        2>&1 | grep -E "^synthetic ") || echo "$name: no row (limit $limit s)"
}

vitb_row() {
    local tree=$1 name=$2 limit=$3
    shift 3
    model_row "$tree" "vitb_$name" "$limit" mae_vit_base_patch16 256 "$@"
}

# loop_run NAME LIMIT_S MODEL GLOBAL_BATCH STEPS [pretrain flags]: one real-loader run through accelerate launch.
loop_run() {
    local name=$1 model=$3 batch=$4 steps=$5 limit
    limit=$(bounded_limit "$name" "$2" 60) || return 0
    shift 5
    timeout "$limit" python3 -m bench.scaling --data_path .gpu_run/results/pool --output_dir "/tmp/loop_$name" \
        --variants 1gpu --model "$model" --in_chans 1 --global_batch "$batch" --steps "$steps" --epochs 400 \
        --warmup_epochs 40 --num_workers 12 --log_every 10 --plot none --json "$out/loop_$name.json" \
        -- --canvas_size 64 "$@" 2>&1 | grep -vE "^\[scaling\] 1gpu:" | tail -6 \
        || echo "$name: stopped (limit $limit s)"
    cp "/tmp/loop_$name/1gpu/log.jsonl" "$out/loop_${name}_log.jsonl" 2>/dev/null || true
}

# vims_ours_rows: the compiled Vim-S/16 step at batch 512 on our attention kernels, then (inductor's caches warm by
# now) the same step under CUDA graphs in what is left of the call.
vims_ours_rows() {
    model_row . vims_attn_triton "${VIMS_ROW_S:-230}" mae_vim_small_patch16 512 --attention_backend triton
    model_row . vims_attn_triton_graphs 230 mae_vim_small_patch16 512 --attention_backend triton \
        --compile_mode reduce-overhead
}

# run_tests: the gpu-marked tests of the pretraining loop (CUDA graphs through pretrain/main.py among them).
run_tests() {
    local rc=0
    timeout 180 python3 -m pytest -q -ra -m gpu tests/test_pretrain.py tests/test_pretrain_bf16_weights.py "${xdist[@]}" \
        >"$out/gpu_tests.log" 2>&1 \
        || rc=$?
    tail -4 "$out/gpu_tests.log"
    if [ "$rc" = 124 ]; then
        echo "tests: stopped by their limit"
    fi
}

if [ $# -eq 0 ]; then
    echo "usage: bash bench/gpu_pretrain_session.sh PART... (PART: tests, vitb, cache, inductor, vims, vimsab, augment, vimsprof, attention, vimsattn, vimsbest, vitbattngraphs, vitbauto, vitbhost, vitbcode, vimb1024, bigbatch, bf16w, bf16wvims, bf16wloop, loop)" >&2
    exit 2
fi
out="${OUT:-/tmp/gpu_pretrain_out}"
mkdir -p "$out"
device_setup
base=.gpu_run/baseline
for part in "$@"; do
    echo "== $part (at $SECONDS s)"
    case "$part" in
    tests)
        run_tests
        ;;
    vitb)
        [ -f "$base/REVISION" ] && echo "baseline revision $(cat "$base/REVISION")"
        vitb_row . new_a 150
        [ -f "$base/REVISION" ] && vitb_row "$base" base_a 150
        [ -f "$base/REVISION" ] && vitb_row "$base" base_b 90
        vitb_row . new_b 100 --profile_steps 2  # profiled after its timed steps: device ms by kernel kind
        vitb_row . cudagraphs 120 --compile_mode reduce-overhead
        ;;
    cache)
        # Is a compiled step slower when inductor loads it from its caches? (twenty-first session: a step handed
        # back by AOTAutograd's cache ran at 79.6 ms, host-bound, against 56.2 ms; common.torch_compile now turns
        # that cache off, so cache_hit should match cache_cold.)
        vitb_row . cache_cold 150
        vitb_row . cache_hit 90
        TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0 vitb_row . cache_off 150
        [ -n "${CACHE_REPEAT:-}" ] && vitb_row . cache_hit2 90
        ;;
    inductor)
        # Inductor's cheaper tuning knobs on the compiled ViT-B step (its fused elementwise and reduction kernels
        # took 17.8 of 54 ms in the twenty-first session's profile): the default, then coordinate-descent tuning of
        # every Triton kernel's launch configuration, then autotuned pointwise / reduction configurations (not the
        # GEMM templates whose autotuning did not finish in 288 s).
        vitb_row . inductor_default 150
        TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 vitb_row . inductor_coordinate_descent 240
        TORCHINDUCTOR_MAX_AUTOTUNE_POINTWISE=1 vitb_row . inductor_autotune_pointwise 240
        ;;
    vims)
        # Vim-S/16 with CUDA graphs at three batch sizes (the target is img/s at any batch; the scans' grids and
        # the GEMMs grow with it).
        for batch in 256 384 512; do
            model_row . "vims_b$batch" 200 mae_vim_small_patch16 "$batch" --compile_mode reduce-overhead
        done
        ;;
    vimsab)
        [ -f "$base/REVISION" ] && echo "baseline revision $(cat "$base/REVISION")"
        model_row . vimsab_new_a 200 mae_vim_small_patch16 512
        [ -f "$base/REVISION" ] && model_row "$base" vimsab_base 180 mae_vim_small_patch16 512
        model_row . vimsab_new_b 150 mae_vim_small_patch16 512
        ;;
    augment)
        # The fused crop-resize-normalise kernel (kernels/triton_resample.py): its tests on CUDA, bench.augment
        # (against affine_grid + grid_sample), then the compiled Vim-S step at batch 512 with each (same call).
        # Not tests/test_data.py: it reads ../shared/data, which the call does not carry (13 of 16 failed for it).
        timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_resample.py >"$out/augment_tests.log" 2>&1 \
            || true
        tail -3 "$out/augment_tests.log"
        timeout 60 python3 -m bench.augment --json "$out/augment.json" || true
        model_row . augment_vims_torch 180 mae_vim_small_patch16 512 --augment_backend torch
        model_row . augment_vims_triton 140 mae_vim_small_patch16 512 --augment_backend triton
        ;;
    vimsprof)
        model_row . vimsprof_b512 240 mae_vim_small_patch16 512 --steps 20 --row_seconds 5 --profile_steps 2
        ;;
    attention)
        timeout 120 python3 -m pytest -q -p no:cacheprovider "${xdist[@]}" tests/test_attention_triton.py 2>&1 \
            | tail -4 || true
        # ATTN_SHAPES: bench.attention's NAME:BATCH:TOKENS:DIM:HEADS rows (default: the MAE encoders and decoder, and
        # Vim-B's decoder at 1,024 px); ATTN_LAUNCHES: BLOCK_M:BLOCK_N:WARPS:STAGES tilings timed beside the defaults
        shapes=${ATTN_SHAPES:-vitb_enc:512:50:768:12 dec197:512:197:512:16 vits_enc:256:50:384:6 \
            vimb1024_dec:16:4097:512:16}
        # shellcheck disable=SC2086  # word lists
        timeout 150 python3 -m bench.attention --backends default triton --shapes $shapes \
            --launches ${ATTN_LAUNCHES:-64:64:4:2 128:64:4:3 64:64:4:3} --json "$out/attention.json" || true
        if [ -f "$base/kernels/triton_attention.py" ]; then  # the same kernels' timings in the baseline revision
            # shellcheck disable=SC2086
            (cd "$base" && timeout 100 python3 -m bench.attention --backends triton --shapes $shapes \
                --json "$out/attention_baseline_$(cat REVISION).json") || true
        fi
        vitb_row . attn_sdpa 120 --attention_backend sdpa
        vitb_row . attn_triton 120 --attention_backend triton
        model_row . vims_attn_sdpa 120 mae_vim_small_patch16 512 --attention_backend sdpa
        model_row . vims_attn_triton 120 mae_vim_small_patch16 512 --attention_backend triton
        ;;
    vimsattn)
        # The compiled Vim-S step at batch 512 on SDPA and on our attention kernels alone (the first row compiles the
        # graph afresh: on a fresh machine it needs more than the attention part's 120 s)
        model_row . vims_attn_sdpa "${VIMS_ROW_S:-230}" mae_vim_small_patch16 512 --attention_backend sdpa
        vims_ours_rows
        ;;
    vimsbest)
        # vimsattn without its SDPA row, for a short call (the best Vim-S configuration so far, for the target's
        # machine)
        vims_ours_rows
        ;;
    vitbattngraphs)
        # ViT-B's compiled step under CUDA graphs on SDPA, on auto (the default) and on our kernels everywhere: with
        # plain --compile the step is within 2 ms of its kernels' 54, so a custom op's host cost per call can show as
        # GPU time lost (twenty-eighth session: ours everywhere -1.5 %); graphs take the host out
        vitb_row . attn_sdpa_graphs 150 --compile_mode reduce-overhead --attention_backend sdpa
        vitb_row . attn_auto_graphs 150 --compile_mode reduce-overhead --attention_backend auto
        vitb_row . attn_triton_graphs 150 --compile_mode reduce-overhead --attention_backend triton
        ;;
    vitbhost)
        # Is the compiled ViT-B step on our attention kernels bound by the host? (thirty-ninth session, one H100: ours
        # everywhere 4,642 img/s against SDPA's 4,813 at batch 256, where the thirty-seventh session's H100 read 5,202
        # against 4,800, while the attention alone was as fast.) Each backend's step is profiled after its timed steps
        # (device ms per step by kernel kind, beside the step's wall ms), then ours under CUDA graphs (no host).
        vitb_row . host_sdpa 150 --attention_backend sdpa --profile_steps 2
        vitb_row . host_triton 150 --attention_backend triton --profile_steps 2
        vitb_row . host_triton_graphs 150 --attention_backend triton --compile_mode reduce-overhead
        ;;
    vitbcode)
        code_dir=/tmp/vitb_inductor_code
        rm -rf "$code_dir"
        TORCHINDUCTOR_CACHE_DIR="$code_dir" TORCHINDUCTOR_FX_GRAPH_CACHE=0 \
            model_row . vitb_code 240 mae_vit_base_patch16 "${VITB_CODE_BATCH:-1536}"
        # the wrapper modules: the generated .py files with the step's call (a function or, in newer torch, Runner.call)
        grep -rlE --include='*.py' '^(def call\(|class Runner)' "$code_dir" | tar -czf "$out/vitb_output_code.tar.gz" -T - \
            || echo "vitbcode: no output code found"
        ;;
    vitbauto)
        # ViT-B's compiled step on each of VITB_ATTN_BACKENDS (default "sdpa auto": auto runs our kernels on CUDA
        # wherever they apply, since the thirty-seventh session) at batch VITB_ATTN_BATCH (256)
        for backend in ${VITB_ATTN_BACKENDS:-sdpa auto}; do
            model_row . "vitb_attn_${backend}_b${VITB_ATTN_BATCH:-256}" 150 mae_vit_base_patch16 "${VITB_ATTN_BATCH:-256}" \
                --attention_backend "$backend"
        done
        ;;
    vimb1024)
        # VIMB_ORDER (default "sdpa auto auto sdpa"): the thirty-eighth session's two rows ran auto first, from an
        # idle GPU, and disagreed with the attention's own timing; pairs in both orders tell a backend from a row slot
        i=0
        for backend in ${VIMB_ORDER:-sdpa auto auto sdpa}; do
            i=$((i + 1))
            model_row . "vimb1024_attn_${backend}_$i" 150 mae_vim_base_patch16 16 --input_sizes 1024 \
                --attention_backend "$backend"
        done
        ;;
    bigbatch)
        # Larger batches than the best rows so far (img/s grew with the batch: ViT-B 4,816 synthetic at 256 against
        # 5,351 real-loader at 1024; Vim-S 3,058 -> 3,192 from 256 to 512): ViT-B with the real loader at
        # BIG_VITB_BATCH (1536: about 72 GiB by the batch-256 row's 13 GiB), then Vim-S under CUDA graphs on our
        # attention kernels at BIG_VIMS_BATCH (768: about 57 GiB by the batch-512 row's 38 GiB)
        vitb_big=${BIG_VITB_BATCH:-1536}
        vims_big=${BIG_VIMS_BATCH:-768}
        big_flags=()
        if [ -n "${BIG_PRECISION:-}" ]; then
            big_flags=(--precision "$BIG_PRECISION")
        fi
        if [ "$vitb_big" -gt 0 ]; then  # 0: skip the row
            loop_run "vitb_b$vitb_big${BIG_PRECISION:+_$BIG_PRECISION}" 280 mae_vit_base_patch16 "$vitb_big" 100 \
                --compile "${big_flags[@]}"
        fi
        if [ "$vims_big" -gt 0 ]; then
            model_row . "vims_b${vims_big}_graphs${BIG_PRECISION:+_$BIG_PRECISION}" 280 mae_vim_small_patch16 \
                "$vims_big" --attention_backend triton --compile_mode reduce-overhead "${big_flags[@]}"
        fi
        ;;
    bf16w)
        # The fifth session's ZeRO-2 runs (DeepSpeed's bf16 weights, no autocast) stepped 12 % faster than the
        # autocast model (eager, one H200); is it so compiled, where inductor fuses autocast's casts?
        vitb_row . bf16w_autocast_a 150
        vitb_row . bf16w_weights_a 150 --precision bf16_weights
        # the second pair profiled after its timed steps: device ms per step by kernel kind, to see which kinds moved
        vitb_row . bf16w_weights_b 100 --precision bf16_weights --profile_steps 2
        vitb_row . bf16w_autocast_b 100 --profile_steps 2
        # then the mode's CUDA tests (CUDA graphs with accumulation) in what is left of the call
        if limit=$(bounded_limit bf16w_tests 150 40); then
            timeout "$limit" python3 -m pytest -q -ra -m gpu tests/test_pretrain_bf16_weights.py "${xdist[@]}" \
                >"$out/bf16w_tests.log" 2>&1 || true
            tail -3 "$out/bf16w_tests.log"
        fi
        ;;
    bf16wloop)
        if limit=$(bounded_limit bf16wloop 540 120); then
            timeout "$limit" python3 -m bench.scaling --data_path .gpu_run/results/pool --output_dir /tmp/loop_bf16w \
                --variants 1gpu 1gpu_bf16w --model mae_vit_base_patch16 --in_chans 1 \
                --global_batch "${BF16W_LOOP_BATCH:-1024}" --steps 150 --epochs 400 --warmup_epochs 40 \
                --num_workers 12 --log_every 10 --plot none --json "$out/loop_bf16w.json" \
                -- --canvas_size 64 --compile 2>&1 | tail -8 || echo "bf16wloop: stopped (limit $limit s)"
        fi
        ;;
    bf16wvims)
        model_row . vims_bf16w_autocast 200 mae_vim_small_patch16 512 --attention_backend triton
        model_row . vims_bf16w_weights 200 mae_vim_small_patch16 512 --attention_backend triton \
            --precision bf16_weights
        ;;
    loop)
        loop_run vims_cudagraphs 220 mae_vim_small_patch16 256 300 --compile --compile_mode reduce-overhead
        loop_run vitb_compiled 240 mae_vit_base_patch16 1024 150 --compile
        vitb_mode=${LOOP_VITB_MODE-reduce-overhead}  # set but empty: no third run
        if [ -n "$vitb_mode" ]; then
            loop_run "vitb_$vitb_mode" 240 mae_vit_base_patch16 1024 150 --compile --compile_mode "$vitb_mode"
        fi
        ;;
    *)
        echo "unknown part $part (tests, vitb, cache, inductor, vims, vimsab, augment, vimsprof, attention, vimsattn, vimsbest, vitbattngraphs, vitbauto, vitbhost, vitbcode, vimb1024, bigbatch, bf16w, bf16wvims, bf16wloop, loop)" >&2
        exit 2
        ;;
    esac
done
clocks "end"
