#!/usr/bin/env bash
# A short two-GPU check of `pipeline.results run --pretrain_gpus 2` before a long call relies on it (about 3 minutes
# on two H100 / H200): the transfer table's ViT-S/8 MAE pretraining (batch 1024, the pool held on the GPU) for
# PRETRAIN_EPOCHS (default 16) epochs, once on one GPU and once as DDP on two at the same global batch, each followed
# by one short BreastMNIST probe so the pipeline's whole path runs. Prints both runs' img/s and loss, epoch by epoch.
#   carry .gpu_run/results and .gpu_run/whl (pipeline/gpu_results_session.sh prepare); on a two-GPU kind
#   writes $OUT/ddp_check_{1,2}gpu.jsonl (each run's pretraining log) and $OUT/ddp_check.log
set -u
cd "$(dirname "$0")/.." || exit 1
out="${OUT:-/tmp/gpu_ddp_out}"
data=.gpu_run/results
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ -d .gpu_run/whl ]; then
    python3 -m pip install -q --no-index --no-deps .gpu_run/whl/*.whl
fi
for gpus in 1 2; do
    work=/tmp/ddp_check_${gpus}gpu
    rm -rf "$work"
    timeout 240 python3 -m pipeline.results run --pool "$data/pool" --datasets "$data/breastmnist_64.npz" \
        --out "$work" --input_size 64 --encoders vit_small_patch8 --inits mae --protocols linprobe \
        --pretrain_epochs "${PRETRAIN_EPOCHS:-16}" --batch_size 1024 --pretrain_data_on_device --probe_epochs 5 \
        --num_workers 8 --pretrain_gpus "$gpus" --no_preflight >>"$out/ddp_check.log" 2>&1
    echo "== $gpus GPU(s): exit $?"
    cp "$work/pretrain/vit_small_patch8/log.jsonl" "$out/ddp_check_${gpus}gpu.jsonl" 2>/dev/null \
        || tail -20 "$out/ddp_check.log"
done
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path

runs = {}
for gpus in (1, 2):
    path = Path(sys.argv[1]) / f"ddp_check_{gpus}gpu.jsonl"
    if path.exists():
        runs[gpus] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
for gpus, rows in runs.items():
    steady = [r["img_per_s"] for r in rows[len(rows) // 5:] if "img_per_s" in r]
    print(f"{gpus} GPU(s): {len(rows)} log rows, final loss {rows[-1].get('loss')}, median img/s after the first "
          f"fifth {sorted(steady)[len(steady) // 2] if steady else 'n/a'}")
if len(runs) == 2:
    for a, b in zip(runs[1], runs[2]):
        print(f"step {a.get('step')}: loss 1 GPU {a.get('loss'):.4f}, 2 GPUs {b.get('loss'):.4f}")
PY
