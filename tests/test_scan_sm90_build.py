"""Triton's real compiler (not the interpreter the other CPU tests run) builds every scan kernel for sm_90.

The interpreter runs kernel bodies as Python, so code it accepts can still fail to compile: the segment summary
kernel did on the H200 (an int assigned to a name became a tensor, then indexed a tuple). Compiling needs no GPU:
bench/scan_sass.py builds the cubins offline with the ptxas that ships with Triton.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNELS = ("scan_fwd_kernel[", "scan_bwd_kernel[", "scan_bwd_kernel[bd32,prefetch]", "scan_fwd_kernel_v2[",
           "scan_bwd_kernel_v2[", "scan_fwd_kernel_v3[", "scan_bwd_kernel_v3[", "scan_segment_summary_v3[bd32]",
           "scan_segment_summary_v3[bd32,adjoint]")


@pytest.mark.parametrize("reverse", [False, True])
def test_every_scan_kernel_compiles_for_sm90(tmp_path: Path, reverse: bool) -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a fresh build, not one cached by an earlier run
    proc = subprocess.run([sys.executable, "-m", "bench.scan_sass", "--variant", "v1", "v2", "v3", "--block-d", "32",
                           "--shape", "2", "96", "16", "37", *(["--reverse"] if reverse else [])],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kernel in KERNELS:
        assert kernel in proc.stdout, (kernel, proc.stdout[-2000:])
