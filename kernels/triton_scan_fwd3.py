"""Forward kernel of the selective scan, variant "v3" (ScanLaunchConfig.variant): one lane per channel.

v1 and v2 spread a channel's N states over 32 / BLOCK_D lanes, which costs shuffles in every sum over N and
repeats each channel's own work (loads, softplus, gate, store) on every lane of the channel. Here the tiles
are (N_PAD, BLOCK_D) with BLOCK_D = 32 * num_warps: a lane holds all N states of its channel, sums over N
stay in its registers, and per-channel work happens once.

The launcher (kernels/triton_scan_fwd.py) hands B and C over as float32 (batch, groups, L, N_PAD), zero-padded
to N_PAD states: a position's B is contiguous in each lane (16-byte vector loads) with no conversions and no state
mask (a padded state has A = 0 and B = C = 0, so it stays 0 and adds nothing). A chunk's u / delta / z are loaded for all its
positions before its arithmetic, and the next chunk's one chunk ahead; reads are unmasked (clamped positions and
channels), so that they need no predicates or zero fills. The state entering each chunk is saved
for the backward in the layout of every variant, (batch, chunks, N, dim).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_scan_common import (
    UNSPECIALIZED,
    carry_in,
    channel_block,
    channel_params,
    chunk_position,
    segment_walk,
    state_offsets,
)
from kernels.triton_scan_fast import sigmoid2, softplus2


@triton.jit
def chunk_loads(rows, seq_row, chunk_idx, n_chunks, length, CHUNK: tl.constexpr, REVERSE: tl.constexpr):
    """Per step of one chunk (scan order), the (BLOCK_D,) values of each row pointer in the tuple ``rows`` at that
    position, as stored. Unmasked: the chunk index and positions are clamped into range (``seq_row`` must hold
    only real channels), so reads past either end repeat real values that the caller discards."""
    chunk_idx = tl.minimum(tl.maximum(chunk_idx, 0), n_chunks - 1)
    steps = ()
    for s in tl.static_range(CHUNK):
        at = tl.minimum(chunk_position(chunk_idx * CHUNK, s, CHUNK, REVERSE), length - 1)
        values = ()
        for k in tl.static_range(len(rows)):
            values = values + (tl.load(rows[k] + seq_row + at),)
        steps = steps + (values,)
    return steps


@triton.jit
def discretize(delta, bias, valid, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr):
    """dt from a loaded delta (0 where not ``valid``) and the raw value softplus was applied to."""
    dt_raw = delta.to(tl.float32)
    if HAS_BIAS:
        dt_raw += bias
    dt = dt_raw
    if SOFTPLUS:
        dt = softplus2(dt_raw, FAST)
    return tl.where(valid, dt, 0.0), dt_raw


@triton.jit(do_not_specialize=UNSPECIALIZED)  # see kernels/triton_scan_common.py
def _scan_fwd_kernel_v3(
    U, DELTA, A, B, C, D, Z, DELTA_BIAS,
    OUT, CHUNK_STATES, LAST_STATE, SEG_STATES, SEG_DTSUM,
    dim, length, dim_per_group, n_groups, n_chunks, n_state, a_state_stride, n_seg, chunks_per_seg,
    N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, STORE_STATES: tl.constexpr, FAST: tl.constexpr,
):
    batch_idx, group, offs_d, d_mask, offs_n, n_mask, nd_mask = channel_block(
        n_groups, dim_per_group, n_state, BLOCK_D, N_PAD)
    A2, D_vec, bias = channel_params(A, D, DELTA_BIAS, a_state_stride, offs_n, offs_d, nd_mask,
                                     d_mask, BLOCK_D, HAS_D, HAS_BIAS)
    row = (batch_idx * dim + offs_d).to(tl.int64)
    # Reads of a channel past the group's end go to its last channel (never stored).
    last_channel = group * dim_per_group + dim_per_group - 1
    seq_row = (batch_idx * dim + tl.minimum(offs_d, last_channel)).to(tl.int64) * length
    B_seq = B + (batch_idx * n_groups + group).to(tl.int64) * length * N_PAD
    C_seq = C + (batch_idx * n_groups + group).to(tl.int64) * length * N_PAD
    rows = (U, DELTA, Z) if HAS_Z else (U, DELTA)

    # Grid axis 2: the segment of the sequence (kernels/triton_scan_segments.py; one segment = the whole of it).
    seg = tl.program_id(2)
    chunk_idx, chunk_step, count = segment_walk(seg, chunks_per_seg, n_chunks, REVERSE, False)
    ahead = chunk_loads(rows, seq_row, chunk_idx, n_chunks, length, CHUNK, REVERSE)
    h = carry_in(tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32), SEG_STATES, SEG_DTSUM, 0, seg, 1, batch_idx, n_seg,
                 n_state, dim, A2, offs_d, offs_n, d_mask, nd_mask)
    for _i in range(count):
        current = ahead
        ahead = chunk_loads(rows, seq_row, chunk_idx + chunk_step, n_chunks, length, CHUNK, REVERSE)
        if STORE_STATES:
            offs = state_offsets(batch_idx, chunk_idx, n_chunks, n_state, dim, offs_d, offs_n)
            tl.store(CHUNK_STATES + offs, h, mask=nd_mask)
        for s in tl.static_range(CHUNK):
            pos = chunk_position(chunk_idx * CHUNK, s, CHUNK, REVERSE)
            valid = pos < length
            u = current[s][0].to(tl.float32)
            dt, _dt_raw = discretize(current[s][1], bias, valid, HAS_BIAS, SOFTPLUS, FAST)
            # Past the end dt = 0: an identity step whatever the clamped B and C hold.
            at = tl.minimum(pos, length - 1)
            B_col = tl.load(B_seq + at * N_PAD + offs_n)
            C_col = tl.load(C_seq + at * N_PAD + offs_n)
            h = tl.exp2(dt[None, :] * A2) * h + B_col[:, None] * (dt * u)[None, :]
            y = tl.sum(h * C_col[:, None], axis=0)
            if HAS_D:
                y += D_vec * u
            if HAS_Z:
                z = current[s][2].to(tl.float32)
                y = y * z * sigmoid2(z, FAST)
            tl.store(OUT + seq_row + pos, y.to(OUT.dtype.element_ty), mask=d_mask & valid)
        chunk_idx += chunk_step

    tl.store(LAST_STATE + row[None, :] * n_state + offs_n[:, None], h, mask=nd_mask & (seg == n_seg - 1))


def padded_float32(bc: torch.Tensor, n_pad: int) -> torch.Tensor:
    """Grouped B or C (batch, groups, N, L) as the v3 kernels read it: float32 (batch, groups, L, n_pad), the
    states past N zero (one copy, as the (L, N) transpose needs anyway)."""
    batch, groups, n_state, length = bc.shape
    out = bc.new_zeros((batch, groups, length, n_pad), dtype=torch.float32)
    out[..., :n_state] = bc.transpose(-1, -2)
    return out
