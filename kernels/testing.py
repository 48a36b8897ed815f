"""Random selective-scan inputs with Mamba-like ranges, for tests and benchmarks of every backend."""

from __future__ import annotations

import torch


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
