"""Backward kernel of the selective scan, variant "v3" (ScanLaunchConfig.variant): one lane per channel, as in
its forward (kernels/triton_scan_fwd3.py).

Per chunk (in the opposite scan order) the chunk's states are recomputed from the saved entry state and kept in
registers; the decays are not kept but recomputed in the adjoint (one exp2 per state costs less than
CHUNK * N registers), and the decayed previous state the adjoint needs is h - B * dt * u, so the entry state
is not kept either. Sums over N stay in each lane's registers. dB and dC, sums over channels, are stacked
into one (2 * N_PAD, BLOCK_D) tile per position and reduce-scattered over the warp
(kernels/triton_scan_fast.py): with N_PAD = 16 every lane ends with one of the 32 sums and adds it with one
relaxed atomic. dA, dD and ddelta_bias are summed in registers and added once per program.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_scan_common import (
    UNSPECIALIZED,
    backward_finish,
    backward_start,
    carry_in,
    channel_block,
    channel_params,
    chunk_position,
    segment_walk,
)
from kernels.triton_scan_fast import LN2, LOG2E, channel_sum_scatter, scatter_rows, sigmoid2
from kernels.triton_scan_fwd3 import chunk_tiles, discretize, store_chunk_tile


@triton.jit
def _stack_rows(top, bottom, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """Two (N_PAD, BLOCK_D) tiles as one (2 * N_PAD, BLOCK_D) tile, ``top`` first."""
    return tl.reshape(tl.permute(tl.join(top, bottom), (2, 0, 1)), (2 * N_PAD, BLOCK_D))


@triton.jit(do_not_specialize=UNSPECIALIZED)  # see kernels/triton_scan_common.py
def _scan_bwd_kernel_v3(
    U, DELTA, A, B, C, D, Z, DELTA_BIAS, DOUT, CHUNK_STATES, DLAST, SEG_ADJOINTS, SEG_DTSUM,
    DU, DDELTA, DZ, DA, DBC, DD, DDELTA_BIAS,
    dim, length, dim_per_group, n_groups, n_chunks, n_state, a_state_stride, n_seg, chunks_per_seg,
    N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, HAS_DLAST: tl.constexpr, PREFETCH: tl.constexpr,
    FAST: tl.constexpr, LEVELS: tl.constexpr,
):
    batch_idx, group, offs_d, d_mask, offs_n, n_mask, nd_mask = channel_block(
        n_groups, dim_per_group, n_state, BLOCK_D, N_PAD)
    A2, D_vec, bias = channel_params(A, D, DELTA_BIAS, a_state_stride, offs_n, offs_d, nd_mask,
                                     d_mask, BLOCK_D, HAS_D, HAS_BIAS)
    row = (batch_idx * dim + offs_d).to(tl.int64)
    seq_row = row * length
    last_channel = group * dim_per_group + dim_per_group - 1
    read_row = (batch_idx * dim + tl.minimum(offs_d, last_channel)).to(tl.int64) * length
    bg = (batch_idx * n_groups + group).to(tl.int64)
    B_seq = B + bg * length * N_PAD
    C_seq = C + bg * length * N_PAD
    # dB and dC of a position side by side: (batch, groups, L, 2, N_PAD).
    DBC_seq = DBC + bg * length * 2 * N_PAD
    rows = (U, DELTA, DOUT, Z) if HAS_Z else (U, DELTA, DOUT)
    # Where each lane's dB / dC sum goes (row of the stacked tile) and which lanes write it.
    sum_rows, sum_owner = scatter_rows(tl.arange(0, BLOCK_D), 2 * N_PAD, BLOCK_D, LEVELS)

    g, dA_acc, dD_acc, dbias_acc = backward_start(DLAST, batch_idx, dim, n_state, offs_n, offs_d, nd_mask, N_PAD,
                                                  BLOCK_D, HAS_DLAST)
    # Grid axis 2: the segment (kernels/triton_scan_segments.py), entered with the adjoint that the later
    # segments carry in.
    seg = tl.program_id(2)
    chunk_idx, chunk_step, count = segment_walk(seg, chunks_per_seg, n_chunks, REVERSE, True)
    g = carry_in(g, SEG_ADJOINTS, SEG_DTSUM, n_seg - 1, n_seg - 1 - seg, -1, batch_idx, n_seg, n_state, dim, A2,
                 offs_d, offs_n, d_mask, nd_mask)
    if PREFETCH:
        ahead = chunk_tiles(rows, read_row, chunk_idx, length, BLOCK_D, CHUNK, REVERSE)
    for _i in range(count):
        if PREFETCH:
            current = ahead
            ahead = chunk_tiles(rows, read_row, chunk_idx + chunk_step, length, BLOCK_D, CHUNK, REVERSE)
        else:
            current = chunk_tiles(rows, read_row, chunk_idx, length, BLOCK_D, CHUNK, REVERSE)
        # The entry state (state_offsets' layout): an int64 base for the chunk, int32 offsets within
        # it. The offsets take state rows offs_n + 0, with a 0 (chunk_idx >= 0 here) that the compiler
        # cannot see through: with plain offs_n it kept the 16 loop-invariant int64 row offsets across
        # the loop in 32 registers (offline sm_90, Triton 3.6: chunk 2 at 242 registers instead of
        # about 200). Now they cost 2 instructions a row per chunk.
        zero = tl.minimum(chunk_idx, 0)
        chunk_states = CHUNK_STATES + (batch_idx * n_chunks + chunk_idx).to(tl.int64) * n_state * dim
        h = tl.load(chunk_states + ((offs_n + zero)[:, None] * dim + offs_d[None, :]), mask=nd_mask,
                    other=0.0).to(tl.float32)  # float32 or bfloat16 saved (ScanLaunchConfig.bf16_states)

        # Recompute the chunk's states (index s = scan order in the chunk) and each position's dt.
        states = ()
        steps = ()
        for s in tl.static_range(CHUNK):
            pos = chunk_position(chunk_idx * CHUNK, s, CHUNK, REVERSE)
            at = tl.minimum(pos, length - 1)
            dt, dt_raw = discretize(current[s][1], bias, (pos < length) & d_mask, HAS_BIAS, SOFTPLUS, FAST)
            B_col = tl.load(B_seq + at * N_PAD + offs_n)
            h = tl.exp2(dt[None, :] * A2) * h + B_col[:, None] * (dt * current[s][0].to(tl.float32))[None, :]
            states = states + (h,)
            steps = steps + ((dt, dt_raw),)

        # Adjoint, backwards through the chunk; du / ddelta / dz leave as one tile each.
        du_steps = ()
        ddt_steps = ()
        dz_steps = ()
        for r in tl.static_range(CHUNK):
            pos = chunk_position(chunk_idx * CHUNK, CHUNK - 1 - r, CHUNK, REVERSE)
            at = tl.minimum(pos, length - 1)
            valid = pos < length
            m = valid & d_mask
            h = states[CHUNK - 1 - r]
            dt = steps[CHUNK - 1 - r][0]
            loaded = current[CHUNK - 1 - r]
            u = loaded[0].to(tl.float32)
            B_col = tl.load(B_seq + at * N_PAD + offs_n)
            C_col = tl.load(C_seq + at * N_PAD + offs_n)
            # Past the end and on clamped channels dout is zero: no adjoint input, no dB / dC / dD.
            dout = tl.where(m, loaded[2].to(tl.float32), 0.0)
            if HAS_Z:
                z = loaded[3].to(tl.float32)
                y = tl.sum(h * C_col[:, None], axis=0)
                if HAS_D:
                    y += D_vec * u
                sig_z = sigmoid2(z, FAST)
                dz = dout * y * sig_z * (1.0 + z * (1.0 - sig_z))
                dz_steps = dz_steps + (dz,)
                dy = dout * z * sig_z
            else:
                dy = dout

            dtu = dt * u
            g = g + C_col[:, None] * dy[None, :]
            # a * h_prev from this position's state: h = a * h_prev + B * dt * u.
            q = g * (h - B_col[:, None] * dtu[None, :])
            g_dot_B = tl.sum(g * B_col[:, None], axis=0)
            ddt = u * g_dot_B + tl.sum(q * A2, axis=0) * LN2
            du = dt * g_dot_B
            if HAS_D:
                du += D_vec * dy
                dD_acc += dy * u
            dA_acc += q * dt[None, :]
            if SOFTPLUS:
                # softplus'(x) = sigmoid(x) = exp(x - softplus(x)).
                ddt = ddt * tl.exp2((steps[CHUNK - 1 - r][1] - dt) * LOG2E)
            ddt = tl.where(m, ddt, 0.0)
            if HAS_BIAS:
                dbias_acc += ddt
            du_steps = du_steps + (du,)
            ddt_steps = ddt_steps + (ddt,)

            sums = channel_sum_scatter(_stack_rows(g * dtu[None, :], h * dy[None, :], N_PAD, BLOCK_D),
                                       tl.arange(0, BLOCK_D), 2 * N_PAD, BLOCK_D, LEVELS)
            tl.atomic_add(DBC_seq + at * 2 * N_PAD + sum_rows, sums, mask=sum_owner & valid, sem="relaxed")
            # dt + 0.0 (the same value; not folded, since -0.0 + 0.0 is +0.0) keeps the compiler from
            # reusing the recompute's decays, which kept all CHUNK * N of them across the adjoint (chunk 4:
            # 255 registers and spills) to save 16 exp2 and 16 multiplies per position.
            g = tl.exp2((dt + 0.0)[None, :] * A2) * g
        # The steps were collected backwards (r = CHUNK - 1 - s): a reverse walk of the chunk's scan order.
        store_chunk_tile(DU, seq_row, du_steps, chunk_idx, length, d_mask, BLOCK_D, CHUNK, not REVERSE)
        store_chunk_tile(DDELTA, seq_row, ddt_steps, chunk_idx, length, d_mask, BLOCK_D, CHUNK, not REVERSE)
        if HAS_Z:
            store_chunk_tile(DZ, seq_row, dz_steps, chunk_idx, length, d_mask, BLOCK_D, CHUNK, not REVERSE)
        chunk_idx += chunk_step

    backward_finish(DA, DD, DDELTA_BIAS, dA_acc, dD_acc, dbias_acc, offs_d, offs_n, n_state, d_mask, nd_mask,
                    HAS_D, HAS_BIAS)
