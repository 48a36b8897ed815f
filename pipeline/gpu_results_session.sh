#!/usr/bin/env bash
# The transfer-results table (docs/end_to_end.md) in one GPU call of at most 10 minutes.
#
#   here (CPU, beside ../shared):  bash pipeline/gpu_results_session.sh prepare
#       curates the unlabeled pool from ../shared/data (train shards only travel), writes the Kermany X-rays as
#       96 px grayscale JPEGs with a patient-level val split (kermany.csv), and copies the labeled MedMNIST
#       files, all into .gpu_run/results/ (git-ignored; what travels to the GPU machine is capped at 64 MiB)
#   on the GPU machine:            bash pipeline/gpu_results_session.sh run [extra pipeline.results run flags]
#       (carry .gpu_run/results and .gpu_run/whl) runs pipeline.results with the recipe below under
#       RESULTS_BUDGET_S seconds (default 540) and writes $OUT/runs.json, $OUT/table.md and $OUT/logs.tar.gz
#       (every stage's log); $OUT/runs.json is refreshed every 10 s, so a call stopped at its time limit still
#       returns the rows finished by then. The fine-tunes use the class-weighted loss (--ft_class_weighted); FT_CLASS_WEIGHTED=0
#       drops it (e.g. to compare the unweighted loss under the same recipe); any other value or unset keeps it.
#       The MAE pretrainings read the pool decoded once onto the GPU (--pretrain_data_on_device, about 63 MB);
#       PRETRAIN_DATA_ON_DEVICE=0 streams it through loader workers instead, as the twelfth session's runs did.
#       The stages work in RESULTS_RUN_DIR (default /tmp/results_run), which the recorded commands name
#       (--output_dir, --finetune): a runs.json is reused only under the directory it was recorded in
#   Several GPUs: the recipe's --jobs 4 stages are spread over every GPU the call sees (pipeline.results run
#       --gpus, by default the ids of CUDA_VISIBLE_DEVICES or all GPUs): each stage sees one GPU, the least loaded,
#       at most ceil(4 / GPUs) per GPU (two pretrainings on two GPUs: one each); `run --gpus 1` keeps to GPU 1.
#       Or two sessions side by side, one per GPU, each with its own work directory and output, e.g.
#         export RESULTS_BUDGET_S=540
#         CUDA_VISIBLE_DEVICES=0 RESULTS_RUN_DIR=/tmp/results_a OUT=/tmp/out_a \
#             bash pipeline/gpu_results_session.sh run --encoders vit_small_patch8 --jobs 2 --num_workers 4 &
#         sleep 30  # both install .gpu_run/whl: let the first finish that
#         CUDA_VISIBLE_DEVICES=1 RESULTS_RUN_DIR=/tmp/results_b OUT=/tmp/out_b \
#             bash pipeline/gpu_results_session.sh run --encoders vim_small_patch8 --jobs 2 --num_workers 4
#         wait
#       Each writes its own runs.json (merge the two lists by hand); --jobs 2 each keeps the machine's cores
#       as busy as one session's --jobs 4.
#   Split over several calls (a machine's files do not outlive it): run one encoder per call
#   (`run --encoders vit_small_patch8`), and copy each call's returned runs.json to .gpu_run/results/runs.json
#   before the next; a call starts from that file, keeps its finished rows and adds its own.
set -euo pipefail
cd "$(dirname "$0")/.."
data=.gpu_run/results

case "${1:-}" in
prepare)
    shared=../shared/data
    # The project's environment (README quick start) when there is one here.
    py=python3
    if [ -x .venv/bin/python ]; then
        py=.venv/bin/python
    fi
    mkdir -p "$data"
    rm -rf "$data/pool"
    # BreastMNIST and AdrenalMNIST3D at their 64 px / 28 px releases; the 64 px AdrenalMNIST3D slices would
    # not fit the transfer limit.
    "$py" -m data_curation.cli "$shared/medmnist/pneumoniamnist.npz" "$shared/medmnist/breastmnist_64.npz" \
        "$shared/medmnist/adrenalmnist3d.npz" "$shared/xray/kermany_cxr_224/train" "$shared/nifti/dipy" \
        --output "$data/pool" --size_policy max:64 --workers 2
    # MAE pretraining reads only the train split; the val / test shards stay here.
    rm -f "$data"/pool/shards/val-* "$data"/pool/shards/test-* "$data/pool/.curate_state.jsonl"
    "$py" - "$shared/xray/kermany_cxr_224" "$data/kermany96" <<'PY'
