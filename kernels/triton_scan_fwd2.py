"""Forward kernel of the selective scan, variant "v2" (ScanLaunchConfig.variant): the v1 kernel
(kernels/triton_scan_fwd.py; same tiles, same order of operations, one position of prefetch) with less work
per position:

- no per-position masks on the loads: the position is clamped into [0, length) and the channel into the
  group (a clamped channel computes a copy of the last real one), so only the output store keeps a mask, and
  it drops the channel test when ``EVEN_D`` (dim_per_group a multiple of BLOCK_D); positions past the end
  still take an identity step (dt = 0);
- softplus and sigmoid with ``FAST`` approximate math (kernels/triton_scan_fast.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_scan_common import (
    SEQ_UNSPECIALIZED,
    UNSPECIALIZED,
    carry_in,
    channel_block,
    channel_params,
    chunk_position,
    position_walk,
    segment_walk,
)
from kernels.triton_scan_fast import sigmoid2, softplus2
from kernels.triton_scan_fwd3 import chunk_tiles, discretize, store_chunk_tile


@triton.jit
def _clamp_position(pos, length, REVERSE: tl.constexpr):
    """A position to read at: in range for every position the loop can reach (0 .. chunks * CHUNK, or -1)."""
    if REVERSE:
        return tl.maximum(tl.minimum(pos, length - 1), 0)
    else:
        return tl.minimum(pos, length - 1)


@triton.jit
def _bc_columns(B_seq, C_seq, at, bc_pos_stride, offs_n, n_mask, EVEN_N: tl.constexpr):
    """B and C at position ``at`` (in range), float32 (N_PAD,) vectors; padded states read 0."""
    if EVEN_N:
        B_col = tl.load(B_seq + at * bc_pos_stride + offs_n).to(tl.float32)
        C_col = tl.load(C_seq + at * bc_pos_stride + offs_n).to(tl.float32)
    else:
        B_col = tl.load(B_seq + at * bc_pos_stride + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        C_col = tl.load(C_seq + at * bc_pos_stride + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    return B_col, C_col


@triton.jit
def _store_chunk_state(CHUNK_STATES, h, batch_idx, chunk_idx, n_chunks, n_state, dim, offs_n, offs_d, nd_mask,
                       EVEN_ND: tl.constexpr):
    """The state entering chunk ``chunk_idx``, in every variant's (batch, chunks, N, dim) layout."""
    state_ptrs = ((batch_idx * n_chunks + chunk_idx) * n_state + offs_n[:, None]).to(tl.int64) * dim
    if EVEN_ND:
        tl.store(CHUNK_STATES + state_ptrs + offs_d[None, :], h)
    else:
        tl.store(CHUNK_STATES + state_ptrs + offs_d[None, :], h, mask=nd_mask)


@triton.jit
def _step_inputs(U_row, DELTA_row, Z_row, B_seq, C_seq, pos, length, bias, offs_n, n_mask, bc_pos_stride, seq_sl,
                 z_sl, HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, EVEN_N: tl.constexpr,
                 REVERSE: tl.constexpr, FAST: tl.constexpr):
    """u, dt (0 past the end), B, C and z at one position."""
    at = _clamp_position(pos, length, REVERSE)
    u = tl.load(U_row + at * seq_sl).to(tl.float32)
    dt = tl.load(DELTA_row + at * seq_sl).to(tl.float32)
    B_col, C_col = _bc_columns(B_seq, C_seq, at, bc_pos_stride, offs_n, n_mask, EVEN_N)
    z = u
    if HAS_Z:
        z = tl.load(Z_row + at * z_sl).to(tl.float32)
    if HAS_BIAS:
        dt += bias
    if SOFTPLUS:
        dt = softplus2(dt, FAST)
    dt = tl.where(pos < length, dt, 0.0)
    return u, dt, B_col, C_col, z


