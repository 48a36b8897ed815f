#!/usr/bin/env bash
# One device call of at most 10 minutes for the transfer table (docs/end_to_end.md): the
# MAE pretraining and transfer rows of pipeline/gpu_results_session.sh (EPOCHS, default 320, and linear probes on
# the last four blocks), two BreastMNIST fine-tunes on the same encoder that select by accuracy (the target's
# metric) with the unweighted loss, once plain and once with an EMA of the weights, and the encoder itself in
# bfloat16, split into 15 MB parts under $OUT (returned files are capped at 16 MiB each) for CPU-side probing.
#   carry .gpu_run/results and .gpu_run/whl (see gpu_results_session.sh prepare); BUDGET: the results budget (s);
#   PRETRAIN_GPUS=2 (on a two-GPU kind): the pretraining as DDP on both GPUs at the same global batch (the later
#   stages spread over both), so that EPOCHS=640 fits the call
set -u
cd "$(dirname "$0")/.." || exit 1
out="${OUT:-/tmp/gpu_transfer_out}"
encoder="${RESULTS_RUN_DIR:-/tmp/results_run}/pretrain/vit_small_patch8/encoder.safetensors"
extra=/tmp/extra
mkdir -p "$out" "$extra"

# breast_finetune NAME [finetune flags]: a BreastMNIST fine-tune of the pretrained encoder into $extra/NAME.
breast_finetune() {
    local name=$1
    shift
    timeout 200 python3 -m finetune.main --data_path .gpu_run/results/breastmnist_64.npz --nb_classes 2 \
        --finetune "$encoder" --model vit_small_patch8 --epochs 125 --warmup_epochs 5 --batch_size 128 --blr 0.001 \
        --layer_decay 0.75 --select_metric acc --aa none --reprob 0 --smoothing 0 --input_size 64 --in_chans 1 \
        --num_workers 3 --output_dir "$extra/$name" "$@" >"$extra/$name.log" 2>&1
}

# The fine-tunes start once the pretraining has written its encoder (polled for up to 10 minutes).
(
    for _ in $(seq 1 300); do
        [ -f "$encoder" ] && break
        sleep 2
    done
    sleep 3
    if [ -f "$encoder" ]; then
        breast_finetune breast_acc &
        breast_finetune breast_acc_ema --model_ema --model_ema_decay 0.99 &
        wait
    fi
) &
OUT="$out" RESULTS_BUDGET_S="${BUDGET:-520}" bash pipeline/gpu_results_session.sh run --encoders vit_small_patch8 \
    --ft_recipe light --pretrain_epochs "${EPOCHS:-320}" --batch_size 1024 --num_workers 8 --ft_layer_decay 0.75 \
    --ft_blr 1e-3 --inits mae --probe_n_last_blocks 4 --pretrain_gpus "${PRETRAIN_GPUS:-1}" --no_preflight 2>&1 |
    tail -45
wait
for name in breast_acc breast_acc_ema; do
    echo "== $name"
    tail -2 "$extra/$name.log"
done
if [ -f "$encoder" ]; then
    python3 - "$encoder" "$extra/enc_bf16.safetensors" <<'PY'
import sys, torch
from safetensors.torch import load_file, save_file
sd = load_file(sys.argv[1])
save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}, sys.argv[2])
PY
    cp "${encoder%.safetensors}.json" "$extra/" 2>/dev/null
    split -b 15M -d "$extra/enc_bf16.safetensors" "$out/enc_bf16.part"
    rm "$extra/enc_bf16.safetensors"
fi
find "$extra" \( -name '*.safetensors' -o -name '*.pt' \) -delete
tar -czf "$out/extra.tar.gz" -C "$extra" .
ls -la "$out"
