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


def _copy_ops_of_one_fwd_bwd(bc_layout: str) -> dict[str, int]:
    """aten copy / fill calls of one eager bf16 forward+backward with the kernels stubbed (no GPU needed); B and C in
    mamba-ssm's (batch, N, L) layout, as a Vim block's x_proj slices ("vim") or with different strides ("mixed")."""
    from collections import Counter

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from bench.scan_host import stubbed_kernels
    from kernels import selective_scan_fn
    from kernels.testing import make_scan_inputs

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter[str] = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    inputs = make_scan_inputs(2, 32, 11, 16, groups=None, dtype=torch.bfloat16, seed=0, requires_grad=True)
    if bc_layout == "vim":  # slices of one x_proj output, (batch, L, dt_rank + 2N)
        x_dbl = torch.randn(2, 11, 4 + 32, dtype=torch.bfloat16, requires_grad=True)
        inputs["B"], inputs["C"] = x_dbl[..., 4:20].transpose(1, 2), x_dbl[..., 20:].transpose(1, 2)
    elif bc_layout == "mixed":  # B position-major, C as mamba-ssm takes it
        inputs["B"] = torch.randn(2, 11, 16, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    dout = torch.randn_like(inputs["u"])
    with stubbed_kernels(), Count() as counter:
        selective_scan_fn(**inputs, delta_softplus=True, backend="triton").backward(dout)
    return {op: counter.ops[op] for op in ("clone", "stack", "copy_", "zeros", "zero_", "fill_")}


def test_an_eager_scan_copies_only_a_b_c_and_its_db_dc_cast() -> None:
    """The host path L=50 is bound by: A made dim-major once per forward+backward (the kernels need its channels
    adjacent, see channel_params), B and C made position-major once, together in one copy (not at all when they
    already are, as in a Vim block), dB and dC cast in one copy, every gradient sum zero-filled in one call. The
    ninth session's path made 8 copies and 4 fills, the tenth's 4 and 2."""
    expected = {"mamba": (1, 1), "vim": (1, 0), "mixed": (1, 1)}  # (clones: A, stacks: B with C)
    for layout, (clones, stacks) in expected.items():
        ops = _copy_ops_of_one_fwd_bwd(layout)
        # (mixed: autograd copies dB into B's transposed layout itself)
        assert (ops["clone"], ops["stack"]) == (clones, stacks), (layout, ops)
        assert ops["copy_"] <= (2 if layout == "mixed" else 1), (layout, ops)
        assert max(ops["zeros"], ops["zero_"]) + ops["fill_"] <= 1, (layout, ops)  # zeros may be empty + zero_


def test_python_profile_names_the_scan_path():
    from bench.scan_host import python_profile, stubbed_kernels

    with stubbed_kernels():
        text = python_profile("triton", top=40, iters=3, shape=(2, 32), device="cpu")
    assert "3 forward+backward calls" in text
    assert "selective_scan_bwd_launch" in text and "selective_scan_fwd_launch" in text
