"""Random selective-scan inputs with Mamba-like ranges, for tests and benchmarks of every backend, and the check of a
Triton launch against the float64 reference that the kernel tests share."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from kernels.selective_scan_ref import selective_scan_ref

# mamba-ssm's own tolerances (tests/ops/test_selective_scan.py); ours compare against float64, not
# against a float32 reference in the input dtype, so they are at least as strict.
TOLERANCES = {torch.float32: (6e-4, 2e-3), torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}
# Gradient tolerance multipliers (rtol, atol) relative to the output tolerance, as in mamba-ssm.
GRAD_FACTORS = {"u": (2, 2), "delta": (5, 10), "z": (1, 1), "B": (1, 1), "C": (1, 1)}
WEIGHT_TOL = (1e-3, 1e-3)  # A, D, delta_bias: float32 parameters
WEIGHT_ATOL_FACTOR = {"A": 5, "D": 1, "delta_bias": 1}


def make_scan_inputs(
    batch: int,
    dim: int,
    length: int,
    n_state: int,
    groups: int | None,
    dtype: torch.dtype,
    seed: int,
    device: str | torch.device = "cpu",
    requires_grad: bool = False,
    with_optional: bool = True,
    delta_softplus: bool = True,
) -> dict[str, torch.Tensor | None]:
    """u, delta, z in ``dtype``; A, D, delta_bias float32 (float64 when dtype is); B, C in ``dtype``.

    Ranges follow Mamba's initialisation: A = -exp(A_log) in [-N, -1]-ish, delta around softplus^-1 of
    0.001..0.1, so decays and gradients are in the regime the models use. Without ``delta_softplus``
    the bias is positive so that dt = delta + bias stays positive (decays below 1), as in mamba-ssm's tests.
    """
    gen = torch.Generator().manual_seed(seed)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def rnd(*shape, dt=dtype, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dt)

    bc_shape = (batch, n_state, length) if groups is None else (batch, groups, n_state, length)
    tensors: dict[str, torch.Tensor | None] = {
        "u": rnd(batch, dim, length),
        "delta": (torch.rand(batch, dim, length, generator=gen, dtype=torch.float64) * 0.5).to(dtype),
        "A": (-0.5 - torch.rand(dim, n_state, generator=gen, dtype=torch.float64) * 4).to(param_dtype),
        "B": rnd(*bc_shape),
        "C": rnd(*bc_shape),
        "D": rnd(dim, dt=param_dtype) if with_optional else None,
        "z": rnd(batch, dim, length) if with_optional else None,
        "delta_bias": (torch.rand(dim, generator=gen, dtype=torch.float64) + (-2.0 if delta_softplus else 0.0))
        .to(param_dtype)
        if with_optional
        else None,
    }
    out = {}
    for k, v in tensors.items():
        if v is not None:
            v = v.to(device)
            if requires_grad:
                v.requires_grad_(True)
        out[k] = v
    return out


def channel_last(x: torch.Tensor) -> torch.Tensor:
    """A (batch, dim, L) tensor with (batch, L, dim) memory, a Vim block's layout: a copy, differentiable."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


# The scan inputs that a Vim block passes channel-last (B and C keep their own layout).
SEQUENCE_INPUTS = ("u", "delta", "z")


def with_channel_last_sequences(inputs: dict[str, Any]) -> dict[str, Any]:
    """Scan arguments (``make_scan_inputs``' dict, or keyword arguments) with u / delta / z, where present,
    channel-last; the others as they are."""
    return {k: channel_last(v) if k in SEQUENCE_INPUTS and v is not None else v for k, v in inputs.items()}


def check_against_reference(triton_scan: ModuleType, *, batch: int, dim: int, length: int, n_state: int,
                            groups: int | None, dtype: torch.dtype, with_optional: bool, softplus: bool,
                            reverse: bool, seed: int, config: Any = None, device: str = "cpu",
                            channel_last: bool = False) -> None:
    """Output, last state and every gradient of ``triton_scan.selective_scan_triton`` (one ScanLaunchConfig for both
    directions, a (forward, backward) pair, or None for the defaults) against the float64 reference, within
    TOLERANCES; raises AssertionError naming the tensor that differs. ``channel_last``: u / delta / z handed over as
    a Vim block does (``with_channel_last_sequences``)."""
    inp = make_scan_inputs(batch, dim, length, n_state, groups=groups, dtype=dtype, seed=seed, device=device,
                           requires_grad=True, with_optional=with_optional, delta_softplus=softplus)
    if channel_last:
        inp = with_channel_last_sequences(inp)
    ref_inp = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in inp.items()}
    kw = dict(delta_softplus=softplus, return_last_state=True, reverse=reverse)
    if config is None:
        cfg = {}
    elif isinstance(config, tuple):
        cfg = dict(fwd_config=config[0], bwd_config=config[1])
    else:
        cfg = dict(fwd_config=config, bwd_config=config)
    out, last = triton_scan.selective_scan_triton(**inp, **kw, **cfg)
    out_ref, last_ref = selective_scan_ref(**ref_inp, **kw)

    rtol, atol = TOLERANCES[dtype]
    assert out.dtype == dtype and last.dtype == torch.float32
    torch.testing.assert_close(out.double(), out_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(last.double(), last_ref, rtol=rtol, atol=atol)

    gen = torch.Generator(device=device).manual_seed(seed + 1)
    g_out = torch.randn(out.shape, generator=gen, device=device, dtype=torch.float64)
    g_last = torch.randn(last.shape, generator=gen, device=device, dtype=torch.float64)
    names = [k for k, v in inp.items() if v is not None]
    grads = torch.autograd.grad((out * g_out.to(dtype)).sum() + (last * g_last.float()).sum(),
                                [inp[k] for k in names])
    grads_ref = torch.autograd.grad((out_ref * g_out.to(dtype).double()).sum() + (last_ref * g_last.float().double()).sum(),
                                    [ref_inp[k] for k in names])
    for name, got, want in zip(names, grads, grads_ref):
        assert got.dtype == inp[name].dtype, name
        if name in GRAD_FACTORS:
            fr, fa = GRAD_FACTORS[name]
            tol = dict(rtol=rtol * fr, atol=atol * fa)
        else:
            w_rtol, w_atol = WEIGHT_TOL
            if with_optional:  # mamba-ssm: with z the weight errors are larger
                w_rtol, w_atol = max(w_rtol, rtol), max(w_atol, atol)
            tol = dict(rtol=w_rtol, atol=w_atol * WEIGHT_ATOL_FACTOR[name])
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda m, n=name: f"grad of {n}: {m}")


def run_compiled(script: str, cache_dir: Path, timeout: int = 300) -> str:
    """Run ``script`` (Python source) in a fresh process from the repository root with Triton's real compiler (no
    ``TRITON_INTERPRET``: it is fixed per process) and its cache in ``cache_dir``; returns its stdout. The sm_90
    build tests use it: the interpreter accepts code the compiler rejects."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
