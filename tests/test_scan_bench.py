"""bench/scan.py's pieces that run without a GPU: the profiler-summed time per call and the table."""

from __future__ import annotations

import torch

from bench.scan import format_table, profiled_ms


def test_profiled_ms_sums_the_operations_of_one_call() -> None:
    """Per call, not per loop: four times the matmuls read clearly more, and every profiled call ran once.
    (No wall-clock comparison: on a loaded CI machine the wall clock says little.)"""
    a = torch.randn(256, 256)
    calls = []

    def work(n: int) -> None:
        calls.append(n)
        for _ in range(n):
            a @ a

    small = profiled_ms(lambda: work(2), iters=10, device=False)
    large = profiled_ms(lambda: work(8), iters=10, device=False)
    assert calls == [2] * 11 + [8] * 11  # one warm-up, ten profiled calls each
    assert 0 < small and large > 1.5 * small, (small, large)


def test_table_shows_the_gpu_busy_column_when_measured() -> None:
    row = {"shape": "(1, 2, 3, L=4)", "backend": "triton", "fwd_ms": 1.0, "fwd_GBps": 1.0, "fwd_x_floor": 2.0,
           "fwd_speedup_vs_mamba": None, "fwd_bwd_ms": 3.0, "fwd_bwd_GBps": 1.0, "fwd_bwd_x_floor": 4.0,
           "fwd_bwd_speedup_vs_mamba": 1.5}
    lines = format_table({"rows": [row, row | {"fwd_bwd_gpu_ms": 0.75}]}).splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == lines[3].count("|") == 12
    assert lines[2].endswith("| 1.50x | n/a |") and lines[3].endswith("| 1.50x | 0.750 |")
