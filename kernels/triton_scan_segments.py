"""Sequence segments for the "v2" and "v3" scan kernels (ScanLaunchConfig.segments): parallel programs along L.

A scan program walks its whole sequence one position after the other, so a grid of few programs (small batch,
long L: batch 16 x 768 channels is 384 one-warp programs for 132 multiprocessors) leaves most of the GPU idle
while each program is bound by the latency of its step-to-step dependency. Splitting every sequence into S
segments of whole chunks gives S times the programs:

1. a summary kernel runs each segment from a zero state and writes its end state and the sum of its dt (the
   product of a segment's decays exp(dt * A) is exp(A * sum dt), one number per channel);
2. the scan kernel of segment k starts from the state that the summaries of segments 0..k-1 carry in
   (h <- exp(A * sum dt_j) * h + end_j), then runs as without segments.

The backward does the same with the adjoint, which runs the other way: its summary runs each segment from a
zero adjoint at the segment's end, and the backward program of segment k starts from the adjoint carried in by
segments k+1..S-1 (and the last state's gradient). The chunk states the backward reads are those of the
forward, so the forward's and the backward's segment counts are independent. Segment 0's forward summary and
the last segment's backward summary are never needed and not computed. The summaries reread u, delta and B
(forward) or delta, dout, z and C (backward): more bytes for S times the parallelism.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_launch import ceil_div, compiled_launcher
from kernels.triton_scan_common import (
    UNSPECIALIZED,
    ScanLaunchConfig,
    channel_block,
    channel_params,
    chunk_position,
    segment_walk,
    state_offsets,
)
from kernels.triton_scan_fast import sigmoid2
from kernels.triton_scan_fwd3 import chunk_loads, discretize


def plan_segments(n_chunks: int, segments: int) -> tuple[int, int]:
    """(segments actually used, chunks per segment): at most ``segments`` runs of whole chunks, none empty."""
    per_segment = ceil_div(n_chunks, max(1, min(segments, n_chunks)))
    return ceil_div(n_chunks, per_segment), per_segment


def contiguous_segments(segments: int, n_chunks: int, *tensors: torch.Tensor | None) -> tuple[int, int]:
    """plan_segments for the v2 kernels: their segment summaries read (batch, dim, L) rows, so a launch splits its
    sequences only where every given tensor (u, delta, z; dout) is contiguous, and runs one segment otherwise (a Vim
    block's channel-last tensors)."""
    if segments > 1 and all(t is None or t.is_contiguous() for t in tensors):
        return plan_segments(n_chunks, segments)
    return 1, n_chunks


@triton.jit(do_not_specialize=UNSPECIALIZED)  # see kernels/triton_scan_common.py
def _scan_segment_summary_v3(
    U, DELTA, A, BC, DELTA_BIAS, DOUT, Z,
    SEG_STATES, SEG_DTSUM,
    dim, length, dim_per_group, n_groups, n_chunks, n_state, a_state_stride, n_seg, chunks_per_seg, first_seg,
    N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
    ADJOINT: tl.constexpr, FAST: tl.constexpr,
):
    """One segment from zero: the end state (forward: h <- a * h + B * dt * u in scan order, BC = B) or the
    adjoint at its start (ADJOINT: g <- a * (g + C * dy) against scan order, BC = C), and its sum of dt."""
    batch_idx, group, offs_d, d_mask, offs_n, n_mask, nd_mask = channel_block(
        n_groups, dim_per_group, n_state, BLOCK_D, N_PAD)
    # No D here (HAS_D False): A only fills its pointer slot.
    A2, _d, bias = channel_params(A, A, DELTA_BIAS, a_state_stride, offs_n, offs_d, nd_mask,
                                  d_mask, BLOCK_D, False, HAS_BIAS)
    last_channel = group * dim_per_group + dim_per_group - 1
    read_row = (batch_idx * dim + tl.minimum(offs_d, last_channel)).to(tl.int64) * length
    BC_seq = BC + (batch_idx * n_groups + group).to(tl.int64) * length * N_PAD
    seg = tl.program_id(2) + first_seg
    chunk_idx, chunk_step, count = segment_walk(seg, chunks_per_seg, n_chunks, REVERSE, ADJOINT)
    if ADJOINT:
        rows = (DELTA, DOUT, Z) if HAS_Z else (DELTA, DOUT)
    else:
        rows = (DELTA, U)

    x = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    dt_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for _i in range(count):
        current = chunk_loads(rows, read_row, chunk_idx, n_chunks, length, CHUNK, REVERSE)
        # Through the chunk in scan order, or against it for the adjoint. The step index is the loop's own
        # variable: a tuple index must be a compile-time constant, and Triton's compiler turns an int assigned
        # to a name into a tensor (the interpreter does not).
        for s in tl.static_range(CHUNK - 1 if ADJOINT else 0, -1 if ADJOINT else CHUNK, -1 if ADJOINT else 1):
            pos = chunk_position(chunk_idx * CHUNK, s, CHUNK, REVERSE)
            valid = pos < length
            at = tl.minimum(pos, length - 1)
            col = tl.load(BC_seq + at * N_PAD + offs_n)
            dt, _dt_raw = discretize(current[s][0], bias, valid, HAS_BIAS, SOFTPLUS, FAST)
            dt_sum += dt
            if ADJOINT:
                dy = tl.where(valid & d_mask, current[s][1].to(tl.float32), 0.0)
                if HAS_Z:
                    z = current[s][2].to(tl.float32)
                    dy = dy * z * sigmoid2(z, FAST)
                x = tl.exp2(dt[None, :] * A2) * (x + col[:, None] * dy[None, :])
            else:
                x = tl.exp2(dt[None, :] * A2) * x + col[:, None] * (dt * current[s][1].to(tl.float32))[None, :]
        chunk_idx += chunk_step

    tl.store(SEG_STATES + state_offsets(batch_idx, seg, n_seg, n_state, dim, offs_d, offs_n), x, mask=nd_mask)
    tl.store(SEG_DTSUM + (batch_idx * n_seg + seg).to(tl.int64) * dim + offs_d, dt_sum, mask=d_mask)


def segment_summaries(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, bc_padded: torch.Tensor, delta_bias: torch.Tensor | None,
    dout: torch.Tensor | None, z: torch.Tensor | None, delta_softplus: bool, reverse: bool,
    config: ScanLaunchConfig, n_seg: int, chunks_per_seg: int, n_groups: int, n_state: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 (batch, segments, N, dim) end states (or start adjoints, with ``dout``) and (batch, segments, dim)
    dt sums of every segment a carry-in reads: all but the last (forward) or the first (backward)."""
    batch, dim, length = u.shape
    n_chunks = ceil_div(length, config.chunk)
    states = u.new_zeros((batch, n_seg, n_state, dim), dtype=torch.float32)
    dt_sums = u.new_zeros((batch, n_seg, dim), dtype=torch.float32)
    adjoint = dout is not None
    grid = (ceil_div(dim // n_groups, config.block_d), batch * n_groups, n_seg - 1)
    compiled_launcher(_scan_segment_summary_v3)[grid](
        u, delta, A, bc_padded, delta_bias if delta_bias is not None else dt_sums,
        dout if adjoint else u, z if z is not None else u,
        states, dt_sums,
        dim, length, dim // n_groups, n_groups, n_chunks, n_state, A.stride(1), n_seg, chunks_per_seg,
        int(adjoint),
        N_PAD=bc_padded.shape[-1], BLOCK_D=config.block_d, CHUNK=config.chunk,
        HAS_Z=adjoint and z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        REVERSE=reverse, ADJOINT=adjoint, FAST=u.is_cuda, num_warps=max(1, config.block_d // 32),
    )
    return states, dt_sums
