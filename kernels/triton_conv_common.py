"""Pieces both causal-conv kernel families share (kernels/triton_causal_conv1d.py: the channel-last chunk walk;
kernels/triton_causal_conv1d_tiles.py: the contiguous position tiles)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def conv_program_setup(x_ptr, w_ptr, b_ptr, x_stride_b, dim, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """A program of the (batch, channel blocks, spans) grid: its sequence index, span, x's sequence base, channels,
    channel mask, the taps' weights (a tuple, float32) and the bias (zeros without one)."""
    batch, pid_d, span = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_mask = offs_d < dim
    taps = ()
    for k in tl.static_range(WIDTH):
        taps = taps + (tl.load(w_ptr + offs_d * WIDTH + k, mask=dim_mask, other=0.0).to(tl.float32),)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_d, mask=dim_mask, other=0.0).to(tl.float32)
    return batch, span, x_ptr + batch.to(tl.int64) * x_stride_b, offs_d, dim_mask, taps, bias


@triton.jit
def store_partial_row(part_ptr, dw, db, batch, span, n_spans, dim, offs_d, dim_mask, WIDTH: tl.constexpr):
    """This program's row of the backward's partial sums, (batch, span) x (dim, W + 1): dweight's W columns (``dw``,
    a tuple of (BLOCK_D,) vectors) then dbias (``db``); ``_sum_partials_kernel`` reduces the rows."""
    row = part_ptr + (batch * n_spans + span).to(tl.int64) * dim * (WIDTH + 1) + offs_d * (WIDTH + 1)
    for k in tl.static_range(WIDTH):
        tl.store(row + k, dw[k], mask=dim_mask)
    tl.store(row + WIDTH, db, mask=dim_mask)
