"""Depthwise causal conv1d (+ bias, + SiLU) in Triton: one pass forward, one pass backward.

PyTorch runs a grouped ``F.conv1d`` with 4 taps through its native depthwise kernels; in the sixteenth session's H200
profile of a Vim-S MAE step they took about 18 ms of 144 (``conv_depthwise2d_grad_weight`` alone 7.6 ms) for
tensors of (256, 768, 53), far above what their bytes cost. Here a program owns BLOCK_D channels of one sequence
over a span of SPAN positions, walked in (channels x positions) tiles:

* forward: ``pre[l] = bias + sum_k w[k] * x[l + shift_k]`` with ``shift_k = k - (W-1)`` (``reverse``: ``W-1-k``),
  then SiLU; the padding is the load mask, so no padded copy of ``x`` is made;
* backward: ``dx[l] = sum_k w[k] * dpre[l - shift_k]`` needs ``dpre`` at the W outputs that read ``x[l]``, and each of
  those needs ``pre`` (the gradient through SiLU), recomputed from ``x`` rather than stored. A tile loads ``x`` at its
  2W-1 offsets from the tile once and builds the W pre-activations from those registers (the first version reloaded
  ``x`` for every tap of every output, 24 loads per element instead of 7: 9 of the 114 ms of kernels of a Vim-S
  step on an H100); ``dw`` and ``dbias`` are summed over the program's span in registers and written once per program,
  then summed over programs by torch (a fixed order: the result does not depend on scheduling, as atomics would
  make it).

``x`` and ``dout`` (batch, dim, L) are read through their strides, so a Vim block's ``x`` (a channel-last view into
the input projection's output) is not copied first; the output and ``dx`` are channel-last when ``x`` is
(``empty_in_layout``: what the x projection and the scan then read without a copy), contiguous otherwise. The tile
follows the layout: 128 channels x 8 positions channel-last (16-byte loads along the channels), 16 x 64 otherwise.
The state is float32 and outputs take the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_launch import compiled_launcher

SPAN = 64  # positions per program; also the length of a contiguous tile
CHANNEL_LAST_TILE = (128, 8)  # (channels, positions) of a tile when x is channel-last
CONTIGUOUS_TILE = (16, SPAN)


@triton.jit
def _tap(x_ptr, offs_d, pos, dim_mask, length, stride_d, stride_l):
    """x at positions ``pos`` of the tile's channels, zero outside the sequence (the conv's padding)."""
    mask = dim_mask[:, None] & (pos[None, :] >= 0) & (pos[None, :] < length)
    at = offs_d[:, None] * stride_d + pos[None, :] * stride_l
    return tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _program_channels(dim, w_ptr, b_ptr, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's sequence, span, channels, channel mask, the taps' weights (a tuple) and the bias."""
    batch, pid_d, pid_l = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_mask = offs_d < dim
    taps = ()
    for k in tl.static_range(WIDTH):
        taps = taps + (tl.load(w_ptr + offs_d * WIDTH + k, mask=dim_mask, other=0.0).to(tl.float32),)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_d, mask=dim_mask, other=0.0).to(tl.float32)
    return batch, pid_l, offs_d, dim_mask, taps, bias


@triton.jit
def _store_tile(ptr, values, batch, offs_d, offs_l, dim_mask, length, stride_b, stride_d, stride_l):
    at = batch.to(tl.int64) * stride_b + offs_d[:, None] * stride_d + offs_l[None, :] * stride_l
    tl.store(ptr + at, values.to(ptr.dtype.element_ty), mask=dim_mask[:, None] & (offs_l[None, :] < length))


