"""Fused Triton forward kernel of the selective scan, and its launcher.

One program owns BLOCK_D channels of one (batch, group) pair and all N states, and walks the sequence
chunk by chunk (right to left when REVERSE). Per chunk it loads coalesced (BLOCK_D, CHUNK) tiles, applies
delta_bias/softplus, discretises (a = exp(dt*A), b = dt*u*B), runs the recurrence inside the chunk as an
associative scan over (a, b) pairs, adds the carried state, contracts with C, adds D*u, gates with
silu(z) and stores the output: no (batch, dim, L, N) tensor ever exists in memory. When the backward will
be needed it also stores the state entering every chunk, from which the backward recomputes the states.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_scan_common import ScanLaunchConfig, column, linear_recurrence_combine, softplus


@triton.jit
def _selective_scan_fwd_kernel(
    U, DELTA, A, B, C, D, Z, DELTA_BIAS,
    OUT, CHUNK_STATES, LAST_STATE,
    dim, length, dim_per_group, n_groups, n_chunks, n_state,
    N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, STORE_STATES: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_bg = tl.program_id(1)
    batch_idx = pid_bg // n_groups
    group = pid_bg % n_groups

    offs_in_group = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_in_group < dim_per_group
    offs_d = group * dim_per_group + offs_in_group
    offs_n = tl.arange(0, N_PAD)
    n_mask = offs_n < n_state
    offs_t = tl.arange(0, CHUNK)
    dn_mask = d_mask[:, None] & n_mask[None, :]

    # Padded states get A = 0 and B = C = 0, so they stay zero and contribute nothing.
    A_tile = tl.load(A + offs_d[:, None] * n_state + offs_n[None, :], mask=dn_mask, other=0.0)[:, :, None]
    if HAS_D:
        D_vec = tl.load(D + offs_d, mask=d_mask, other=0.0)
    if HAS_BIAS:
        bias = tl.load(DELTA_BIAS + offs_d, mask=d_mask, other=0.0)

    row = (batch_idx * dim + offs_d).to(tl.int64)
    seq_row = row * length  # start of each channel's sequence in u / delta / z / out
    bc_row = ((batch_idx * n_groups + group) * n_state + offs_n).to(tl.int64) * length

    h = tl.zeros((BLOCK_D, N_PAD), dtype=tl.float32)
    for i in range(n_chunks):
        if REVERSE:
            chunk_idx = n_chunks - 1 - i
        else:
            chunk_idx = i
        offs_l = chunk_idx * CHUNK + offs_t
        l_mask = offs_l < length
        dl_mask = d_mask[:, None] & l_mask[None, :]
        ptrs = seq_row[:, None] + offs_l[None, :]

        if STORE_STATES:
            state_ptrs = ((batch_idx * n_chunks + chunk_idx) * n_state + offs_n[None, :]).to(tl.int64) * dim
            tl.store(CHUNK_STATES + state_ptrs + offs_d[:, None], h, mask=dn_mask)

        u = tl.load(U + ptrs, mask=dl_mask, other=0.0).to(tl.float32)
        dt = tl.load(DELTA + ptrs, mask=dl_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt += bias[:, None]
        if SOFTPLUS:
            dt = softplus(dt)
        # Positions past L (and masked channels) become identity steps: a = 1, b = 0.
        dt = tl.where(dl_mask, dt, 0.0)
        bc_ptrs = bc_row[:, None] + offs_l[None, :]
        nl_mask = n_mask[:, None] & l_mask[None, :]
        B_tile = tl.load(B + bc_ptrs, mask=nl_mask, other=0.0).to(tl.float32)
        C_tile = tl.load(C + bc_ptrs, mask=nl_mask, other=0.0).to(tl.float32)

        decay = tl.exp(dt[:, None, :] * A_tile)
        drive = (dt * u)[:, None, :] * B_tile[None, :, :]
        decay_cum, h_local = tl.associative_scan(
            (decay, drive), axis=2, combine_fn=linear_recurrence_combine, reverse=REVERSE
        )
        states = h_local + decay_cum * h[:, :, None]

        y = tl.sum(states * C_tile[None, :, :], axis=1)
        if HAS_D:
            y += D_vec[:, None] * u
        if HAS_Z:
            z = tl.load(Z + ptrs, mask=dl_mask, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(OUT + ptrs, y.to(OUT.dtype.element_ty), mask=dl_mask)

        # The state leaving the chunk: its last position in scan order (padding steps are identities).
        if REVERSE:
            h = column(states, offs_t, 0)
        else:
            h = column(states, offs_t, CHUNK - 1)

    tl.store(LAST_STATE + row[:, None] * n_state + offs_n[None, :], h, mask=dn_mask)


def selective_scan_fwd_launch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    reverse: bool,
    store_states: bool,
    config: ScanLaunchConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run the forward kernel on contiguous inputs; B, C are (batch, groups, N, L).

    Returns out (batch, dim, L) in u's dtype, the float32 last state (batch, dim, N), and the float32
    states entering each chunk (batch, n_chunks, N, dim) when ``store_states``.
    """
    batch, dim, length = u.shape
    n_groups, n_state = B.shape[1], B.shape[2]
    dim_per_group = dim // n_groups
    n_chunks = triton.cdiv(length, config.chunk)
    out = torch.empty_like(u)
    last_state = torch.empty(batch, dim, n_state, device=u.device, dtype=torch.float32)
    chunk_states = (
        torch.empty(batch, n_chunks, n_state, dim, device=u.device, dtype=torch.float32) if store_states else None
    )
    # The sequential kernel wants one channel per thread: BLOCK_D = 32 * num_warps.
    sequential = config.kernel == "seq"
    kernel = _selective_scan_fwd_seq_kernel if sequential else _selective_scan_fwd_kernel
    block_d = 32 * config.num_warps if sequential else config.block_d
    grid = (triton.cdiv(dim_per_group, block_d), batch * n_groups)
    kernel[grid](
        u, delta, A.t().contiguous() if sequential else A, B, C,
        D if D is not None else u,
        z if z is not None else u,
        delta_bias if delta_bias is not None else u,
        out,
        chunk_states if chunk_states is not None else last_state,
        last_state,
        dim, length, dim_per_group, n_groups, n_chunks, n_state,
        N_PAD=triton.next_power_of_2(n_state), BLOCK_D=block_d, CHUNK=config.chunk,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, REVERSE=reverse, STORE_STATES=store_states,
        num_warps=config.num_warps,
    )
    return out, last_state, chunk_states