import sys
from pathlib import Path
from PIL import Image
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for f in sorted(src.glob("*/*/*.jpeg")):
    out = dst / f.relative_to(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.open(f).convert("L").resize((96, 96), Image.BICUBIC).save(out, quality=95)
PY
    "$py" -m pipeline.results kermany-csv "$data/kermany96" "$data/kermany.csv" --val_fraction 0.1
    cp "$shared/medmnist/breastmnist_64.npz" "$shared/medmnist/pneumoniamnist.npz" "$data/"
    # The published rows the table shows beside ours (a few KB of CSV).
    mkdir -p "$data/benchmarks"
    cp "$shared"/benchmarks/*.csv "$data/benchmarks/"
    du -sh .gpu_run
    ;;
run)
    shift
    out="${OUT:-/tmp/gpu_results_out}"
    res="${RESULTS_RUN_DIR:-/tmp/results_run}"
    mkdir -p "$out" "$res"
    if [ -f "$data/runs.json" ]; then
        cp "$data/runs.json" "$res/runs.json"
    fi
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    if [ -d .gpu_run/whl ]; then
        python3 -m pip install -q --no-index --no-deps .gpu_run/whl/*.whl
    fi
    # Class-weighted fine-tuning stays the default (unweighted, imbalanced BreastMNIST can collapse to the
    # majority class); FT_CLASS_WEIGHTED=0 turns it off without editing the recipe.
    class_weighted=(--ft_class_weighted)
    if [ "${FT_CLASS_WEIGHTED:-1}" = 0 ]; then
        class_weighted=()
    fi
    on_device=(--pretrain_data_on_device)
    if [ "${PRETRAIN_DATA_ON_DEVICE:-1}" = 0 ]; then
        on_device=()
    fi
    # A call stopped at its time limit still returns the rows finished so far: runs.json is rewritten after every
    # stage, and this copies it into the returned folder every 10 s.
    (while sleep 10; do cp "$res/runs.json" "$out/runs.json" 2>/dev/null || true; done) &
    copier=$!
    trap 'kill "$copier" 2>/dev/null || true' EXIT
    # 8-pixel patches: a 64 px image is 64 tokens (16 visible under 75 % masking) instead of 16.
    python3 -m pipeline.results run --pool "$data/pool" \
        --datasets "$data/breastmnist_64.npz" "$data/pneumoniamnist.npz" "$data/kermany.csv" --out "$res" \
        --input_size 64 --encoders vit_small_patch8 vim_small_patch8 --pretrain_epochs 16 --ft_epochs 30 \
        --ft_min_steps 500 "${class_weighted[@]}" "${on_device[@]}" --probe_epochs 90 --jobs 4 --num_workers 4 \
        --time_budget_s "${RESULTS_BUDGET_S:-540}" "$@" || true
    kill "$copier" 2>/dev/null || true
    cp "$res/runs.json" "$out/" || true
    benchmarks=()
    if [ -d "$data/benchmarks" ]; then
        benchmarks=(--benchmarks "$data/benchmarks")
    fi
    python3 -m pipeline.results table "$res" --input_size 64 "${benchmarks[@]}" | tee "$out/table.md" || true
    (cd "$res" && find . -name '*.log' -o -name 'log.jsonl' -o -name 'results.json' | tar -czf "$out/logs.tar.gz" -T -) || true
    ;;
*)
    echo "usage: bash pipeline/gpu_results_session.sh prepare|run [flags]" >&2
    exit 2
    ;;
esac
