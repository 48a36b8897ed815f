"""Backward kernel of the selective scan, variant "v2" (ScanLaunchConfig.variant): the v1 kernel
(kernels/triton_scan_bwd.py; same tiles, chunk recompute and adjoint, optional prefetch) with less work per
position:

- dB and dC, sums over the warp's channels, by reduce-scatter (kernels/triton_scan_fast.py): BLOCK_D 16 needs
  8 shuffles per tile and lane instead of a 32-shuffle butterfly; each position's sums then go out as one
  relaxed atomic per lane (no per-chunk layout change through shared memory);
- reads unmasked: positions clamped into [0, length), channels into the group (a clamped channel copies the
  last real one; its dout is zeroed, so its adjoint and every gradient it adds to are zero), chunk indices
  into [0, chunks); stores keep the position mask and drop the channel mask when ``EVEN_D``;
- softplus, sigmoid(z) and softplus' with ``FAST`` approximate math.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_scan_common import (
    SEQ_UNSPECIALIZED,
    UNSPECIALIZED,
    backward_finish,
    backward_start,
    carry_in,
    channel_block,
    channel_params,
    chunk_position,
    segment_walk,
)
from kernels.triton_scan_fast import LOG2E, channel_sum_scatter, scatter_rows, sigmoid2, softplus2
from kernels.triton_scan_fwd2 import _bc_columns, chunk_io_tiles
from kernels.triton_scan_fwd3 import store_chunk_tile


@triton.jit
def _bwd2_chunk_loads(U_row, DELTA_row, Z_row, DOUT_row, seq_sl, z_sl, CHUNK_STATES, offs_n, offs_d, nd_mask,
                      batch_idx, chunk_idx, length, n_chunks, n_state, dim, seq_row, z_row, U, DELTA, Z, DOUT,
                      BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, HAS_Z: tl.constexpr,
                      REVERSE: tl.constexpr, EVEN_ND: tl.constexpr, TILE_IO: tl.constexpr):
    """One chunk's reads as stored (entry state; per position in scan order u, delta, dout, z), unmasked:
    the chunk index and positions are clamped (a prefetch past the last chunk reads the first one again).
    TILE_IO: u / delta / dout / z as one (BLOCK_D, CHUNK) tile each (unit position strides)."""
    chunk_idx = tl.minimum(tl.maximum(chunk_idx, 0), n_chunks - 1)
    state_ptrs = ((batch_idx * n_chunks + chunk_idx) * n_state + offs_n[:, None]).to(tl.int64) * dim
    if EVEN_ND:
        h_in = tl.load(CHUNK_STATES + state_ptrs + offs_d[None, :]).to(tl.float32)  # float32 or bfloat16 saved
    else:
        h_in = tl.load(CHUNK_STATES + state_ptrs + offs_d[None, :], mask=nd_mask, other=0.0).to(tl.float32)
    if TILE_IO:
        return h_in, chunk_io_tiles((U, DELTA, DOUT), Z, seq_row, z_row, chunk_idx, length, BLOCK_D, CHUNK, HAS_Z,
                                    REVERSE)
    loads = ()
    for s in tl.static_range(CHUNK):
        at = tl.minimum(chunk_position(chunk_idx * CHUNK, s, CHUNK, REVERSE), length - 1)
        u = tl.load(U_row + at * seq_sl)
        delta = tl.load(DELTA_row + at * seq_sl)
        dout = tl.load(DOUT_row + at * seq_sl)
        z = u
        if HAS_Z:
            z = tl.load(Z_row + at * z_sl)
        loads = loads + ((u, delta, dout, z),)
    return h_in, loads


@triton.jit(do_not_specialize=UNSPECIALIZED + SEQ_UNSPECIALIZED)  # see kernels/triton_scan_common.py
def _scan_bwd_kernel_v2(
    U, DELTA, A, B, C, D, Z, DELTA_BIAS, DOUT, CHUNK_STATES, DLAST, SEG_ADJOINTS, SEG_DTSUM,
    DU, DDELTA, DZ, DA, DB, DC, DD, DDELTA_BIAS,
    dim, length, dim_per_group, n_groups, n_chunks, n_state, a_state_stride, n_seg, chunks_per_seg,
    bc_batch_stride, bc_group_stride, bc_pos_stride,
    seq_sb, seq_sd, seq_sl, z_sb, z_sd, z_sl,
    N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, HAS_DLAST: tl.constexpr, PREFETCH: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, FAST: tl.constexpr, LEVELS: tl.constexpr,
    TILE_IO: tl.constexpr = False, TILE_GRADS: tl.constexpr = False, SEGMENTED: tl.constexpr = False,
):
    batch_idx, group, offs_d, d_mask, offs_n, n_mask, nd_mask = channel_block(
        n_groups, dim_per_group, n_state, BLOCK_D, N_PAD)
    A2, D_vec, bias = channel_params(A, D, DELTA_BIAS, a_state_stride, offs_n, offs_d, nd_mask,
                                     d_mask, BLOCK_D, HAS_D, HAS_BIAS)
    offs_read = offs_d
    if not EVEN_D:
        offs_read = tl.minimum(offs_d, group * dim_per_group + dim_per_group - 1)
    # u, delta, dout and the gradients du, ddelta, dz (seq_*: one layout) and z (z_*) through their strides, as v1.
    seq_row = batch_idx.to(tl.int64) * seq_sb + offs_read.to(tl.int64) * seq_sd
    U_row = U + seq_row
    DELTA_row = DELTA + seq_row
    z_row = batch_idx.to(tl.int64) * z_sb + offs_read.to(tl.int64) * z_sd
    Z_row = Z + z_row
    DOUT_row = DOUT + seq_row
    # Where du / ddelta / dz go as chunk tiles: in the inputs' layout (TILE_IO), or contiguous (batch, dim, L) whatever
    # the inputs' strides (TILE_GRADS: the copied backward, ScanLaunchConfig.tile_grads).
    TILED: tl.constexpr = TILE_IO or TILE_GRADS
    if TILE_GRADS:
        grad_row = (batch_idx.to(tl.int64) * dim + offs_read.to(tl.int64)) * length
    else:
        grad_row = seq_row
    B_seq = B + batch_idx.to(tl.int64) * bc_batch_stride + group * bc_group_stride
    C_seq = C + batch_idx.to(tl.int64) * bc_batch_stride + group * bc_group_stride
    DB_seq = DB + (batch_idx * n_groups + group).to(tl.int64) * length * n_state
    DC_seq = DC + (batch_idx * n_groups + group).to(tl.int64) * length * n_state
    # Where each lane's dB / dC sums go (state index) and which lanes write them.
    lane_d = tl.arange(0, BLOCK_D)
    sum_rows, sum_owner = scatter_rows(lane_d, N_PAD, BLOCK_D, LEVELS)
    if not EVEN_N:
        sum_owner = sum_owner & (sum_rows < n_state)

    g, dA_acc, dD_acc, dbias_acc = backward_start(DLAST, batch_idx, dim, n_state, offs_n, offs_d, nd_mask, N_PAD,
                                                  BLOCK_D, HAS_DLAST)
    if SEGMENTED:
        # Grid axis 2: the segment (kernels/triton_scan_segments.py), entered with the adjoint that the later
        # segments carry in.
        seg = tl.program_id(2)
        chunk_idx, chunk_step, count = segment_walk(seg, chunks_per_seg, n_chunks, REVERSE, True)
        g = carry_in(g, SEG_ADJOINTS, SEG_DTSUM, n_seg - 1, n_seg - 1 - seg, -1, batch_idx, n_seg, n_state, dim, A2,
                     offs_d, offs_n, d_mask, nd_mask)
    else:  # the whole sequence (the compiled loop exactly as without segments)
        chunk_idx, chunk_step, count = segment_walk(0, n_chunks, n_chunks, REVERSE, True)
        count = n_chunks
    if PREFETCH:
        ahead = _bwd2_chunk_loads(U_row, DELTA_row, Z_row, DOUT_row, seq_sl, z_sl, CHUNK_STATES, offs_n, offs_d,
                                  nd_mask, batch_idx, chunk_idx, length, n_chunks, n_state, dim, seq_row, z_row, U, DELTA,
                                  Z, DOUT, BLOCK_D, CHUNK, HAS_Z, REVERSE, EVEN_D and EVEN_N, TILE_IO)
    for _i in range(count):
        base = chunk_idx * CHUNK
        if PREFETCH:
            h_in, loads = ahead
            ahead = _bwd2_chunk_loads(U_row, DELTA_row, Z_row, DOUT_row, seq_sl, z_sl, CHUNK_STATES, offs_n,
                                      offs_d, nd_mask, batch_idx, chunk_idx + chunk_step, length, n_chunks, n_state,
                                      dim, seq_row, z_row, U, DELTA, Z, DOUT, BLOCK_D, CHUNK, HAS_Z, REVERSE,
                                      EVEN_D and EVEN_N, TILE_IO)
        else:
            h_in, loads = _bwd2_chunk_loads(U_row, DELTA_row, Z_row, DOUT_row, seq_sl, z_sl, CHUNK_STATES, offs_n,
                                            offs_d, nd_mask, batch_idx, chunk_idx, length, n_chunks, n_state, dim,
                                            seq_row, z_row, U, DELTA, Z, DOUT, BLOCK_D, CHUNK, HAS_Z, REVERSE,
                                            EVEN_D and EVEN_N, TILE_IO)

        # Recompute the chunk's states and decays (index s = scan order in the chunk), as in v1.
        h = h_in
        states = ()
        decays = ()
        steps = ()
        slopes = ()
        for s in tl.static_range(CHUNK):
            pos = chunk_position(base, s, CHUNK, REVERSE)
            at = tl.minimum(pos, length - 1)
            u = loads[s][0].to(tl.float32)
            dt_raw = loads[s][1].to(tl.float32)
            if HAS_BIAS:
                dt_raw += bias
            if SOFTPLUS:
                dt = softplus2(dt_raw, FAST)
            else:
                dt = dt_raw
            dt = tl.where(pos < length, dt, 0.0)
            a = tl.exp2(dt[None, :] * A2)
            if EVEN_N:
                B_col = tl.load(B_seq + at * bc_pos_stride + offs_n).to(tl.float32)
            else:
                B_col = tl.load(B_seq + at * bc_pos_stride + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            h = a * h + B_col[:, None] * (dt * u)[None, :]
            states = states + (h,)
            decays = decays + (a,)
            steps = steps + (dt,)
            if SOFTPLUS:
                # softplus'(x) = sigmoid(x) = exp(x - softplus(x)).
                slopes = slopes + (tl.exp2((dt_raw - dt) * LOG2E),)
            else:
                slopes = slopes + (dt,)

        # Adjoint, backwards through the chunk (TILED: its gradients gathered in scan order, stored as tiles).
        dus = ()
        ddts = ()
        dzs = ()
        for r in tl.static_range(CHUNK):
            pos = chunk_position(base, CHUNK - 1 - r, CHUNK, REVERSE)
            at = tl.minimum(pos, length - 1)
            valid = pos < length
            m = valid
            if not EVEN_D:
                m = m & d_mask
            h = states[CHUNK - 1 - r]
            a = decays[CHUNK - 1 - r]
            dt = steps[CHUNK - 1 - r]
            u = loads[CHUNK - 1 - r][0].to(tl.float32)
            if CHUNK - 1 - r > 0:
                h_prev = states[CHUNK - 2 - r]
            else:
                h_prev = h_in
            B_col, C_col = _bc_columns(B_seq, C_seq, at, bc_pos_stride, offs_n, n_mask, EVEN_N)
            # Past the end (and on clamped channels) dout is zero: no adjoint input, no dB / dC / dD.
            dout = tl.where(m, loads[CHUNK - 1 - r][2].to(tl.float32), 0.0)
            if HAS_Z:
                z = loads[CHUNK - 1 - r][3].to(tl.float32)
                y = tl.sum(h * C_col[:, None], axis=0)
                if HAS_D:
                    y += D_vec * u
                sig_z = sigmoid2(z, FAST)
                dz = dout * y * sig_z * (1.0 + z * (1.0 - sig_z))
                if TILED:
                    dzs = (dz,) + dzs
                else:
                    tl.store(DZ + seq_row + at * seq_sl, dz.to(DZ.dtype.element_ty), mask=m)
                dy = dout * z * sig_z
            else:
                dy = dout

            g = g + C_col[:, None] * dy[None, :]
            decayed_prev = a * h_prev
            g_dot_B = tl.sum(g * B_col[:, None], axis=0)
            ddt = u * g_dot_B + tl.sum(g * decayed_prev * A2, axis=0) * 0.6931471805599453
            du = dt * g_dot_B
            if HAS_D:
                du += D_vec * dy
                dD_acc += dy * u
            dA_acc += g * decayed_prev * dt[None, :]
            if SOFTPLUS:
                ddt = ddt * slopes[CHUNK - 1 - r]
            ddt = tl.where(m, ddt, 0.0)
            if HAS_BIAS:
                dbias_acc += ddt
            if TILED:
                dus = (du,) + dus
                ddts = (ddt,) + ddts
            else:
                tl.store(DU + seq_row + at * seq_sl, du.to(DU.dtype.element_ty), mask=m)
                tl.store(DDELTA + seq_row + at * seq_sl, ddt.to(DDELTA.dtype.element_ty), mask=m)

            # dB / dC of this position: reduce-scattered over the channels, one atomic per owning lane.
            dB_part = channel_sum_scatter(g * (dt * u)[None, :], lane_d, N_PAD, BLOCK_D, LEVELS)
            dC_part = channel_sum_scatter(h * dy[None, :], lane_d, N_PAD, BLOCK_D, LEVELS)
            bc_ptrs = at * n_state + sum_rows
            tl.atomic_add(DB_seq + bc_ptrs, dB_part, mask=sum_owner & valid, sem="relaxed")
            tl.atomic_add(DC_seq + bc_ptrs, dC_part, mask=sum_owner & valid, sem="relaxed")
            g = a * g
        if TILED:
            store_chunk_tile(DU, grad_row, dus, chunk_idx, length, d_mask, BLOCK_D, CHUNK, REVERSE)
            store_chunk_tile(DDELTA, grad_row, ddts, chunk_idx, length, d_mask, BLOCK_D, CHUNK, REVERSE)
            if HAS_Z:
                store_chunk_tile(DZ, grad_row, dzs, chunk_idx, length, d_mask, BLOCK_D, CHUNK, REVERSE)
        chunk_idx += chunk_step

    backward_finish(DA, DD, DDELTA_BIAS, dA_acc, dD_acc, dbias_acc, offs_d, offs_n, n_state, d_mask, nd_mask,
                    HAS_D, HAS_BIAS)
