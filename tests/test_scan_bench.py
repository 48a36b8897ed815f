"""bench/scan.py's pieces that run without a GPU: the profiler-summed time per call and the table."""

from __future__ import annotations

import time

import torch

from bench.scan import format_table, profiled_ms


def test_profiled_ms_sums_the_operations_of_one_call() -> None:
    a = torch.randn(256, 256)
    calls = []

    def work() -> None:
        calls.append(1)
        for _ in range(4):
            a @ a

    t0 = time.perf_counter()
    for _ in range(10):
        work()
    wall_ms = (time.perf_counter() - t0) / 10 * 1e3
    ms = profiled_ms(work, iters=10, device=False)
    assert len(calls) == 1 + 10 + 10  # the timing loop above, one warm-up, ten profiled
    # The matmuls are most of a call; profiling adds some overhead of its own.
    assert 0.2 * wall_ms < ms < 5 * wall_ms, (ms, wall_ms)


def test_table_shows_the_gpu_busy_column_when_measured() -> None:
    row = {"shape": "(1, 2, 3, L=4)", "backend": "triton", "fwd_ms": 1.0, "fwd_GBps": 1.0, "fwd_x_floor": 2.0,
           "fwd_speedup_vs_mamba": None, "fwd_bwd_ms": 3.0, "fwd_bwd_GBps": 1.0, "fwd_bwd_x_floor": 4.0,
           "fwd_bwd_speedup_vs_mamba": 1.5}
    lines = format_table({"rows": [row, row | {"fwd_bwd_gpu_ms": 0.75}]}).splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == lines[3].count("|") == 12
    assert lines[2].endswith("| 1.50x | n/a |") and lines[3].endswith("| 1.50x | 0.750 |")
