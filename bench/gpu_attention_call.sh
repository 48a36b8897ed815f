#!/usr/bin/env bash
# One device call (about 5 minutes) for the attention half of the pretraining step: bench/attention.py (every q / k / v
# layout x every SDPA backend at the MAE shapes), then full ViT-B/16 (batch 512) and Vim-S/16 (batch 256) MAE steps,
# synthetic data, eager, at the layout x backend pairs that matter, then ViT-B/16 compiled at the default and at
# the fastest eager pair's settings given as BEST_LAYOUT / BEST_SDPA (default: tokens_first / default).
#   carry .gpu_run/whl (webdataset, braceexpand: bench.pretrain imports the data package)
#   writes $OUT/attention.json and $OUT/step_*.json
set -u
cd "$(dirname "$0")/.." || exit 1
out="${OUT:-/tmp/gpu_attention_out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ -d .gpu_run/whl ]; then
    python3 -m pip install -q --no-index --no-deps .gpu_run/whl/*.whl
fi
timeout 120 python3 -m bench.attention --json "$out/attention.json" 2>&1 | grep -v Warning
step() {  # name, timeout, bench.pretrain flags
    name=$1; limit=$2; shift 2
    timeout "$limit" python3 -m bench.pretrain --modes synthetic --input_sizes 224 --row_seconds 6 \
        --json "$out/step_$name.json" "$@" 2>&1 | grep -E "^(synthetic|mode) " || echo "$name: no row"
}
for pair in heads_first:default heads_first:flash heads_first:efficient tokens_first:default tokens_first:flash; do
    layout=${pair%:*}; sdpa=${pair#*:}
    step "vit_b_${layout}_${sdpa}" 40 --models mae_vit_base_patch16 --batch_size 512 --qkv_layout "$layout" \
        --sdpa_backend "$sdpa"
done
step vim_s_heads_first 45 --models mae_vim_small_patch16 --batch_size 256 --qkv_layout heads_first
step vim_s_tokens_first 45 --models mae_vim_small_patch16 --batch_size 256 --qkv_layout tokens_first
step vit_b_compiled_heads_first 130 --models mae_vit_base_patch16 --batch_size 512 --compile --qkv_layout heads_first
step vit_b_compiled_best 130 --models mae_vit_base_patch16 --batch_size 512 --compile \
    --qkv_layout "${BEST_LAYOUT:-tokens_first}" --sdpa_backend "${BEST_SDPA:-default}"
