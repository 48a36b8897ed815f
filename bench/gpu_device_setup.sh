#!/usr/bin/env bash
# Sourced by the bench/gpu_*_session.sh scripts.
# shellcheck disable=SC2034  # xdist is read by the scripts that source this file
# On the GPU machine: name the GPU and install the carried pure-Python wheels the image lacks. Sets xdist=(-n 12)
# when pytest-xdist came with them: the GPU tests are mostly Triton compiles, CPU work that 12 processes on the
# host's 16 cores share out (the twentieth session ran test_scan_triton's 141 GPU cases in 95 s; the nineteenth got
# through 83 of them in two calls without it).
device_setup() {
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    if [ -d .gpu_run/whl ]; then
        python3 -m pip install -q --no-index --no-deps .gpu_run/whl/*.whl
    fi
    xdist=()
    if python3 -c "import xdist" 2>/dev/null; then
        xdist=(-n 12)
    fi
}
