"""Depthwise causal conv1d (+ bias, + SiLU) in Triton: one pass forward, one pass backward.

PyTorch runs a grouped ``F.conv1d`` with 4 taps through its native depthwise kernels; in the sixteenth session's H200
profile of a Vim-S MAE step they took about 18 ms of 144 (``conv_depthwise2d_grad_weight`` alone 7.6 ms) for
tensors of (256, 768, 53), far above what their bytes cost. Here a program owns a (channels x positions) tile of one
sequence:

* forward: ``pre[l] = bias + sum_k w[k] * x[l - (W-1) + k]`` (``reverse``: ``x[l + (W-1) - k]``), then SiLU; the
  padding is the load mask, so no padded copy of ``x`` is made;
* backward: the gradient through SiLU needs ``pre``, recomputed from ``x`` (W loads) rather than stored; ``dx[l]``
  gathers ``dpre`` of the W outputs that read ``x[l]``; ``dw`` and ``dbias`` are summed inside the tile and written
  per tile, then summed over tiles by torch (a fixed order: the result does not depend on scheduling, as atomics
  would make it).

``x`` and ``dout`` (batch, dim, L) are read through their strides, so a Vim block's ``x`` (a channel-last view into
the input projection's output) is not copied first; the output and ``dx`` are channel-last when ``x`` is
(``empty_in_layout``: what the x projection and the scan then read without a copy), contiguous otherwise; the state
is float32 and outputs take the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_launch import compiled_launcher

BLOCK_D, BLOCK_L = 16, 64


@triton.jit
def _tap(x_ptr, offs_d, pos, dim_mask, length, stride_d, stride_l):
    """x at positions ``pos`` of the tile's channels, zero outside the sequence (the conv's padding)."""
    mask = dim_mask[:, None] & (pos[None, :] >= 0) & (pos[None, :] < length)
    return tl.load(x_ptr + offs_d[:, None] * stride_d + pos[None, :] * stride_l, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _pre_activation(x_ptr, w_ptr, b_ptr, offs_d, offs_l, dim_mask, length, stride_d, stride_l, WIDTH: tl.constexpr,
                    HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr):
    acc = tl.zeros((offs_d.shape[0], offs_l.shape[0]), dtype=tl.float32)
    for k in tl.static_range(WIDTH):
        shift = (WIDTH - 1 - k) if REVERSE else (k - (WIDTH - 1))
        w_k = tl.load(w_ptr + offs_d * WIDTH + k, mask=dim_mask, other=0.0).to(tl.float32)
        acc += w_k[:, None] * _tap(x_ptr, offs_d, offs_l + shift, dim_mask, length, stride_d, stride_l)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_d, mask=dim_mask, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.jit
def _program_tile(dim, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """This program's sequence, its (channels x positions) tile and the channel mask."""
    batch, pid_d, pid_l = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    return batch, pid_l, offs_d, offs_l, offs_d < dim


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
                     SILU: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    batch, _, offs_d, offs_l, dim_mask = _program_tile(dim, BLOCK_D, BLOCK_L)
    pre = _pre_activation(x_ptr + batch.to(tl.int64) * x_stride_b, w_ptr, b_ptr, offs_d, offs_l, dim_mask, length,
                          x_stride_d, x_stride_l, WIDTH, HAS_BIAS, REVERSE)
    out = pre * tl.sigmoid(pre) if SILU else pre
    _store_tile(out_ptr, out, batch, offs_d, offs_l, dim_mask, length, out_stride_b, out_stride_d, out_stride_l)


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, dout_ptr, dx_ptr, dw_part_ptr, db_part_ptr, dim, length, n_tiles_l,
                     x_stride_b, x_stride_d, x_stride_l, dout_stride_b, dout_stride_d, dout_stride_l,
                     dx_stride_b, dx_stride_d, dx_stride_l, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SILU: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    batch, pid_l, offs_d, offs_l, dim_mask = _program_tile(dim, BLOCK_D, BLOCK_L)
    x_seq, dout_seq = x_ptr + batch.to(tl.int64) * x_stride_b, dout_ptr + batch.to(tl.int64) * dout_stride_b
    tile = batch * n_tiles_l + pid_l  # this program's row of the per-tile partial sums
    # dpre on the tile's own positions: dw and dbias.
    pre = _pre_activation(x_seq, w_ptr, b_ptr, offs_d, offs_l, dim_mask, length, x_stride_d, x_stride_l, WIDTH,
                          HAS_BIAS, REVERSE)
    dpre = _tap(dout_seq, offs_d, offs_l, dim_mask, length, dout_stride_d, dout_stride_l)
    if SILU:
        dpre = _silu_backward(dpre, pre)
    for k in tl.static_range(WIDTH):
        shift = (WIDTH - 1 - k) if REVERSE else (k - (WIDTH - 1))
        dw_k = tl.sum(dpre * _tap(x_seq, offs_d, offs_l + shift, dim_mask, length, x_stride_d, x_stride_l), axis=1)
        tl.store(dw_part_ptr + (tile * dim + offs_d) * WIDTH + k, dw_k, mask=dim_mask)
    if HAS_BIAS:
        tl.store(db_part_ptr + tile * dim + offs_d, tl.sum(dpre, axis=1), mask=dim_mask)
    # dx[l] = sum_k w[k] * dpre[l - shift_k]: the outputs that read x[l], their dpre recomputed where they lie
    # outside the tile.
    dx = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for k in tl.static_range(WIDTH):
        shift = (WIDTH - 1 - k) if REVERSE else (k - (WIDTH - 1))
        src = offs_l - shift
        valid = (src >= 0) & (src < length)
        pre_k = _pre_activation(x_seq, w_ptr, b_ptr, offs_d, src, dim_mask, length, x_stride_d, x_stride_l, WIDTH,
                                HAS_BIAS, REVERSE)
        dpre_k = _tap(dout_seq, offs_d, src, dim_mask, length, dout_stride_d, dout_stride_l)
        if SILU:
            dpre_k = _silu_backward(dpre_k, pre_k)
        w_k = tl.load(w_ptr + offs_d * WIDTH + k, mask=dim_mask, other=0.0).to(tl.float32)
        dx += tl.where(valid[None, :], w_k[:, None] * dpre_k, 0.0)
    _store_tile(dx_ptr, dx, batch, offs_d, offs_l, dim_mask, length, dx_stride_b, dx_stride_d, dx_stride_l)


