"""The causal conv's kernels for a contiguous x ((batch, dim, L) memory): (channels x positions) tiles.

The chunk walk of ``kernels/triton_causal_conv1d.py`` reads one vector of channels per position. That is one
128-byte line per warp when x is channel-last (a Vim block's), but with contiguous x a position's channels lie a
sequence apart: every lane's 2 bytes come from their own sector, and on an H100 (twenty-eighth session) the walk took
1.75 ms for the forward of a (16, 1536, 4096) bf16 conv where these tiles take 0.20 ms. Here lanes run along the
positions: a program owns BLOCK_D channels of one sequence over SPAN positions and walks them in (BLOCK_D, BLOCK_L)
tiles whose rows are contiguous.

* forward: ``pre[l] = bias + sum_k w[k] * x[l + shift_k]`` with ``shift_k = k - (W-1)`` (``reverse``: ``W-1-k``),
  then SiLU; the padding is the load mask.
* backward: ``dx[l] = sum_k w[k] * dpre[l - shift_k]`` needs ``dpre`` at the W outputs that read ``x[l]``; a tile loads
  ``x`` at its 2W-1 offsets once and rebuilds those W pre-activations from registers (recomputing ``pre`` W times is
  what the chunk walk avoids, but here the loads, not the arithmetic, set the time). dweight and dbias are summed
  over the span and written as one row of the partial sums that ``_sum_partials_kernel`` reduces, in the chunk
  walk's layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_conv_common import conv_program_setup, store_partial_row
from kernels.triton_launch import ceil_div, compiled_launcher

TILE_D, TILE_L = 16, 64  # channels x positions of a tile (128-byte rows of bf16)
TILE_SPAN = 64  # positions per program


@triton.jit
def _tap(x_ptr, offs_d, pos, dim_mask, length, stride_d, stride_l):
    """x at positions ``pos`` of the tile's channels, zero outside the sequence (the conv's padding)."""
    mask = dim_mask[:, None] & (pos[None, :] >= 0) & (pos[None, :] < length)
    at = offs_d[:, None] * stride_d + pos[None, :] * stride_l
    return tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(seq_ptr, values, offs_d, offs_l, dim_mask, length, stride_d, stride_l):
    at = offs_d[:, None] * stride_d + offs_l[None, :] * stride_l
    tl.store(seq_ptr + at, values.to(seq_ptr.dtype.element_ty), mask=dim_mask[:, None] & (offs_l[None, :] < length))


@triton.jit
def _conv_tiles_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, dim, length, x_stride_b, x_stride_d, x_stride_l,
                           out_stride_b, out_stride_d, out_stride_l, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr,
                           SILU: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
                           SPAN: tl.constexpr):
    batch, span, x_seq, offs_d, dim_mask, taps, bias = conv_program_setup(x_ptr, w_ptr, b_ptr, x_stride_b, dim, WIDTH,
                                                                          HAS_BIAS, BLOCK_D)
    out_seq = out_ptr + batch.to(tl.int64) * out_stride_b
    for start in tl.range(span * SPAN, tl.minimum(span * SPAN + SPAN, length), BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        pre = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32) + bias[:, None]
        for k in tl.static_range(WIDTH):
            shift = (WIDTH - 1 - k) if REVERSE else (k - (WIDTH - 1))
            pre += taps[k][:, None] * _tap(x_seq, offs_d, offs_l + shift, dim_mask, length, x_stride_d, x_stride_l)
        out = pre * tl.sigmoid(pre) if SILU else pre
        _store_tile(out_seq, out, offs_d, offs_l, dim_mask, length, out_stride_d, out_stride_l)


@triton.jit
def _conv_tiles_bwd_kernel(x_ptr, w_ptr, b_ptr, dout_ptr, dx_ptr, part_ptr, dim, length, n_spans,
                           x_stride_b, x_stride_d, x_stride_l, dout_stride_b, dout_stride_d, dout_stride_l,
                           dx_stride_b, dx_stride_d, dx_stride_l, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr,
                           SILU: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
                           SPAN: tl.constexpr):
    batch, span, x_seq, offs_d, dim_mask, taps, bias = conv_program_setup(x_ptr, w_ptr, b_ptr, x_stride_b, dim, WIDTH,
                                                                          HAS_BIAS, BLOCK_D)
    dout_seq = dout_ptr + batch.to(tl.int64) * dout_stride_b
    dx_seq = dx_ptr + batch.to(tl.int64) * dx_stride_b
    dw_acc = ()
    for _ in tl.static_range(WIDTH):
        dw_acc = dw_acc + (tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32),)
    db_acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for start in tl.range(span * SPAN, tl.minimum(span * SPAN + SPAN, length), BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        xs = ()  # x at offsets -(W-1) .. W-1 from the tile's positions: xs[o + W - 1]
        for i in tl.static_range(2 * WIDTH - 1):
            xs = xs + (_tap(x_seq, offs_d, offs_l + (i - (WIDTH - 1)), dim_mask, length, x_stride_d, x_stride_l),)
        # Output l - shift_j reads x[l] through tap j; its pre through tap k reads x at offset shift_k - shift_j, and
        # its dpre is zero outside the sequence (dout is masked there).
        dx = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        for j in tl.static_range(WIDTH):
            pre = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32) + bias[:, None]
            for k in tl.static_range(WIDTH):  # (tuple indices must be constexpr: no conditional expression in them)
                if REVERSE:
                    pre += taps[k][:, None] * xs[j - k + WIDTH - 1]
                else:
                    pre += taps[k][:, None] * xs[k - j + WIDTH - 1]
            out_at = (j - (WIDTH - 1)) if REVERSE else (WIDTH - 1 - j)
            dpre = _tap(dout_seq, offs_d, offs_l + out_at, dim_mask, length, dout_stride_d, dout_stride_l)
            if SILU:
                sig = tl.sigmoid(pre)
                dpre = dpre * sig * (1.0 + pre * (1.0 - sig))
            dx += taps[j][:, None] * dpre
            if j == WIDTH - 1:  # the tile's own outputs (shift 0): dw[k] += dpre[l] * x[l + shift_k], dbias += dpre
                summed = ()
                for k in tl.static_range(WIDTH):
                    if REVERSE:
                        summed = summed + (dw_acc[k] + dpre * xs[2 * (WIDTH - 1) - k],)
                    else:
                        summed = summed + (dw_acc[k] + dpre * xs[k],)
                dw_acc = summed
                db_acc += dpre
        _store_tile(dx_seq, dx, offs_d, offs_l, dim_mask, length, dx_stride_d, dx_stride_l)
    dw_rows = ()
    for k in tl.static_range(WIDTH):
        dw_rows = dw_rows + (tl.sum(dw_acc[k], axis=1),)
    store_partial_row(part_ptr, dw_rows, tl.sum(db_acc, axis=1), batch, span, n_spans, dim, offs_d, dim_mask, WIDTH)


def tile_spans(length: int) -> int:
    """Programs per sequence (each TILE_SPAN positions); at least one, so an empty sequence still launches."""
    return max(1, ceil_div(length, TILE_SPAN))


def _grid(x: torch.Tensor) -> tuple[int, int, int]:
    batch, dim, length = x.shape
    return batch, ceil_div(dim, TILE_D), tile_spans(length)


_TILE = dict(BLOCK_D=TILE_D, BLOCK_L=TILE_L, SPAN=TILE_SPAN, num_warps=4)


def conv_tiles_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, silu: bool,
                   reverse: bool) -> None:
    """The forward into ``out`` (weight contiguous (dim, W))."""
    compiled_launcher(_conv_tiles_fwd_kernel)[_grid(x)](
        x, weight, bias if bias is not None else weight, out, x.shape[1], x.shape[2], *x.stride(), *out.stride(),
        WIDTH=weight.shape[1], HAS_BIAS=bias is not None, SILU=silu, REVERSE=reverse, **_TILE)


def conv_tiles_bwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dout: torch.Tensor,
                   dx: torch.Tensor, partial: torch.Tensor, silu: bool, reverse: bool) -> None:
    """dx into ``dx`` and the per-program dweight / dbias into ``partial`` ((batch x tile_spans(L), dim, W + 1))."""
    dim, length = x.shape[1], x.shape[2]
    width = weight.shape[1]
    compiled_launcher(_conv_tiles_bwd_kernel)[_grid(x)](
        x, weight, bias if bias is not None else weight, dout, dx, partial, dim, length, tile_spans(length),
        *x.stride(), *dout.stride(), *dx.stride(), WIDTH=width, HAS_BIAS=bias is not None, SILU=silu,
        REVERSE=reverse, **_TILE)
