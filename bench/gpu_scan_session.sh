#!/usr/bin/env bash
# The scan kernels' GPU check in one call: every gpu-marked scan test (all kernel variants), then bench/scan.py
# with mamba-ssm's CUDA scan built from its sdist beside ours and the tile sweep.
#
#   here (CPU, with network):  bash bench/gpu_scan_session.sh prepare
#       downloads mamba-ssm's sdist into .gpu_run/ (git-ignored; a new checkout starts without it)
#   on the GPU machine:        bash bench/gpu_scan_session.sh run      (carry .gpu_run)
#       writes $OUT/scan_tests.log and $OUT/scan.json and prints the tables
set -euo pipefail
cd "$(dirname "$0")/.."
MAMBA_VERSION=2.3.2.post1

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
    tar -xzf .gpu_run/mamba_ssm-${MAMBA_VERSION}.tar.gz -C .gpu_run
    rm .gpu_run/mamba_ssm-${MAMBA_VERSION}.tar.gz
    du -sh .gpu_run
    ;;
run)
    out="${OUT:-/tmp/gpu_scan_out}"
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_scan_triton.py tests/test_scan_variant.py \
        tests/test_scan_compile.py 2>&1 | tee "$out/scan_tests.log" | tail -15 || true
    mamba=()
    if [ -d ".gpu_run/mamba_ssm-${MAMBA_VERSION}" ]; then
        mamba=(--mamba-src ".gpu_run/mamba_ssm-${MAMBA_VERSION}")
    fi
    python3 -m bench.scan --sweep "${mamba[@]}" --json "$out/scan.json"
    ;;
*)
    echo "usage: bash bench/gpu_scan_session.sh prepare|run" >&2
    exit 2
    ;;
esac
