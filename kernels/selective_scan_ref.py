"""Readable pure-PyTorch selective scan: the definition every other backend is tested against.

The recurrence, per batch b, channel d and state index n, for positions l = 0..L-1 (or L-1..0 when
``reverse``):

    dt[l]   = softplus(delta[l] + delta_bias)          (softplus and bias optional)
    x[l]    = exp(dt[l] * A[n]) * x[l - 1] + dt[l] * B[n, l] * u[l]
    y[l]    = sum_n C[n, l] * x[l] + D * u[l]
    out[l]  = y[l] * silu(z[l])                         (gate optional)

This file keeps the loop explicit on purpose; speed comes from the chunked and Triton backends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.selective_scan_checks import check_scan_inputs


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half inputs, float64 when the caller asked for it."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_groups(bc: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, N, L) or (batch, groups, N, L) -> (batch, dim, N, L); each group serves dim/groups channels."""
    if bc.dim() == 3:
        return bc.unsqueeze(1).expand(bc.shape[0], dim, bc.shape[1], bc.shape[2])
    groups = bc.shape[1]
    return bc.repeat_interleave(dim // groups, dim=1)


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    reverse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan by an explicit loop over the sequence; differentiable through autograd.

    Shapes: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L) or (batch, groups, N, L);
    D, delta_bias (dim,). Returns ``out`` (batch, dim, L) in u's dtype, and with ``return_last_state``
    also the final state (batch, dim, N) in float32 (float64 for float64 inputs).
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    cdt = compute_dtype_for(dtype_in)
    batch, dim, length = u.shape
    u_c = u.to(cdt)
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    B_full = expand_groups(B.to(cdt), dim)  # (batch, dim, N, L)
    C_full = expand_groups(C.to(cdt), dim)
    A_c = A.to(cdt)

    state = u_c.new_zeros(batch, dim, A.shape[1])
    ys: list[torch.Tensor | None] = [None] * length
    positions = range(length - 1, -1, -1) if reverse else range(length)
    for pos in positions:
        decay = torch.exp(dt[:, :, pos, None] * A_c)
        state = decay * state + (dt[:, :, pos] * u_c[:, :, pos])[:, :, None] * B_full[:, :, :, pos]
        ys[pos] = (state * C_full[:, :, :, pos]).sum(dim=-1)
    y = torch.stack(ys, dim=-1)  # type: ignore[arg-type]
    if D is not None:
        y = y + u_c * D.to(cdt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(dtype_in)
    return (out, state) if return_last_state else out