def empty_in_layout(x: torch.Tensor) -> torch.Tensor:
    """A dense (batch, dim, L) tensor for the conv's output or dx: channel-last ((batch, L, dim) memory) when x is
    read with unit channel stride (a Vim block's x), so that the next projection and the scan read it as it is;
    contiguous otherwise."""
    batch, dim, length = x.shape
    if x.stride(1) == 1 and dim > 1:
        return torch.empty(batch, length, dim, device=x.device, dtype=x.dtype).transpose(1, 2)
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def _grid(x: torch.Tensor) -> tuple[int, int, int]:
    batch, dim, length = x.shape
    return batch, triton.cdiv(dim, BLOCK_D), triton.cdiv(length, BLOCK_L)


def causal_conv1d_triton_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool,
                             reverse: bool) -> torch.Tensor:
    weight = weight.contiguous()
    out = empty_in_layout(x)
    width = weight.shape[1]
    compiled_launcher(_conv_fwd_kernel)[_grid(x)](
        x, weight, bias if bias is not None else weight, out, x.shape[1], x.shape[2], *x.stride(), *out.stride(),
        WIDTH=width, HAS_BIAS=bias is not None, SILU=silu, REVERSE=reverse, BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L)
    return out


def causal_conv1d_triton_bwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dout: torch.Tensor,
                             silu: bool, reverse: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dx, dweight, dbias) of the forward above, in the dtypes of x, weight and bias."""
    weight = weight.contiguous()
    batch, dim, length = x.shape
    width = weight.shape[1]
    grid = _grid(x)
    tiles = batch * grid[2]
    dx = empty_in_layout(x)
    dw_part = torch.empty(tiles, dim, width, device=x.device, dtype=torch.float32)
    db_part = torch.empty(tiles, dim, device=x.device, dtype=torch.float32) if bias is not None else dw_part
    compiled_launcher(_conv_bwd_kernel)[grid](
        x, weight, bias if bias is not None else weight, dout, dx, dw_part, db_part, dim, length, grid[2],
        *x.stride(), *dout.stride(), *dx.stride(), WIDTH=width, HAS_BIAS=bias is not None, SILU=silu,
        REVERSE=reverse, BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L)
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


def _conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool,
              reverse: bool) -> torch.Tensor:
    return causal_conv1d_triton_fwd(x, weight, bias, silu, reverse)


conv_fwd_op = torch.library.custom_op("scanmae::causal_conv1d_fwd", _conv_fwd, mutates_args=())


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
