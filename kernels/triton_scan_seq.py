"""Per-channel ("seq2") Triton kernels of the selective scan: forward and backward, and their launchers.

Each program is one warp that owns BLOCK_D channels of one (batch, group) pair. Tiles are (N_PAD, BLOCK_D)
with the channels fastest, so Triton gives each channel 32 / BLOCK_D lanes and each lane N_PAD * BLOCK_D / 32
of its states: with BLOCK_D = 32 a thread holds all N states of one channel, with BLOCK_D = 8 four threads
share a channel (four times the parallelism, two shuffle steps per sum over N). Positions are walked one by
one; there are no shared-memory tiles and no layout conversions inside the loops.

Forward: the next position's inputs are loaded before the current position is computed (one step of
software prefetch), and the state entering every CHUNK positions is saved for the backward.

Backward: chunks in the opposite scan order. Per chunk the CHUNK forward states and decays are recomputed
from the saved chunk-entry state into registers (a statically unrolled tuple, so CHUNK * N_PAD * BLOCK_D / 32
registers each), then the adjoint runs backwards over them:

    g = g_carry + C[l] * dy[l];  grads at l;  g_carry = a[l] * g

The chunk's u, delta, dout and z are read once (the adjoint reuses u and softplus'(dt_raw) from the
recompute), and with ScanLaunchConfig.prefetch one chunk ahead.

dB and dC (sums over channels) are reduced inside the warp per position, collected into (N, CHUNK) tiles
and added with relaxed float32 atomics once per chunk (one layout change per chunk, not per position); dA, dD and ddelta_bias are summed in registers and added once per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_scan_common import ScanLaunchConfig, softplus


@triton.jit
def _position_inputs(U, DELTA, DELTA_BIAS_VEC, seq_row, pos, length, d_mask,
                     HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """u, discretisation step dt and pre-activation dt_raw of every channel at one position (zeros past
    either end, which makes that position an identity step)."""
    valid = (pos >= 0) & (pos < length)
    m = d_mask & valid
    u = tl.load(U + seq_row + pos, mask=m, other=0.0).to(tl.float32)
    dt_raw = tl.load(DELTA + seq_row + pos, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt_raw += DELTA_BIAS_VEC
    if SOFTPLUS:
        dt = softplus(dt_raw)
    else:
        dt = dt_raw
    dt = tl.where(m, dt, 0.0)
    return u, dt, dt_raw


@triton.jit
def _segment_entry(SEG_LOCAL, SEG_SUMDT, A2, batch_idx, offs_n, offs_d, nd_mask, d_mask, dim, n_seg, n_state,
                   x, j0, count, j_step):
    """Fold ``count`` segment summaries into x, starting at segment j0 and moving by j_step:
    x = exp(A * sum of dt over segment j) * x + local_j (the whole segment as one linear step)."""
    for k in range(count):
        j = j0 + k * j_step
        sum_dt = tl.load(SEG_SUMDT + (batch_idx * n_seg + j).to(tl.int64) * dim + offs_d, mask=d_mask, other=0.0)
        ptrs = ((batch_idx * n_seg + j) * n_state + offs_n[:, None]).to(tl.int64) * dim + offs_d[None, :]
        x = tl.exp2(A2 * sum_dt[None, :]) * x + tl.load(SEG_LOCAL + ptrs, mask=nd_mask, other=0.0)
    return x


@triton.jit(do_not_specialize=["dim", "dim_per_group"])
def _segment_summary_kernel(
    U, DELTA, A_T, BC, Z, DOUT, DELTA_BIAS, SEG_LOCAL, SEG_SUMDT,
    dim, length, dim_per_group, n_groups, n_chunks, n_state, seg_chunks, n_seg,
    N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
    ADJOINT: tl.constexpr,
):
    """One segment as a single linear step, from a zero start, and its sum of dt.

    Forward (ADJOINT False, segments 0 .. n_seg-2): the state at the segment's end, h = a*h + B*dt*u in
    scan order. Adjoint (segments 1 .. n_seg-1): the adjoint leaving the segment at its start,
    g = a*(g + C*dy) against scan order. Grid: (channel blocks, batch * groups, n_seg - 1)."""
    pid_d = tl.program_id(0)
    pid_bg = tl.program_id(1)
    seg = tl.program_id(2) + ADJOINT
    batch_idx = pid_bg // n_groups
    group = pid_bg % n_groups
    offs_in_group = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_in_group < dim_per_group
    offs_d = group * dim_per_group + offs_in_group
    offs_n = tl.arange(0, N_PAD)
    n_mask = offs_n < n_state
    nd_mask = n_mask[:, None] & d_mask[None, :]
    A2 = tl.load(A_T + offs_n[:, None] * dim + offs_d[None, :], mask=nd_mask, other=0.0) * 1.4426950408889634
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(DELTA_BIAS + offs_d, mask=d_mask, other=0.0)
    seq_row = (batch_idx * dim + offs_d).to(tl.int64) * length
    BC_seq = BC + (batch_idx * n_groups + group).to(tl.int64) * length * n_state

    n_pos = tl.minimum(seg_chunks, n_chunks - seg * seg_chunks) * CHUNK
    x = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    sum_dt = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t in range(n_pos):
        if ADJOINT:
            q = seg * seg_chunks * CHUNK + n_pos - 1 - t  # scan-order index, walked backwards
        else:
            q = seg * seg_chunks * CHUNK + t
        if REVERSE:
            pos = n_chunks * CHUNK - 1 - q
        else:
            pos = q
        valid = pos < length
        u, dt, _ = _position_inputs(U, DELTA, bias, seq_row, pos, length, d_mask, HAS_BIAS, SOFTPLUS)
        col = tl.load(BC_seq + pos * n_state + offs_n, mask=n_mask & valid, other=0.0).to(tl.float32)
        a = tl.exp2(dt[None, :] * A2)
        sum_dt += dt
        if ADJOINT:
            dy = tl.load(DOUT + seq_row + pos, mask=d_mask & valid, other=0.0).to(tl.float32)
            if HAS_Z:
                z = tl.load(Z + seq_row + pos, mask=d_mask & valid, other=0.0).to(tl.float32)
                dy = dy * z * tl.sigmoid(z)
            x = a * (x + col[:, None] * dy[None, :])
        else:
            x = a * x + col[:, None] * (dt * u)[None, :]
    ptrs = ((batch_idx * n_seg + seg) * n_state + offs_n[:, None]).to(tl.int64) * dim + offs_d[None, :]
    tl.store(SEG_LOCAL + ptrs, x, mask=nd_mask)
    tl.store(SEG_SUMDT + (batch_idx * n_seg + seg).to(tl.int64) * dim + offs_d, sum_dt, mask=d_mask)


@triton.jit
def _bwd_chunk_loads(U, DELTA, Z, DOUT, B_seq, C_seq, CHUNK_STATES, seq_row, offs_n, offs_d, n_mask, d_mask,
                     nd_mask, batch_idx, chunk_idx, ok, length, n_chunks, n_state, dim,
                     CHUNK: tl.constexpr, HAS_Z: tl.constexpr, REVERSE: tl.constexpr):
    """The backward's per-channel reads for one chunk, as loaded (storage dtype): the saved entry state and,
    per position in scan order, u, delta, dout and z. Issued one chunk ahead (``ok`` False past the
    program's last chunk) so that their latency hides behind the current chunk's arithmetic. (B and C,
    N values per position, would not fit: carried too, they spill.)"""
    state_ptrs = ((batch_idx * n_chunks + chunk_idx) * n_state + offs_n[:, None]).to(tl.int64) * dim
    h_in = tl.load(CHUNK_STATES + state_ptrs + offs_d[None, :], mask=nd_mask & ok, other=0.0)
    base = chunk_idx * CHUNK
    loads = ()
    for s in tl.static_range(CHUNK):
        if REVERSE:
            pos = base + (CHUNK - 1 - s)
        else:
            pos = base + s
        valid = (pos < length) & ok
        m = d_mask & valid
        u = tl.load(U + seq_row + pos, mask=m, other=0.0)
        delta = tl.load(DELTA + seq_row + pos, mask=m, other=0.0)
        dout = tl.load(DOUT + seq_row + pos, mask=m, other=0.0)
        z = u
        if HAS_Z:
            z = tl.load(Z + seq_row + pos, mask=m, other=0.0)
        loads = loads + ((u, delta, dout, z),)
    return h_in, loads


# dim and dim_per_group are not specialised on divisibility by 16: with that hint Triton vectorises the
# (N, BLOCK_D) tiles 4 channels per thread, which costs 3-level shuffles in every sum over N (sm_90 SASS,
# bench/scan_sass.py: forward 236 -> 146 and backward 523 -> 480 instructions per position at dim 768).
@triton.jit(do_not_specialize=["dim", "dim_per_group"])
def _scan_fwd_seq2_kernel(
    U, DELTA, A_T, B, C, D, Z, DELTA_BIAS,
    OUT, CHUNK_STATES, LAST_STATE, SEG_LOCAL, SEG_SUMDT,
    dim, length, dim_per_group, n_groups, n_chunks, n_state, seg_chunks, n_seg,
    N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, STORE_STATES: tl.constexpr, SEGMENTED: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_bg = tl.program_id(1)
    pid_s = tl.program_id(2)  # segment of the sequence (scan order); 0 when not SEGMENTED
    batch_idx = pid_bg // n_groups
    group = pid_bg % n_groups

    offs_in_group = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_in_group < dim_per_group
    offs_d = group * dim_per_group + offs_in_group
    offs_n = tl.arange(0, N_PAD)
    n_mask = offs_n < n_state
    nd_mask = n_mask[:, None] & d_mask[None, :]

    # A is (N, dim) here; scaled by log2(e) so each decay is a single exp2.
    A2 = tl.load(A_T + offs_n[:, None] * dim + offs_d[None, :], mask=nd_mask, other=0.0) * 1.4426950408889634
    D_vec = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        D_vec = tl.load(D + offs_d, mask=d_mask, other=0.0)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(DELTA_BIAS + offs_d, mask=d_mask, other=0.0)

    row = (batch_idx * dim + offs_d).to(tl.int64)
    seq_row = row * length
    # B and C come as (batch, groups, L, N): one position's N values are contiguous.
    B_seq = B + (batch_idx * n_groups + group).to(tl.int64) * length * n_state
    C_seq = C + (batch_idx * n_groups + group).to(tl.int64) * length * n_state
    # This program's scan-order chunks: [first_chunk, first_chunk + my_chunks).
    first_chunk = pid_s * seg_chunks
    my_chunks = tl.minimum(seg_chunks, n_chunks - first_chunk)
    if REVERSE:
        step = -1
        pos = n_chunks * CHUNK - 1 - first_chunk * CHUNK
    else:
        step = 1
        pos = first_chunk * CHUNK

    # Inputs of the first position; each step then loads the next position's before computing its own.
    u, dt, _ = _position_inputs(U, DELTA, bias, seq_row, pos, length, d_mask, HAS_BIAS, SOFTPLUS)
    valid = (pos >= 0) & (pos < length)
    B_col = tl.load(B_seq + pos * n_state + offs_n, mask=n_mask & valid, other=0.0).to(tl.float32)
    C_col = tl.load(C_seq + pos * n_state + offs_n, mask=n_mask & valid, other=0.0).to(tl.float32)
    z = u
    if HAS_Z:
        z = tl.load(Z + seq_row + pos, mask=d_mask & valid, other=0.0).to(tl.float32)

    h = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    if SEGMENTED:
        h = _segment_entry(SEG_LOCAL, SEG_SUMDT, A2, batch_idx, offs_n, offs_d, nd_mask, d_mask, dim, n_seg,
                           n_state, h, 0, pid_s, 1)
    for i in range(my_chunks):
        if STORE_STATES:
            if REVERSE:
                chunk_idx = n_chunks - 1 - (first_chunk + i)
            else:
                chunk_idx = first_chunk + i
            state_ptrs = ((batch_idx * n_chunks + chunk_idx) * n_state + offs_n[:, None]).to(tl.int64) * dim
            tl.store(CHUNK_STATES + state_ptrs + offs_d[None, :], h, mask=nd_mask)
        for _t in range(CHUNK):
            nxt = pos + step
            nxt_valid = (nxt >= 0) & (nxt < length)
            u_n, dt_n, _ = _position_inputs(U, DELTA, bias, seq_row, nxt, length, d_mask, HAS_BIAS, SOFTPLUS)
            B_n = tl.load(B_seq + nxt * n_state + offs_n, mask=n_mask & nxt_valid, other=0.0).to(tl.float32)
            C_n = tl.load(C_seq + nxt * n_state + offs_n, mask=n_mask & nxt_valid, other=0.0).to(tl.float32)
            z_n = u_n
            if HAS_Z:
                z_n = tl.load(Z + seq_row + nxt, mask=d_mask & nxt_valid, other=0.0).to(tl.float32)

            h = tl.exp2(dt[None, :] * A2) * h + B_col[:, None] * (dt * u)[None, :]
            y = tl.sum(h * C_col[:, None], axis=0)
            if HAS_D:
                y += D_vec * u
            if HAS_Z:
                y = y * z * tl.sigmoid(z)
            valid = (pos >= 0) & (pos < length)
            tl.store(OUT + seq_row + pos, y.to(OUT.dtype.element_ty), mask=d_mask & valid)

            pos = nxt
            u, dt, B_col, C_col, z = u_n, dt_n, B_n, C_n, z_n

    tl.store(LAST_STATE + row[None, :] * n_state + offs_n[:, None], h, mask=nd_mask & (pid_s == n_seg - 1))


@triton.jit(do_not_specialize=["dim", "dim_per_group"])  # see the forward
def _scan_bwd_seq2_kernel(
    U, DELTA, A_T, B, C, D, Z, DELTA_BIAS, DOUT, CHUNK_STATES, DLAST,
    DU, DDELTA, DZ, DA, DB, DC, DD, DDELTA_BIAS, SEG_LOCAL, SEG_SUMDT,
    dim, length, dim_per_group, n_groups, n_chunks, n_state, seg_chunks, n_seg,
    N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, HAS_DLAST: tl.constexpr, SEGMENTED: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_bg = tl.program_id(1)
    pid_s = tl.program_id(2)  # segment of the sequence (scan order); 0 when not SEGMENTED
    batch_idx = pid_bg // n_groups
    group = pid_bg % n_groups

    offs_in_group = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_in_group < dim_per_group
    offs_d = group * dim_per_group + offs_in_group
    offs_n = tl.arange(0, N_PAD)
    n_mask = offs_n < n_state
    nd_mask = n_mask[:, None] & d_mask[None, :]
    offs_c = tl.arange(0, CHUNK)

    # Only A * log2(e) is kept (one tile fewer of registers); sums over A * x are scaled by ln(2) after.
    A2 = tl.load(A_T + offs_n[:, None] * dim + offs_d[None, :], mask=nd_mask, other=0.0) * 1.4426950408889634
    D_vec = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        D_vec = tl.load(D + offs_d, mask=d_mask, other=0.0)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(DELTA_BIAS + offs_d, mask=d_mask, other=0.0)

    row = (batch_idx * dim + offs_d).to(tl.int64)
    seq_row = row * length
    # B and C come as (batch, groups, L, N): one position's N values are contiguous.
    B_seq = B + (batch_idx * n_groups + group).to(tl.int64) * length * n_state
    C_seq = C + (batch_idx * n_groups + group).to(tl.int64) * length * n_state
    DB_seq = DB + (batch_idx * n_groups + group).to(tl.int64) * length * n_state
    DC_seq = DC + (batch_idx * n_groups + group).to(tl.int64) * length * n_state

    # Adjoint of the state after the current position: starts as the last state's incoming gradient.
    g = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    if HAS_DLAST:
        g = tl.load(DLAST + row[None, :] * n_state + offs_n[:, None], mask=nd_mask, other=0.0)
    if SEGMENTED:
        # Adjoint entering this segment from its end: fold in the later segments, last one first.
        g = _segment_entry(SEG_LOCAL, SEG_SUMDT, A2, batch_idx, offs_n, offs_d, nd_mask, d_mask, dim, n_seg,
                           n_state, g, n_seg - 1, n_seg - 1 - pid_s, -1)
    dA_acc = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)

    # This program's scan-order chunks, walked from the last: last_chunk, last_chunk - 1, ...
    first_chunk = pid_s * seg_chunks
    my_chunks = tl.minimum(seg_chunks, n_chunks - first_chunk)
    last_chunk = first_chunk + my_chunks - 1
    if REVERSE:
        chunk_idx = n_chunks - 1 - last_chunk
    else:
        chunk_idx = last_chunk
    h_in_zero = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    ahead = (h_in_zero, ())
    if PREFETCH:
        ahead = _bwd_chunk_loads(U, DELTA, Z, DOUT, B_seq, C_seq, CHUNK_STATES, seq_row, offs_n, offs_d, n_mask,
                                 d_mask, nd_mask, batch_idx, chunk_idx, my_chunks > 0, length, n_chunks, n_state,
                                 dim, CHUNK, HAS_Z, REVERSE)
    for i in range(my_chunks):
        if REVERSE:
            chunk_idx = n_chunks - 1 - (last_chunk - i)
            next_idx = chunk_idx + 1
        else:
            chunk_idx = last_chunk - i
            next_idx = chunk_idx - 1
        base = chunk_idx * CHUNK
        if PREFETCH:
            h_in, loads = ahead
            # The next chunk's loads go out before this chunk's arithmetic.
            ahead = _bwd_chunk_loads(U, DELTA, Z, DOUT, B_seq, C_seq, CHUNK_STATES, seq_row, offs_n, offs_d,
                                     n_mask, d_mask, nd_mask, batch_idx, next_idx, i + 1 < my_chunks, length,
                                     n_chunks, n_state, dim, CHUNK, HAS_Z, REVERSE)
        else:
            h_in, loads = _bwd_chunk_loads(U, DELTA, Z, DOUT, B_seq, C_seq, CHUNK_STATES, seq_row, offs_n, offs_d,
                                           n_mask, d_mask, nd_mask, batch_idx, chunk_idx, True, length,
                                           n_chunks, n_state, dim, CHUNK, HAS_Z, REVERSE)

        # Recompute the chunk's states and decays, kept in registers (index s = scan order in the chunk),
        # with dt and softplus'(dt_raw) per position. B and C are read where they are used, not kept for
        # the chunk: kept, they cost 64 registers (254, and 145 spill instructions under maxnreg 168).
        h = h_in
        states = ()
        decays = ()
        steps = ()
        slopes = ()
        for s in tl.static_range(CHUNK):
            u = loads[s][0].to(tl.float32)
            dt_raw = loads[s][1].to(tl.float32)
            if HAS_BIAS:
                dt_raw += bias
            if SOFTPLUS:
                dt = softplus(dt_raw)
            else:
                dt = dt_raw
            if REVERSE:
                pos = base + (CHUNK - 1 - s)
            else:
                pos = base + s
            dt = tl.where(d_mask & (pos < length), dt, 0.0)
            a = tl.exp2(dt[None, :] * A2)
            B_col = tl.load(B_seq + pos * n_state + offs_n, mask=n_mask & (pos < length), other=0.0).to(tl.float32)
            h = a * h + B_col[:, None] * (dt * u)[None, :]
            states = states + (h,)
            decays = decays + (a,)
            steps = steps + (dt,)
            if SOFTPLUS:
                # sigmoid(x) = exp(x - softplus(x)): one exp instead of an exp and a division.
                slopes = slopes + (tl.exp(dt_raw - dt),)
            else:
                slopes = slopes + (dt,)

        # Adjoint, backwards through the chunk.
        dB_chunk = tl.zeros((N_PAD, CHUNK), dtype=tl.float32)
        dC_chunk = tl.zeros((N_PAD, CHUNK), dtype=tl.float32)
        for r in tl.static_range(CHUNK):
            # Scan-order index CHUNK - 1 - r (written out: a constexpr cannot be rebound in the loop).
            if REVERSE:
                pos = base + r
            else:
                pos = base + (CHUNK - 1 - r)
            valid = pos < length
            m = d_mask & valid
            h = states[CHUNK - 1 - r]
            a = decays[CHUNK - 1 - r]
            dt = steps[CHUNK - 1 - r]
            u = loads[CHUNK - 1 - r][0].to(tl.float32)
            if CHUNK - 1 - r > 0:
                h_prev = states[CHUNK - 2 - r]
            else:
                h_prev = h_in
            B_col = tl.load(B_seq + pos * n_state + offs_n, mask=n_mask & valid, other=0.0).to(tl.float32)
            C_col = tl.load(C_seq + pos * n_state + offs_n, mask=n_mask & valid, other=0.0).to(tl.float32)
            dout = loads[CHUNK - 1 - r][2].to(tl.float32)
            if HAS_Z:
                z = loads[CHUNK - 1 - r][3].to(tl.float32)
                y = tl.sum(h * C_col[:, None], axis=0)
                if HAS_D:
                    y += D_vec * u
                sig_z = tl.sigmoid(z)
                dz = dout * y * sig_z * (1.0 + z * (1.0 - sig_z))
                tl.store(DZ + seq_row + pos, dz.to(DZ.dtype.element_ty), mask=m)
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
            tl.store(DU + seq_row + pos, du.to(DU.dtype.element_ty), mask=m)
            tl.store(DDELTA + seq_row + pos, ddt.to(DDELTA.dtype.element_ty), mask=m)

            # Column r of the chunk's (N, CHUNK) dB / dC tiles (added once per chunk, below).
            dB_chunk = tl.where(offs_c[None, :] == r, tl.sum(g * (dt * u)[None, :], axis=1)[:, None], dB_chunk)
            dC_chunk = tl.where(offs_c[None, :] == r, tl.sum(h * dy[None, :], axis=1)[:, None], dC_chunk)
            g = a * g

        # One layout change and one atomic per element per chunk instead of one per position: fewer
        # barriers between the positions' reductions, so they can overlap.
        if REVERSE:
            chunk_pos = base + offs_c
        else:
            chunk_pos = base + (CHUNK - 1 - offs_c)
        bc_ptrs = chunk_pos[None, :] * n_state + offs_n[:, None]
        bc_mask = n_mask[:, None] & (chunk_pos < length)[None, :]
        tl.atomic_add(DB_seq + bc_ptrs, dB_chunk, mask=bc_mask, sem="relaxed")
        tl.atomic_add(DC_seq + bc_ptrs, dC_chunk, mask=bc_mask, sem="relaxed")

    tl.atomic_add(DA + offs_d[None, :] * n_state + offs_n[:, None], dA_acc, mask=nd_mask, sem="relaxed")
    if HAS_D:
        tl.atomic_add(DD + offs_d, dD_acc, mask=d_mask, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(DDELTA_BIAS + offs_d, dbias_acc, mask=d_mask, sem="relaxed")


def _segment_split(n_chunks: int, segments: int) -> tuple[int, int]:
    """(chunks per segment, number of segments) for at most ``segments`` equal runs of whole chunks."""
    seg_chunks = triton.cdiv(n_chunks, max(1, min(segments, n_chunks)))
    return seg_chunks, triton.cdiv(n_chunks, seg_chunks)


def _launch_options(config: ScanLaunchConfig) -> dict[str, int]:
    options = {"num_warps": 1}
    if config.maxnreg is not None:
        options["maxnreg"] = config.maxnreg
    return options


def _segment_summaries(
    u: torch.Tensor, delta: torch.Tensor, A_t: torch.Tensor, bc: torch.Tensor, z: torch.Tensor | None,
    dout: torch.Tensor | None, delta_bias: torch.Tensor | None, delta_softplus: bool, reverse: bool,
    n_chunks: int, seg_chunks: int, n_seg: int, config: ScanLaunchConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each segment's zero-start end state (dout None) or start adjoint (dout given), and its sum of dt:
    (batch, n_seg, N, dim) and (batch, n_seg, dim) float32."""
    batch, dim, length = u.shape
    n_groups, n_state = bc.shape[1], bc.shape[3]
    local = torch.empty(batch, n_seg, n_state, dim, device=u.device, dtype=torch.float32)
    sum_dt = torch.empty(batch, n_seg, dim, device=u.device, dtype=torch.float32)
    grid = (triton.cdiv(dim // n_groups, config.block_d), batch * n_groups, n_seg - 1)
    _segment_summary_kernel[grid](
        u, delta, A_t, bc, z if z is not None else u, dout if dout is not None else u,
        delta_bias if delta_bias is not None else sum_dt, local, sum_dt,
        dim, length, dim // n_groups, n_groups, n_chunks, n_state, seg_chunks, n_seg,
        N_PAD=triton.next_power_of_2(n_state), BLOCK_D=config.block_d, CHUNK=config.chunk,
        HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, REVERSE=reverse,
        ADJOINT=dout is not None, **_launch_options(config),
    )
    return local, sum_dt


def selective_scan_fwd_seq2_launch(
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
    """Same contract as ``selective_scan_fwd_launch`` (contiguous inputs, B and C (batch, groups, N, L)).

    B and C are copied to (batch, groups, L, N) so that each position's states load from one place."""
    batch, dim, length = u.shape
    n_groups, n_state = B.shape[1], B.shape[2]
    dim_per_group = dim // n_groups
    n_chunks = triton.cdiv(length, config.chunk)
    block_d = config.block_d  # one warp per program (checked by ScanLaunchConfig)
    out = torch.empty_like(u)
    last_state = torch.empty(batch, dim, n_state, device=u.device, dtype=torch.float32)
    chunk_states = (
        torch.empty(batch, n_chunks, n_state, dim, device=u.device, dtype=torch.float32) if store_states else None
    )
    A_t, B_t = A.t().contiguous(), B.transpose(-1, -2).contiguous()
    seg_chunks, n_seg = _segment_split(n_chunks, config.segments)
    seg_local = seg_sum_dt = last_state
    if n_seg > 1:
        seg_local, seg_sum_dt = _segment_summaries(u, delta, A_t, B_t, None, None, delta_bias, delta_softplus,
                                                   reverse, n_chunks, seg_chunks, n_seg, config)
    grid = (triton.cdiv(dim_per_group, block_d), batch * n_groups, n_seg)
    _scan_fwd_seq2_kernel[grid](
        u, delta, A_t, B_t, C.transpose(-1, -2).contiguous(),
        D if D is not None else last_state,
        z if z is not None else u,
        delta_bias if delta_bias is not None else last_state,
        out,
        chunk_states if chunk_states is not None else last_state,
        last_state, seg_local, seg_sum_dt,
        dim, length, dim_per_group, n_groups, n_chunks, n_state, seg_chunks, n_seg,
        N_PAD=triton.next_power_of_2(n_state), BLOCK_D=block_d, CHUNK=config.chunk,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, REVERSE=reverse, STORE_STATES=store_states, SEGMENTED=n_seg > 1,
        **_launch_options(config),
    )
    return out, last_state, chunk_states


def selective_scan_bwd_seq2_launch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    dout: torch.Tensor,
    chunk_states: torch.Tensor,
    dlast: torch.Tensor | None,
    delta_softplus: bool,
    reverse: bool,
    config: ScanLaunchConfig,
) -> dict[str, torch.Tensor | None]:
    """Same contract as ``selective_scan_bwd_launch``: gradients of every input, dB/dC per group."""
    batch, dim, length = u.shape
    n_groups, n_state = B.shape[1], B.shape[2]
    dim_per_group = dim // n_groups
    n_chunks = chunk_states.shape[1]
    if n_chunks != triton.cdiv(length, config.chunk):
        raise ValueError("selective_scan backward: chunk size differs from the forward's")
    block_d = config.block_d  # one warp per program (checked by ScanLaunchConfig)
    f32 = dict(device=u.device, dtype=torch.float32)
    grads: dict[str, torch.Tensor | None] = {
        "u": torch.empty_like(u),
        "delta": torch.empty_like(delta),
        "z": torch.empty_like(z) if z is not None else None,
        "A": torch.zeros(dim, n_state, **f32),
        # (batch, groups, L, N) like the kernel's B and C; handed back as (batch, groups, N, L) views.
        "B": torch.zeros(batch, n_groups, length, n_state, **f32),
        "C": torch.zeros(batch, n_groups, length, n_state, **f32),
        "D": torch.zeros(dim, **f32) if D is not None else None,
        "delta_bias": torch.zeros(dim, **f32) if delta_bias is not None else None,
    }
    placeholder = grads["A"]
    A_t, C_t = A.t().contiguous(), C.transpose(-1, -2).contiguous()
    seg_chunks, n_seg = _segment_split(n_chunks, config.segments)
    seg_local = seg_sum_dt = placeholder
    if n_seg > 1:
        seg_local, seg_sum_dt = _segment_summaries(u, delta, A_t, C_t, z, dout, delta_bias, delta_softplus,
                                                   reverse, n_chunks, seg_chunks, n_seg, config)
    grid = (triton.cdiv(dim_per_group, block_d), batch * n_groups, n_seg)
    _scan_bwd_seq2_kernel[grid](
        u, delta, A_t, B.transpose(-1, -2).contiguous(), C_t,
        D if D is not None else placeholder,
        z if z is not None else u,
        delta_bias if delta_bias is not None else placeholder,
        dout, chunk_states,
        dlast if dlast is not None else placeholder,
        grads["u"], grads["delta"],
        grads["z"] if z is not None else grads["u"],
        grads["A"], grads["B"], grads["C"],
        grads["D"] if D is not None else placeholder,
        grads["delta_bias"] if delta_bias is not None else placeholder, seg_local, seg_sum_dt,
        dim, length, dim_per_group, n_groups, n_chunks, n_state, seg_chunks, n_seg,
        N_PAD=triton.next_power_of_2(n_state), BLOCK_D=block_d, CHUNK=config.chunk,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, REVERSE=reverse, HAS_DLAST=dlast is not None, SEGMENTED=n_seg > 1,
        PREFETCH=config.prefetch, **_launch_options(config),
    )
    grads["B"] = grads["B"].transpose(-1, -2)
    grads["C"] = grads["C"].transpose(-1, -2)
    return grads