@triton.jit
def _silu_backward(dout, pre):
    """The gradient through SiLU at pre-activation ``pre``."""
    sig = tl.sigmoid(pre)
    return dout * sig * (1.0 + pre * (1.0 - sig))


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, dim, length, x_stride_b, x_stride_d, x_stride_l,
                     out_stride_b, out_stride_d, out_stride_l, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SILU: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
                     SPAN: tl.constexpr):
    batch, pid_l, offs_d, dim_mask, taps, bias = _program_channels(dim, w_ptr, b_ptr, WIDTH, HAS_BIAS, BLOCK_D)
    x_seq = x_ptr + batch.to(tl.int64) * x_stride_b
    for start in tl.range(pid_l * SPAN, tl.minimum(pid_l * SPAN + SPAN, length), BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        pre = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32) + bias[:, None]
        for k in tl.static_range(WIDTH):
            shift = (WIDTH - 1 - k) if REVERSE else (k - (WIDTH - 1))
            pre += taps[k][:, None] * _tap(x_seq, offs_d, offs_l + shift, dim_mask, length, x_stride_d, x_stride_l)
        out = pre * tl.sigmoid(pre) if SILU else pre
        _store_tile(out_ptr, out, batch, offs_d, offs_l, dim_mask, length, out_stride_b, out_stride_d, out_stride_l)


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, dout_ptr, dx_ptr, dw_part_ptr, db_part_ptr, dim, length, n_spans,
                     x_stride_b, x_stride_d, x_stride_l, dout_stride_b, dout_stride_d, dout_stride_l,
                     dx_stride_b, dx_stride_d, dx_stride_l, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SILU: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
                     SPAN: tl.constexpr):
    batch, pid_l, offs_d, dim_mask, taps, bias = _program_channels(dim, w_ptr, b_ptr, WIDTH, HAS_BIAS, BLOCK_D)
    x_seq, dout_seq = x_ptr + batch.to(tl.int64) * x_stride_b, dout_ptr + batch.to(tl.int64) * dout_stride_b
    dw_acc = ()
    for _ in tl.static_range(WIDTH):
        dw_acc = dw_acc + (tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32),)
    db_acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for start in tl.range(pid_l * SPAN, tl.minimum(pid_l * SPAN + SPAN, length), BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        # x at offsets -(W-1) .. W-1 from the tile's positions, each loaded once: xs[o + W - 1].
        xs = ()
        for i in tl.static_range(2 * WIDTH - 1):
            xs = xs + (_tap(x_seq, offs_d, offs_l + (i - (WIDTH - 1)), dim_mask, length, x_stride_d, x_stride_l),)
        # Output l - shift_j reads x[l] through tap j (shift_j = j - (W-1), reversed W-1-j); pre of that output
        # through tap k reads x at offset shift_k - shift_j; its dpre is zero outside the sequence (dout is masked).
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
                dpre = _silu_backward(dpre, pre)
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
        _store_tile(dx_ptr, dx, batch, offs_d, offs_l, dim_mask, length, dx_stride_b, dx_stride_d, dx_stride_l)
    row = (batch * n_spans + pid_l) * dim + offs_d  # this program's row of the per-program partial sums
    for k in tl.static_range(WIDTH):
        tl.store(dw_part_ptr + row * WIDTH + k, tl.sum(dw_acc[k], axis=1), mask=dim_mask)
    if HAS_BIAS:
        tl.store(db_part_ptr + row, tl.sum(db_acc, axis=1), mask=dim_mask)


def empty_in_layout(x: torch.Tensor) -> torch.Tensor:
    """A dense (batch, dim, L) tensor for the conv's output or dx: channel-last ((batch, L, dim) memory) when x is
    read with unit channel stride (a Vim block's x), so that the next projection and the scan read it as it is;
    contiguous otherwise."""
    batch, dim, length = x.shape
    if _channel_last(x):
        return torch.empty(batch, length, dim, device=x.device, dtype=x.dtype).transpose(1, 2)
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def _channel_last(x: torch.Tensor) -> bool:
    return x.stride(1) == 1 and x.shape[1] > 1


def _launch_shape(x: torch.Tensor) -> tuple[tuple[int, int, int], dict[str, int]]:
    """The grid (batch, channel blocks, spans) and the tile's constexprs for x's layout."""
    batch, dim, length = x.shape
    block_d, block_l = CHANNEL_LAST_TILE if _channel_last(x) else CONTIGUOUS_TILE
    return (batch, triton.cdiv(dim, block_d), triton.cdiv(length, SPAN)), dict(BLOCK_D=block_d, BLOCK_L=block_l,
                                                                                SPAN=SPAN)


def causal_conv1d_triton_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool,
                             reverse: bool) -> torch.Tensor:
    weight = weight.contiguous()
    out = empty_in_layout(x)
    grid, tile = _launch_shape(x)
    compiled_launcher(_conv_fwd_kernel)[grid](
        x, weight, bias if bias is not None else weight, out, x.shape[1], x.shape[2], *x.stride(), *out.stride(),
        WIDTH=weight.shape[1], HAS_BIAS=bias is not None, SILU=silu, REVERSE=reverse, **tile)
    return out


