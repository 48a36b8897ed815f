"""bench.scan_host: the Triton scan's Python path runs with every kernel stubbed, and the stubs are removed
afterwards (a later test must get the real kernels back)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")


def test_stubbed_kernels_are_restored_and_the_measure_runs() -> None:
    import kernels.triton_scan_bwd as bwd
    import kernels.triton_scan_fwd as fwd
    from bench.scan_host import _NoLaunch, measure, stubbed_kernels

    real = fwd._scan_fwd_kernel
    with stubbed_kernels() as names:
        assert "kernels.triton_scan_fwd._scan_fwd_kernel" in names
        assert "kernels.triton_scan_bwd._scan_bwd_kernel" in names
        assert fwd._scan_fwd_kernel is not real
    assert fwd._scan_fwd_kernel is real and not isinstance(bwd._scan_bwd_kernel, _NoLaunch)
    row = measure("triton", iters=5)
    assert row["fwd_us"] > 0 and row["fwd_bwd_us"] > row["fwd_us"]


def test_the_gpu_host_profile_runs_on_the_cpu_with_stubbed_kernels() -> None:
    from bench.scan_host import measure_cuda, stubbed_kernels

    with stubbed_kernels():
        row = measure_cuda("triton", iters=5, shape=(2, 32), device="cpu")
    assert row["fwd_bwd_us"] > row["fwd_us"] > 0 and row["syncs"] is None
    names = [name for name, _, _ in row["top_ops"]]
    assert len(names) == 12 and all(us >= 0 for _, us, _ in row["top_ops"])