@triton.jit
def _selective_scan_fwd_seq_kernel(
    U, DELTA, A, B, C, D, Z, DELTA_BIAS,
    OUT, CHUNK_STATES, LAST_STATE,
    dim, length, dim_per_group, n_groups, n_chunks, n_state,
    N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, STORE_STATES: tl.constexpr,
):
    """Position-by-position variant: each thread owns one channel and all its N states (tiles are
    (N_PAD, BLOCK_D) with BLOCK_D = 32 * num_warps, so the lanes run over channels and the contraction
    over N stays inside a thread). Same outputs and chunk states as the chunked-scan kernel."""
    pid_d = tl.program_id(0)
    pid_bg = tl.program_id(1)
    batch_idx = pid_bg // n_groups
    group = pid_bg % n_groups

    offs_in_group = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_in_group < dim_per_group
    offs_d = group * dim_per_group + offs_in_group
    offs_n = tl.arange(0, N_PAD)
    n_mask = offs_n < n_state
    nd_mask = n_mask[:, None] & d_mask[None, :]

    # A comes transposed, (N, dim), and chunk states are (batch, n_chunks, N, dim): every 2-D access
    # is contiguous along channels, so Triton lays lanes over channels and keeps N inside a thread.
    A_t = tl.load(A + offs_n[:, None] * dim + offs_d[None, :], mask=nd_mask, other=0.0)
    if HAS_D:
        D_vec = tl.load(D + offs_d, mask=d_mask, other=0.0)
    if HAS_BIAS:
        bias = tl.load(DELTA_BIAS + offs_d, mask=d_mask, other=0.0)

    row = (batch_idx * dim + offs_d).to(tl.int64)
    seq_row = row * length
    bc_row = ((batch_idx * n_groups + group) * n_state + offs_n).to(tl.int64) * length

    h = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    for i in range(n_chunks):
        if REVERSE:
            chunk_idx = n_chunks - 1 - i
        else:
            chunk_idx = i
        if STORE_STATES:
            state_ptrs = ((batch_idx * n_chunks + chunk_idx) * n_state + offs_n[:, None]).to(tl.int64) * dim
            tl.store(CHUNK_STATES + state_ptrs + offs_d[None, :], h, mask=nd_mask)
        for t in range(CHUNK):
            if REVERSE:
                pos = chunk_idx * CHUNK + CHUNK - 1 - t
            else:
                pos = chunk_idx * CHUNK + t
            valid = pos < length
            m = d_mask & valid
            u = tl.load(U + seq_row + pos, mask=m, other=0.0).to(tl.float32)
            dt = tl.load(DELTA + seq_row + pos, mask=m, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                dt = softplus(dt)
            dt = tl.where(m, dt, 0.0)
            B_col = tl.load(B + bc_row + pos, mask=n_mask & valid, other=0.0).to(tl.float32)
            C_col = tl.load(C + bc_row + pos, mask=n_mask & valid, other=0.0).to(tl.float32)
            h = tl.exp(dt[None, :] * A_t) * h + B_col[:, None] * (dt * u)[None, :]
            y = tl.sum(h * C_col[:, None], axis=0)
            if HAS_D:
                y += D_vec * u
            if HAS_Z:
                z = tl.load(Z + seq_row + pos, mask=m, other=0.0).to(tl.float32)
                y = y * z * tl.sigmoid(z)
            tl.store(OUT + seq_row + pos, y.to(OUT.dtype.element_ty), mask=m)

    tl.store(LAST_STATE + row[None, :] * n_state + offs_n[:, None], h, mask=nd_mask)
