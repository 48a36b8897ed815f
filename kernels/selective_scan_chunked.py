"""Chunked pure-PyTorch selective scan: the fast path when there is no GPU.

The sequence is cut into chunks of T positions. Step 1 scans every chunk at once from a zero state (a
Python loop of T steps over tensors holding all chunks). Step 2 carries the true state across chunk
boundaries (a loop over the chunks). Step 3 adds each chunk's incoming state, decayed by the cumulative
product of the per-position decays since the chunk start. With T ~ sqrt(L) there are ~2 sqrt(L) Python
steps instead of L, and every decay factor used is a product of values <= 1 for A < 0, so nothing
overflows (unlike a whole-sequence log-space cumsum, which needs exp(+large)).

Gradients come from autograd; the (batch, dim, L, N) states are materialised, which is fine for the model
sizes tests and CPU runs use. On GPUs use the Triton backend.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.selective_scan_checks import check_scan_inputs
from kernels.selective_scan_ref import compute_dtype_for, expand_groups


def _scan_chunks(
    log_decay: torch.Tensor, inp: torch.Tensor, chunk: int, reverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """States x[l] = exp(log_decay[l]) * x[l -/+ 1] + inp[l] for (batch, dim, L, N) inputs.

    Returns all states (batch, dim, L, N) and the final state (batch, dim, N).
    """
    batch, dim, length, n_state = inp.shape
    n_chunks = math.ceil(length / chunk)
    pad = n_chunks * chunk - length
    if pad:
        # Padded positions have decay 1 and input 0: identity steps, so neither the states at real
        # positions nor the final state change (for reverse they are scanned first, from a zero state).
        log_decay = F.pad(log_decay, (0, 0, 0, pad))
        inp = F.pad(inp, (0, 0, 0, pad))
    log_decay = log_decay.reshape(batch, dim, n_chunks, chunk, n_state)
    inp = inp.reshape(batch, dim, n_chunks, chunk, n_state)
    decay = torch.exp(log_decay)

    steps = range(chunk - 1, -1, -1) if reverse else range(chunk)
    local: list[torch.Tensor | None] = [None] * chunk
    h = inp.new_zeros(batch, dim, n_chunks, n_state)
    for t in steps:
        h = decay[:, :, :, t] * h + inp[:, :, :, t]
        local[t] = h
    local_states = torch.stack(local, dim=3)  # type: ignore[arg-type]

    # Decay accumulated from the chunk entry up to and including each position.
    forward_cum = log_decay.cumsum(dim=3)
    if reverse:
        total = forward_cum[:, :, :, -1:]
        cum_decay = torch.exp(total - forward_cum + log_decay)
        chunk_exit = local_states[:, :, :, 0]
    else:
        cum_decay = torch.exp(forward_cum)
        chunk_exit = local_states[:, :, :, -1]
    chunk_decay = torch.exp(forward_cum[:, :, :, -1])

    carries: list[torch.Tensor | None] = [None] * n_chunks
    carry = inp.new_zeros(batch, dim, n_state)
    for c in range(n_chunks - 1, -1, -1) if reverse else range(n_chunks):
        carries[c] = carry
        carry = chunk_decay[:, :, c] * carry + chunk_exit[:, :, c]
    carry_in = torch.stack(carries, dim=2)  # type: ignore[arg-type]

    states = local_states + cum_decay * carry_in[:, :, :, None]
    states = states.reshape(batch, dim, n_chunks * chunk, n_state)[:, :, :length]
    return states, carry


def selective_scan_chunked(
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
    chunk: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``selective_scan_ref``; ``chunk`` defaults to about sqrt(L)."""
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    cdt = compute_dtype_for(dtype_in)
    dim, length = u.shape[1], u.shape[2]
    chunk = chunk or max(1, math.isqrt(length))

    u_c = u.to(cdt)
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    B_full = expand_groups(B.to(cdt), dim)  # (batch, dim, N, L)
    C_full = expand_groups(C.to(cdt), dim)

    log_decay = dt[..., None] * A.to(cdt)[:, None, :]  # (batch, dim, L, N)
    inp = (dt * u_c)[..., None] * B_full.transpose(-1, -2)
    states, last_state = _scan_chunks(log_decay, inp, chunk, reverse)
    y = torch.einsum("bdln,bdnl->bdl", states, C_full)
    if D is not None:
        y = y + u_c * D.to(cdt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(dtype_in)
    return (out, last_state) if return_last_state else out