def causal_conv1d_triton_bwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dout: torch.Tensor,
                             silu: bool, reverse: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dx, dweight, dbias) of the forward above, in the dtypes of x, weight and bias."""
    weight = weight.contiguous()
    batch, dim, length = x.shape
    width = weight.shape[1]
    grid, tile = _launch_shape(x)
    programs = batch * grid[2]
    dx = empty_in_layout(x)
    dw_part = torch.empty(programs, dim, width, device=x.device, dtype=torch.float32)
    db_part = torch.empty(programs, dim, device=x.device, dtype=torch.float32) if bias is not None else dw_part
    compiled_launcher(_conv_bwd_kernel)[grid](
        x, weight, bias if bias is not None else weight, dout, dx, dw_part, db_part, dim, length, grid[2],
        *x.stride(), *dout.stride(), *dx.stride(), WIDTH=width, HAS_BIAS=bias is not None, SILU=silu,
        REVERSE=reverse, **tile)
    dbias = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dw_part.sum(0).to(weight.dtype), dbias


class CausalConv1dTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool,  # noqa: ANN001
                reverse: bool) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.silu, ctx.reverse = silu, reverse
        return causal_conv1d_triton_fwd(x, weight, bias, silu, reverse)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # noqa: ANN001, ANN205
        x, weight, bias = ctx.saved_tensors
        dx, dweight, dbias = causal_conv1d_triton_bwd(x, weight, bias, dout, ctx.silu, ctx.reverse)
        return dx, dweight, dbias, None, None


# The same forward and backward as torch.library custom ops, for torch.compile (dynamo cannot trace the kernel
# launches; as ops, with fake implementations giving the output layouts, it traces around them with no graph break).
# Eager calls use the autograd.Function above and skip the ops' dispatch, as the scan does.


conv_fwd_op = torch.library.custom_op("scanmae::causal_conv1d_fwd", causal_conv1d_triton_fwd, mutates_args=())


@conv_fwd_op.register_fake
def _conv_fwd_fake(x, weight, bias, silu, reverse):
    return empty_in_layout(x)


def _conv_bwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dout: torch.Tensor, silu: bool,
              reverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); dbias is an empty tensor without a bias (an op's outputs cannot be None)."""
    dx, dweight, dbias = causal_conv1d_triton_bwd(x, weight, bias, dout, silu, reverse)
    return dx, dweight, dbias if dbias is not None else weight.new_empty((0,))


conv_bwd_op = torch.library.custom_op("scanmae::causal_conv1d_bwd", _conv_bwd, mutates_args=())


@conv_bwd_op.register_fake
def _conv_bwd_fake(x, weight, bias, dout, silu, reverse):
    return (empty_in_layout(x), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else weight.new_empty((0,)))


def _conv_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, bias, silu, reverse = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu, ctx.reverse = silu, reverse


def _conv_op_backward(ctx, dout):  # noqa: ANN001, ANN202
    x, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = conv_bwd_op(x, weight, bias, dout, ctx.silu, ctx.reverse)
    return dx, dweight, dbias if bias is not None else None, None, None


conv_fwd_op.register_autograd(_conv_op_backward, setup_context=_conv_setup_context)


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         activation: str | None = None, reverse: bool = False) -> torch.Tensor:
    """Causal depthwise conv through the Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``);
    arguments as ``causal_conv1d_fn`` (already validated). Under torch.compile: the custom ops."""
    if torch.compiler.is_compiling():
        return conv_fwd_op(x, weight, bias, activation is not None, reverse)
    return CausalConv1dTriton.apply(x, weight, bias, activation is not None, reverse)
