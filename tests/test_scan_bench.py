"""bench/scan.py's pieces that run without a GPU: the profiler-summed time per call and the table; bench.scan_cross's
variant names and pairs."""

from __future__ import annotations

import pytest
import torch

from bench.scan import profiled_ms
from bench.scan_tables import format_sweep, format_table


def test_profiled_ms_sums_the_operations_of_one_call(monkeypatch) -> None:
    """Per call, not per loop: the operations' own times summed over the profiled calls, divided by their number,
    after one unprofiled warm-up call. A stand-in profiler reports 1 ms of own time per unit of work (a wall-clock
    comparison would fail on a loaded machine)."""
    from types import SimpleNamespace

    import torch.profiler

    units = []

    class FakeProfile:
        def __init__(self, activities):
            self.activities = activities

        def __enter__(self):
            self.start = len(units)
            return self

        def __exit__(self, *exc):
            self.work = units[self.start:]

        def key_averages(self):  # two operations per unit of work, half of its time each
            return [SimpleNamespace(self_cpu_time_total=500.0 * n, self_device_time_total=None)
                    for n in self.work for _ in range(2)]

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    calls = []

    def work(n: int) -> None:
        calls.append(n)
        units.append(n)

    assert profiled_ms(lambda: work(2), iters=10, device=False) == 2.0
    assert profiled_ms(lambda: work(8), iters=10, device=False) == 8.0
    assert calls == [2] * 11 + [8] * 11  # one warm-up, ten profiled calls each


def test_table_shows_the_gpu_busy_column_when_measured() -> None:
    row = {"shape": "(1, 2, 3, L=4)", "backend": "triton", "fwd_ms": 1.0, "fwd_GBps": 1.0, "fwd_x_floor": 2.0,
           "fwd_speedup_vs_mamba": None, "fwd_bwd_ms": 3.0, "fwd_bwd_GBps": 1.0, "fwd_bwd_x_floor": 4.0,
           "fwd_bwd_speedup_vs_mamba": 1.5}
    lines = format_table({"rows": [row, row | {"fwd_bwd_gpu_ms": 0.75, "fwd_gpu_ms": 0.25}]}).splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == lines[3].count("|") == 13
    assert lines[2].endswith("| 1.50x | n/a | n/a |") and lines[3].endswith("| 1.50x | 0.250 | 0.750 |")


def test_v4_sweep_times_every_tile_and_reports_one_that_fails(monkeypatch, capsys) -> None:
    """``--sweep-v4``: one forward row per (block_d, block_l) of V4_SWEEP_TILES, each launched with that v4 tile;
    a tile that fails is printed and left out, and the sweep line names the span length."""
    import bench.scan as scan
    import kernels.selective_scan_triton as triton_scan
    from kernels.testing import make_scan_inputs

    seen = []

    def record(*args, fwd_config=None, bwd_config=None, **kwargs):
        seen.append(fwd_config)
        if (fwd_config.block_d, fwd_config.block_l) == (16, 256):
            raise RuntimeError("out of resources")

    def fake_time_backend(fn, inp, rep_ms, forward=True, backward=True, gpu_busy=True):
        fn(**inp, delta_softplus=True)
        return {"fwd_ms": float(seen[-1].block_d * seen[-1].block_l)}

    monkeypatch.setattr(triton_scan, "selective_scan_triton", record)
    monkeypatch.setattr(scan, "time_backend", fake_time_backend)
    inp = make_scan_inputs(1, 4, 1024, 16, groups=None, dtype=torch.float32, seed=0)
    rows = scan.sweep_v4_tiles(inp, rep_ms=1)
    assert [(c.variant, c.block_d, c.block_l) for c in seen] == [("v4", *t) for t in scan.V4_SWEEP_TILES]
    assert [(r["block_d"], r["block_l"], r["ms"]) for r in rows] == [
        (d, b, float(d * b)) for d, b in scan.V4_SWEEP_TILES if (d, b) != (16, 256)]
    assert "out of resources" in capsys.readouterr().out
    line = format_sweep({"(1, 4, 16, L=1024)": rows})
    assert "v4/bd8/reg-/bl256 2048.000" in line and line.count("*") == 1


def test_scan_cross_names_its_variants_and_checks_pairs_before_any_gpu_work() -> None:
    """bench.scan_cross: the v2 names with layout options or segments (``v2s<k>``) parse, others fail; a --pairs
    entry must pair two of --variants (refused on any machine, before the GPU check)."""
    import argparse

    from bench.scan_cross import main, variant_name

    for name in ("v2", "v2t", "v2x", "v2g", "v2b", "v2tb", "v3", "v2s1", "v2s16", "v2s4r128"):
        assert variant_name(name) == name
    for name in ("v2s", "v2s0", "v2q", "v5", "v2s4r", "v2s4r0", "v2s04"):
        with pytest.raises(argparse.ArgumentTypeError):
            variant_name(name)
    for pairs in (["v2t:v3"], ["v2t"], ["v2t:v2t:v2t"]):
        with pytest.raises(SystemExit) as exc:
            main(["--variants", "v2t", "v2s4", "--pairs", *pairs])
        assert exc.value.code == 2  # argparse's usage error, not the missing GPU


def test_scan_cross_bf16_state_variants_set_the_forward_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """v2b / v2tb: the forward saves bfloat16 chunk states (the backward reads what it gets); v2 / v2t do not."""
    import kernels.selective_scan_triton as scan_triton
    from bench.scan_cross import variant_pair

    monkeypatch.setattr(scan_triton, "multiprocessor_count", lambda device: 132)  # an H100's, without CUDA
    scan_triton.variant_configs.cache_clear()
    try:
        options = {name: variant_pair(name, 16, 197, 128 * 768) for name in ("v2", "v2b", "v2t", "v2tb")}
    finally:
        scan_triton.variant_configs.cache_clear()
    assert [fwd.bf16_states for fwd, _ in options.values()] == [False, True, False, True]
    assert [fwd.tile_io for fwd, _ in options.values()] == [False, False, True, True]
    assert not any(bwd.bf16_states for _, bwd in options.values())
    assert options["v2tb"][1] == options["v2t"][1]


def test_channel_last_inputs_keep_values_with_a_vim_blocks_memory() -> None:
    """bench.scan --layout channel_last (and bench.scan_cross, bench.scan_ncu): u / delta / z as (batch, dim, L)
    views of (batch, L, dim) memory, which the v1 / v2 kernels read in place (is_sequence_layout); B, C and the
    parameters untouched."""
    from kernels.testing import make_scan_inputs, with_channel_last_sequences
    from kernels.triton_scan_common import is_sequence_layout

    inp = make_scan_inputs(2, 6, 5, 4, groups=None, dtype=torch.float32, seed=0, requires_grad=True)
    moved = with_channel_last_sequences(inp)
    for key, value in moved.items():
        assert torch.equal(value, inp[key])
        if key in ("u", "delta", "z"):
            assert value.stride() == (30, 1, 6) and is_sequence_layout(value)
        else:
            assert value is inp[key]
    moved["u"].sum().backward()
    assert torch.equal(inp["u"].grad, torch.ones_like(inp["u"]))
