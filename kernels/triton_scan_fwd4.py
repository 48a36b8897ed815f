"""Forward kernel of the selective scan, variant "v4" (ScanLaunchConfig.variant): parallel over positions.

v1 / v2 / v3 walk a sequence position by position in every lane, so a lane's work is one long chain of dependent
steps; at small batch and long sequences (batch 16, L=1024 / 4096) there are too few lanes to hide that chain's
latency. Here a program (4 warps) owns BLOCK_D channels of one (batch, group) pair and walks the sequence a span
of BLOCK_L positions at a time; within a span it walks the N states in turn (as mamba-ssm's CUDA kernel does) and
computes each state's (BLOCK_D, BLOCK_L) tile at once:

- the step pairs (a_t, b_t) = (exp(dt_t * A_n), dt_t * B_t,n * u_t) of the recurrence h_t = a_t * h_{t-1} + b_t;
- their inclusive scan along the positions with ``tl.associative_scan`` and the combine
  (a1, b1) o (a2, b2) = (a1 * a2, a2 * b1 + b2), where (a1, b1) comes first in scan order;
- the states h_t = A_t * h_in + B_t from the scanned pairs (A_t, B_t) and the state h_in carried in from the
  previous span, and state n's share C_t,n h_t of every output.

Triton lays the (BLOCK_D, BLOCK_L) tiles out as the u / delta loads are (8 consecutive positions per thread for
16-bit inputs, lanes along the positions, warps along the channels), so the scan is 8 steps within a thread and a
5-level shuffle scan across the warp. ``REVERSE`` scans right to left: the spans are walked from the end of the
sequence and each is scanned with ``reverse=True`` (no flipped copies), the carry leaving a span at its first
position.

Saved for the backward, as v1's forward saves them, in the (batch, chunks, N, dim) layout every variant shares:
the float32 state entering each chunk of CHUNK positions in scan order. Forward, chunk c's entry state is the
state after position c * CHUNK - 1 (zeros for chunk 0); reversed, the state after position (c + 1) * CHUNK (zeros
for the last chunk), positions past the end being identity steps. Each is stored from the span tile at that
position, so the v1 / v2 backward kernels run behind this forward unchanged (BLOCK_L need not be a multiple of
CHUNK). Outputs and states agree with v1's to float32 rounding, not bit for bit: the scan multiplies and adds the
same terms in another order.

B and C are read as (batch, groups, N, L) with unit position stride (the launcher copies them otherwise), so a
state's span of positions is one contiguous read, as are u / delta / z / out along a channel's positions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_scan_common import UNSPECIALIZED, channel_block, skip_and_bias, softplus


@triton.jit
def _step_combine(a_first, b_first, a_next, b_next):
    """Two consecutive steps h -> a h + b as one: first (a_first, b_first), then (a_next, b_next)."""
    return a_first * a_next, a_next * b_first + b_next


@triton.jit(do_not_specialize=UNSPECIALIZED)  # see kernels/triton_scan_common.py
def _scan_fwd_kernel_v4(
    U, DELTA, A, B, C, D, Z, DELTA_BIAS,
    OUT, CHUNK_STATES, LAST_STATE,
    dim, length, dim_per_group, n_groups, n_chunks, n_state, a_state_stride,
    bc_batch_stride, bc_group_stride, bc_state_stride,
    N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, STORE_STATES: tl.constexpr,
):
    batch_idx, group, offs_d, d_mask, offs_n, n_mask, nd_mask = channel_block(
        n_groups, dim_per_group, n_state, BLOCK_D, N_PAD)
    D_vec, bias = skip_and_bias(D, DELTA_BIAS, offs_d, d_mask, BLOCK_D, HAS_D, HAS_BIAS)
    row = (batch_idx * dim + offs_d).to(tl.int64)
    seq_row = (row * length)[:, None]  # (BLOCK_D, 1)
    bc_base = batch_idx.to(tl.int64) * bc_batch_stride + group * bc_group_stride
    offs_l = tl.arange(0, BLOCK_L)
    # Saved states: (batch, chunks, N, dim); state n of channel d in chunk c at ((batch * chunks + c) * N + n) * dim + d.
    # tl.cast, not .to: an integer argument equal to 1 arrives as a Python constant (Triton specialises it).
    chunk_stride = tl.cast(n_state, tl.int64) * dim
    batch_states = batch_idx.to(tl.int64) * n_chunks * chunk_stride

    if STORE_STATES:
        # The state entering the first chunk in scan order is zero.
        if REVERSE:
            first_chunk = n_chunks - 1
        else:
            first_chunk = 0 * n_chunks
        tl.store(CHUNK_STATES + batch_states + first_chunk * chunk_stride + offs_n[:, None] * dim + offs_d[None, :],
                 tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32), mask=nd_mask)

    # The state entering the span (in scan order), one row per state.
    h_all = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    n_spans = tl.cdiv(length, BLOCK_L)
    for i in range(n_spans):
        if REVERSE:
            span = n_spans - 1 - i
        else:
            span = i
        pos = span * BLOCK_L + offs_l  # (BLOCK_L,)
        valid = pos < length
        m = d_mask[:, None] & valid[None, :]  # (BLOCK_D, BLOCK_L)
        ptrs = seq_row + pos[None, :]
        u = tl.load(U + ptrs, mask=m, other=0.0).to(tl.float32)
        dt = tl.load(DELTA + ptrs, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt += bias[:, None]
        if SOFTPLUS:
            dt = softplus(dt)
        dt = tl.where(m, dt, 0.0)  # past the end: a = 1, b = 0, an identity step
        dtu = dt * u
        if STORE_STATES:
            # The state after a position is the entry state of the next chunk in scan order when the position
            # ends its chunk: forward after position c * CHUNK - 1 (c >= 1), reversed after position
            # (c + 1) * CHUNK (c <= n_chunks - 2, i.e. a position below (n_chunks - 1) * CHUNK < length).
            if REVERSE:
                chunk = pos // CHUNK - 1
                ends = (pos % CHUNK == 0) & (chunk >= 0) & (chunk < n_chunks - 1)
            else:
                chunk = (pos + 1) // CHUNK
                ends = ((pos + 1) % CHUNK == 0) & (chunk < n_chunks)
            state_ptrs = CHUNK_STATES + batch_states + chunk[None, :].to(tl.int64) * chunk_stride + offs_d[:, None]
            state_mask = d_mask[:, None] & ends[None, :]
        if REVERSE:
            exit_at = 0
        else:
            exit_at = BLOCK_L - 1

        # One state at a time: its (BLOCK_D, BLOCK_L) step pairs, their scan along the positions, and its share of
        # every output.
        y = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        for n in range(n_state):
            A_n = tl.load(A + n * a_state_stride + offs_d, mask=d_mask, other=0.0) * 1.4426950408889634
            B_n = tl.load(B + bc_base + n * bc_state_stride + pos, mask=valid, other=0.0).to(tl.float32)
            C_n = tl.load(C + bc_base + n * bc_state_stride + pos, mask=valid, other=0.0).to(tl.float32)
            is_n = offs_n[:, None] == n
            h_in = tl.sum(tl.where(is_n, h_all, 0.0), axis=0)  # (BLOCK_D,)
            a = tl.exp2(dt * A_n[:, None])
            b = B_n[None, :] * dtu
            a, b = tl.associative_scan((a, b), 1, _step_combine, reverse=REVERSE)
            hs = a * h_in[:, None] + b  # the state after each position of the span
            y += hs * C_n[None, :]
            if STORE_STATES:
                tl.store(state_ptrs + n * dim, hs, mask=state_mask)
            h_out = tl.sum(tl.where(offs_l[None, :] == exit_at, hs, 0.0), axis=1)  # after the span's last position
            h_all = tl.where(is_n, h_out[None, :], h_all)

        if HAS_D:
            y += D_vec[:, None] * u
        if HAS_Z:
            z = tl.load(Z + ptrs, mask=m, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(OUT + ptrs, y.to(OUT.dtype.element_ty), mask=m)

    tl.store(LAST_STATE + row[None, :] * n_state + offs_n[:, None], h_all, mask=nd_mask)


def position_contiguous(B: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """B and C (batch, groups, N, L) with unit stride over the positions and the same strides, as the v4 kernel
    reads them, with their shared (batch, group, state) strides: as they are when they already are (mamba-ssm's
    layout), otherwise copied (in one buffer when they share a dtype)."""
    if B.stride(-1) != 1 or B.stride() != C.stride():
        if B.dtype == C.dtype:
            B, C = torch.stack((B, C)).unbind(0)
        else:
            B, C = B.contiguous(), C.contiguous()
    return B, C, (B.stride(0), B.stride(1), B.stride(2))