@triton.jit
def chunk_io_tiles(rows, Z, seq_row, z_row, chunk_idx, length, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                   HAS_Z: tl.constexpr, REVERSE: tl.constexpr):
    """Per step of one chunk (scan order): the values of the row pointers ``rows`` (u's layout: u, delta, and in
    the backward dout) and then z's, as stored, read as (BLOCK_D, CHUNK) tiles (z = the first row's without HAS_Z).
    Positions outside the sequence read 0."""
    seqs = chunk_tiles(rows, seq_row, chunk_idx, length, BLOCK_D, CHUNK, REVERSE)
    if HAS_Z:
        zs = chunk_tiles((Z,), z_row, chunk_idx, length, BLOCK_D, CHUNK, REVERSE)
    steps = ()
    for s in tl.static_range(CHUNK):
        if HAS_Z:
            steps = steps + (seqs[s] + (zs[s][0],),)
        else:
            steps = steps + (seqs[s] + (seqs[s][0],),)
    return steps


@triton.jit(do_not_specialize=UNSPECIALIZED + SEQ_UNSPECIALIZED)  # see kernels/triton_scan_common.py
def _scan_fwd_kernel_v2(
    U, DELTA, A, B, C, D, Z, DELTA_BIAS,
    OUT, CHUNK_STATES, LAST_STATE, SEG_STATES, SEG_DTSUM,
    dim, length, dim_per_group, n_groups, n_chunks, n_state, a_state_stride, n_seg, chunks_per_seg,
    bc_batch_stride, bc_group_stride, bc_pos_stride,
    seq_sb, seq_sd, seq_sl, z_sb, z_sd, z_sl,
    N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, STORE_STATES: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, FAST: tl.constexpr, TILE_IO: tl.constexpr = False,
    SEGMENTED: tl.constexpr = False,
):
    batch_idx, group, offs_d, d_mask, offs_n, n_mask, nd_mask = channel_block(
        n_groups, dim_per_group, n_state, BLOCK_D, N_PAD)
    A2, D_vec, bias = channel_params(A, D, DELTA_BIAS, a_state_stride, offs_n, offs_d, nd_mask,
                                     d_mask, BLOCK_D, HAS_D, HAS_BIAS)
    # Reads of a channel past the group's end go to its last channel (never stored).
    offs_read = offs_d
    if not EVEN_D:
        offs_read = tl.minimum(offs_d, group * dim_per_group + dim_per_group - 1)
    # u, delta and out (seq_*) and z (z_*) through their strides, as in v1 (sequence_strides).
    seq_row = batch_idx.to(tl.int64) * seq_sb + offs_read.to(tl.int64) * seq_sd
    U_row = U + seq_row
    DELTA_row = DELTA + seq_row
    z_row = batch_idx.to(tl.int64) * z_sb + offs_read.to(tl.int64) * z_sd
    Z_row = Z + z_row
    OUT_row = OUT + seq_row
    B_seq = B + batch_idx.to(tl.int64) * bc_batch_stride + group * bc_group_stride
    C_seq = C + batch_idx.to(tl.int64) * bc_batch_stride + group * bc_group_stride
    h = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    last_mask = nd_mask
    if SEGMENTED:
        # Grid axis 2: the segment of the sequence (kernels/triton_scan_segments.py), entered with the state the
        # earlier segments' summaries carry in; the last one writes the last state.
        seg = tl.program_id(2)
        chunk_idx, chunk_step, count = segment_walk(seg, chunks_per_seg, n_chunks, REVERSE, False)
        h = carry_in(h, SEG_STATES, SEG_DTSUM, 0, seg, 1, batch_idx, n_seg, n_state, dim, A2, offs_d, offs_n, d_mask,
                     nd_mask)
        last_mask = last_mask & (seg == n_seg - 1)
    else:  # the whole sequence (the compiled loop exactly as without segments)
        chunk_idx, chunk_step, count = segment_walk(0, n_chunks, n_chunks, REVERSE, False)
        count = n_chunks
    if TILE_IO:
        # u / delta / z read, and out written, one (BLOCK_D, CHUNK) tile per chunk, the next chunk's tiles read
        # ahead (TILE_IO: unit position strides).
        ahead = chunk_io_tiles((U, DELTA), Z, seq_row, z_row, chunk_idx, length, BLOCK_D, CHUNK, HAS_Z, REVERSE)
        for _i in range(count):
            if STORE_STATES:
                _store_chunk_state(CHUNK_STATES, h, batch_idx, chunk_idx, n_chunks, n_state, dim, offs_n, offs_d,
                                   nd_mask, EVEN_D and EVEN_N)
            steps = ahead
            ahead = chunk_io_tiles((U, DELTA), Z, seq_row, z_row, chunk_idx + chunk_step, length, BLOCK_D, CHUNK,
                                   HAS_Z, REVERSE)
            ys = ()
            for s in tl.static_range(CHUNK):
                pos = chunk_position(chunk_idx * CHUNK, s, CHUNK, REVERSE)
                at = tl.minimum(pos, length - 1)
                u = steps[s][0].to(tl.float32)
                dt, _dt_raw = discretize(steps[s][1], bias, pos < length, HAS_BIAS, SOFTPLUS, FAST)
                B_col, C_col = _bc_columns(B_seq, C_seq, at, bc_pos_stride, offs_n, n_mask, EVEN_N)
                h = tl.exp2(dt[None, :] * A2) * h + B_col[:, None] * (dt * u)[None, :]
                y = tl.sum(h * C_col[:, None], axis=0)
                if HAS_D:
                    y += D_vec * u
                if HAS_Z:
                    z = steps[s][2].to(tl.float32)
                    y = y * z * sigmoid2(z, FAST)
                ys = ys + (y,)
            store_chunk_tile(OUT, seq_row, ys, chunk_idx, length, d_mask, BLOCK_D, CHUNK, REVERSE)
            chunk_idx += chunk_step
    else:
        pos, step = position_walk(chunk_idx, CHUNK, REVERSE)

        u, dt, B_col, C_col, z = _step_inputs(U_row, DELTA_row, Z_row, B_seq, C_seq, pos, length, bias, offs_n,
                                              n_mask, bc_pos_stride, seq_sl, z_sl, HAS_BIAS, HAS_Z, SOFTPLUS, EVEN_N,
                                              REVERSE, FAST)
        for _i in range(count):
            if STORE_STATES:
                _store_chunk_state(CHUNK_STATES, h, batch_idx, chunk_idx, n_chunks, n_state, dim, offs_n, offs_d,
                                   nd_mask, EVEN_D and EVEN_N)
            chunk_idx += chunk_step
            # A runtime loop, as in v1 (statically unrolled, Triton loads B and C in the (N, BLOCK_D) layout: 8
            # loads per lane instead of one and a shared-memory broadcast); LLVM unrolls it.
            for _t in range(CHUNK):
                u_n, dt_n, B_n, C_n, z_n = _step_inputs(U_row, DELTA_row, Z_row, B_seq, C_seq, pos + step, length, bias,
                                                        offs_n, n_mask, bc_pos_stride, seq_sl, z_sl, HAS_BIAS, HAS_Z,
                                                        SOFTPLUS, EVEN_N, REVERSE, FAST)

                h = tl.exp2(dt[None, :] * A2) * h + B_col[:, None] * (dt * u)[None, :]
                y = tl.sum(h * C_col[:, None], axis=0)
                if HAS_D:
                    y += D_vec * u
                if HAS_Z:
                    y = y * z * sigmoid2(z, FAST)
                out_mask = pos < length
                if not EVEN_D:
                    out_mask = out_mask & d_mask
                at = _clamp_position(pos, length, REVERSE)
                tl.store(OUT_row + at * seq_sl, y.to(OUT.dtype.element_ty), mask=out_mask)

                pos = pos + step
                u, dt, B_col, C_col, z = u_n, dt_n, B_n, C_n, z_n

    row = (batch_idx * dim + offs_d).to(tl.int64)
    tl.store(LAST_STATE + row[None, :] * n_state + offs_n[:, None], h, mask=last_mask)
