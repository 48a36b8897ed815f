"""Forward kernel of the selective scan and its launcher.

Each program is one warp that owns BLOCK_D channels of one (batch, group) pair. Tiles are (N_PAD, BLOCK_D)
with the channels fastest, so Triton gives each channel 32 / BLOCK_D lanes and each lane N_PAD * BLOCK_D / 32
of its states: with BLOCK_D = 32 a thread holds all N states of one channel, with BLOCK_D = 8 four threads
share a channel (four times the parallelism, two shuffle steps per sum over N). Positions are walked one by
one; there are no shared-memory tiles and no layout conversions inside the loop. The next position's inputs
are loaded before the current position is computed (one step of software prefetch), and the state entering
every CHUNK positions is saved for the backward (kernels/triton_scan_bwd.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_launch import ceil_div, compiled_launcher, next_power_of_2
from kernels.triton_scan_common import (
    SEQ_UNSPECIALIZED,
    UNSPECIALIZED,
    ScanLaunchConfig,
    channel_block,
    channel_params,
    dim_major,
    launch_options,
    position_major,
    position_walk,
    segment_walk,
    sequence_strides,
    softplus,
    tile_io,
)
from kernels.triton_scan_fwd2 import _scan_fwd_kernel_v2
from kernels.triton_scan_fwd3 import _scan_fwd_kernel_v3, padded_float32
from kernels.triton_scan_fwd4 import _scan_fwd_kernel_v4, position_contiguous
from kernels.triton_scan_segments import contiguous_segments, plan_segments, segment_summaries


@triton.jit
def _position_inputs(U, DELTA, DELTA_BIAS_VEC, seq_row, seq_sl, pos, length, d_mask,
                     HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """u and the discretisation step dt of every channel at one position (zeros past either end, which makes
    that position an identity step)."""
    valid = (pos >= 0) & (pos < length)
    m = d_mask & valid
    u = tl.load(U + seq_row + pos * seq_sl, mask=m, other=0.0).to(tl.float32)
    dt = tl.load(DELTA + seq_row + pos * seq_sl, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += DELTA_BIAS_VEC
    if SOFTPLUS:
        dt = softplus(dt)
    dt = tl.where(m, dt, 0.0)
    return u, dt


@triton.jit(do_not_specialize=UNSPECIALIZED + SEQ_UNSPECIALIZED)  # see kernels/triton_scan_common.py
def _scan_fwd_kernel(
    U, DELTA, A, B, C, D, Z, DELTA_BIAS,
    OUT, CHUNK_STATES, LAST_STATE,
    dim, length, dim_per_group, n_groups, n_chunks, n_state, a_state_stride,
    bc_batch_stride, bc_group_stride, bc_pos_stride,
    seq_sb, seq_sd, seq_sl, z_sb, z_sd, z_sl,
    N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, STORE_STATES: tl.constexpr,
):
    batch_idx, group, offs_d, d_mask, offs_n, n_mask, nd_mask = channel_block(
        n_groups, dim_per_group, n_state, BLOCK_D, N_PAD)
    A2, D_vec, bias = channel_params(A, D, DELTA_BIAS, a_state_stride, offs_n, offs_d, nd_mask,
                                     d_mask, BLOCK_D, HAS_D, HAS_BIAS)
    row = (batch_idx * dim + offs_d).to(tl.int64)
    # u, delta and out (seq_*) and z (z_*) through their strides (sequence_strides).
    seq_row = batch_idx.to(tl.int64) * seq_sb + offs_d.to(tl.int64) * seq_sd
    z_row = batch_idx.to(tl.int64) * z_sb + offs_d.to(tl.int64) * z_sd
    # B and C come as (batch, groups, L, N) views: one position's N values are contiguous, positions
    # bc_pos_stride apart (N for a copy, dt_rank + 2N for slices of a Mamba block's x_proj output).
    B_seq = B + batch_idx.to(tl.int64) * bc_batch_stride + group * bc_group_stride
    C_seq = C + batch_idx.to(tl.int64) * bc_batch_stride + group * bc_group_stride
    first_chunk, _chunk_step, _count = segment_walk(0, n_chunks, n_chunks, REVERSE, False)
    pos, step = position_walk(first_chunk, CHUNK, REVERSE)

    # Inputs of the first position; each step then loads the next position's before computing its own.
    u, dt = _position_inputs(U, DELTA, bias, seq_row, seq_sl, pos, length, d_mask, HAS_BIAS, SOFTPLUS)
    valid = (pos >= 0) & (pos < length)
    B_col = tl.load(B_seq + pos * bc_pos_stride + offs_n, mask=n_mask & valid, other=0.0).to(tl.float32)
    C_col = tl.load(C_seq + pos * bc_pos_stride + offs_n, mask=n_mask & valid, other=0.0).to(tl.float32)
    z = u
    if HAS_Z:
        z = tl.load(Z + z_row + pos * z_sl, mask=d_mask & valid, other=0.0).to(tl.float32)

    h = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    for i in range(n_chunks):
        if STORE_STATES:
            if REVERSE:
                chunk_idx = n_chunks - 1 - i
            else:
                chunk_idx = i
            state_ptrs = ((batch_idx * n_chunks + chunk_idx) * n_state + offs_n[:, None]).to(tl.int64) * dim
            tl.store(CHUNK_STATES + state_ptrs + offs_d[None, :], h, mask=nd_mask)
        for _t in range(CHUNK):
            nxt = pos + step
            nxt_valid = (nxt >= 0) & (nxt < length)
            u_n, dt_n = _position_inputs(U, DELTA, bias, seq_row, seq_sl, nxt, length, d_mask, HAS_BIAS, SOFTPLUS)
            B_n = tl.load(B_seq + nxt * bc_pos_stride + offs_n, mask=n_mask & nxt_valid, other=0.0).to(tl.float32)
            C_n = tl.load(C_seq + nxt * bc_pos_stride + offs_n, mask=n_mask & nxt_valid, other=0.0).to(tl.float32)
            z_n = u_n
            if HAS_Z:
                z_n = tl.load(Z + z_row + nxt * z_sl, mask=d_mask & nxt_valid, other=0.0).to(tl.float32)

            h = tl.exp2(dt[None, :] * A2) * h + B_col[:, None] * (dt * u)[None, :]
            y = tl.sum(h * C_col[:, None], axis=0)
            if HAS_D:
                y += D_vec * u
            if HAS_Z:
                y = y * z * tl.sigmoid(z)
            valid = (pos >= 0) & (pos < length)
            tl.store(OUT + seq_row + pos * seq_sl, y.to(OUT.dtype.element_ty), mask=d_mask & valid)

            pos = nxt
            u, dt, B_col, C_col, z = u_n, dt_n, B_n, C_n, z_n

    tl.store(LAST_STATE + row[None, :] * n_state + offs_n[:, None], h, mask=nd_mask)


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
    """Output, float32 last state (batch, dim, N) and, with ``store_states``, the state entering each chunk
    (batch, chunks, N, dim; float32, or bfloat16 per ``config.bf16_states``) for the backward. u, delta, z contiguous (the v1 / v2 kernels: any
    ``sequence_strides``, out made in u's layout); A (dim, N) read dim-major
    (``dim_major`` copies it unless its channels are already adjacent); B and C (batch, groups, N, L) read position-major (each position's states from one place; ``position_major``
    copies them only when their strides need it)."""
    batch, dim, length = u.shape
    A = dim_major(A)  # a no-op on the eager path, which converted it once for both directions
    n_groups, n_state = B.shape[1], B.shape[2]
    dim_per_group = dim // n_groups
    n_chunks = ceil_div(length, config.chunk)
    out = torch.empty_like(u)
    last_state = torch.empty(batch, dim, n_state, device=u.device, dtype=torch.float32)
    grid = (ceil_div(dim_per_group, config.block_d), batch * n_groups)
    n_pad = next_power_of_2(n_state)
    chunk_states = (
        torch.empty(batch, n_chunks, n_state, dim, device=u.device, dtype=config.saved_state_dtype(u.dtype))
        if store_states else None
    )
    inputs = (D if D is not None else last_state, z if z is not None else u,
              delta_bias if delta_bias is not None else last_state)
    results = (out, chunk_states if chunk_states is not None else last_state, last_state)
    sizes = (dim, length, dim_per_group, n_groups, n_chunks, n_state, A.stride(1))
    if config.variant == "v3":
        B_arg, C_arg = padded_float32(B, n_pad), padded_float32(C, n_pad)
        n_seg, chunks_per_seg = plan_segments(n_chunks, config.segments)
        seg_states = seg_dtsum = last_state
        if n_seg > 1:
            seg_states, seg_dtsum = segment_summaries(u, delta, A, B_arg, delta_bias, None, None, delta_softplus,
                                                      reverse, config, n_seg, chunks_per_seg, n_groups, n_state)
        kernel, extra = _scan_fwd_kernel_v3, dict(FAST=u.is_cuda, LOG2_TILE=config.log2_tile())
        results = results + (seg_states, seg_dtsum)
        sizes = sizes + (n_seg, chunks_per_seg)
        grid = grid + (n_seg,)
    elif config.variant == "v4":
        # Parallel over positions: B and C with unit position stride (kernels/triton_scan_fwd4.py).
        B_arg, C_arg, bc_strides = position_contiguous(B, C)
        kernel, extra = _scan_fwd_kernel_v4, dict(BLOCK_L=config.block_l)
        sizes = sizes + bc_strides
    else:
        kernel, extra = _scan_fwd_kernel, {}
        seq_strides = sequence_strides(u, delta, z)
        if config.variant == "v2":
            # Approximate math needs inline PTX, which the interpreter (CPU tensors) cannot run.
            kernel = _scan_fwd_kernel_v2
            extra = dict(EVEN_D=dim_per_group % config.block_d == 0, EVEN_N=n_state == n_pad, FAST=u.is_cuda,
                         TILE_IO=tile_io(config, seq_strides))
            n_seg, chunks_per_seg = contiguous_segments(config.segments, n_chunks, u, delta, z)
            seg_states = seg_dtsum = last_state
            if n_seg > 1:
                seg_states, seg_dtsum = segment_summaries(u, delta, A, padded_float32(B, n_pad), delta_bias, None,
                                                          None, delta_softplus, reverse, config, n_seg,
                                                          chunks_per_seg, n_groups, n_state)
            results = results + (seg_states, seg_dtsum)
            sizes = sizes + (n_seg, chunks_per_seg)
            grid = grid + (n_seg,)
            extra["SEGMENTED"] = n_seg > 1
        B_arg, C_arg, bc_strides = position_major(B, C)
        sizes = sizes + bc_strides + seq_strides
    compiled_launcher(kernel)[grid](
        u, delta, A, B_arg, C_arg, *inputs, *results, *sizes,
        N_PAD=n_pad, BLOCK_D=config.block_d, CHUNK=config.chunk,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, REVERSE=reverse, STORE_STATES=store_states,
        **extra, **launch_options(config),
    )
    return out, last_state, chunk_states
