"""Depthwise causal conv1d (+ bias, + SiLU) in Triton: one pass forward, one pass backward.

PyTorch runs a grouped ``F.conv1d`` with 4 taps through its native depthwise kernels; in the sixteenth session's H200
profile of a Vim-S MAE step they took about 18 ms of 144 (``conv_depthwise2d_grad_weight`` alone 7.6 ms) for
tensors of (256, 768, 53), far above what their bytes cost.

A program owns BLOCK_D channels of one sequence over a span of positions and walks it in chunks of CHUNK positions.
A chunk is unrolled position by position, each position one vector of the block's channels (contiguous in memory
when x is channel-last, as a Vim block hands it over), so every value is loaded once and computed once. That walk
serves channel-last x; a contiguous x, whose channels lie a sequence apart, runs the position tiles of
``kernels/triton_causal_conv1d_tiles.py`` instead (by default; an explicit ``ConvLaunch`` runs the walk on any layout).

* forward: ``pre[t] = bias + sum_k w[k] * x[t - (W-1) + k]``, then SiLU. The chunk loads x at its W-1 positions
  before it (zero outside the sequence: the padding is the load mask) and at its own positions.
* backward: ``dx[t] = sum_k w[k] * dpre[t + (W-1) - k]`` with ``dpre = dout * SiLU'(pre)``. The chunk computes
  dpre at its positions and the W-1 after them (``pre`` recomputed from x rather than stored), and emits ``dx[t]``
  as soon as ``dpre[t + W - 1]`` exists, so only W of them are live. dweight and dbias are summed over the span in
  registers from the chunk's own positions only (the W-1 after it belong to the next chunk), written once per
  program into one buffer, and summed over programs by a second kernel in a fixed order (the result does not
  depend on scheduling, as atomics would make it).

``t`` counts positions in the direction of the conv: ``reverse`` (Vim's backward direction) walks from the end,
position ``L - 1 - t``, with no flipped copy. The chunk's unrolled walk replaces the eighteenth session's tiles of
(channels x positions), which loaded x at 2W-1 offsets per tile and recomputed every pre-activation W times in the
backward (W sigmoids per element: 0.121 of the 0.142 ms of a Vim-S conv's forward and backward at batch 256 on an
H100, four times its bytes' time).

``x`` and ``dout`` (batch, dim, L) are read through their strides, so a Vim block's ``x`` (a channel-last view into
the input projection's output) is not copied first; the output and ``dx`` are channel-last when ``x`` is
(``empty_in_layout``: what the x projection and the scan then read without a copy), contiguous otherwise. The state
is float32 and outputs take the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton_causal_conv1d_tiles import conv_tiles_bwd, conv_tiles_fwd, tile_spans
from kernels.triton_conv_common import conv_program_setup, store_partial_row
from kernels.triton_launch import ceil_div, compiled_launcher

MAX_CHUNK = 16  # positions unrolled per chunk; with the backward's W-1 extra pre-activations 3/16 are recomputed
MIN_PROGRAMS = 1024  # a sequence is split into spans only while (batch x channel blocks) programs are fewer
SUM_BLOCK_R, SUM_BLOCK_C = 32, 64  # the partial sums' reduction: rows per step, columns per program


@dataclass(frozen=True)
class ConvLaunch:
    """How the conv kernels tile one call: channels per program (``block_d``, 32 x ``num_warps`` x channels per
    thread), positions per unrolled chunk, spans per sequence (each a program) and chunks per span."""

    block_d: int
    num_warps: int
    chunk: int
    spans: int
    span_chunks: int

    @property
    def span(self) -> int:
        return self.chunk * self.span_chunks


def conv_launch(batch: int, dim: int, length: int, channel_last: bool, block_d: int | None = None,
                num_warps: int | None = None, max_chunk: int = MAX_CHUNK, min_programs: int = MIN_PROGRAMS
                ) -> ConvLaunch:
    """The launch for x of (batch, dim, length). Channel-last: 2 channels per thread (a warp reads 128 contiguous
    bytes of bf16 per position); contiguous x has its channels a sequence apart, so 1 per thread. Chunks are as
    even as ``max_chunk`` allows (L=50: 4 chunks of 13, not 16 + 16 + 16 + 2); spans split a sequence when
    fewer than ``min_programs`` programs would run otherwise (batch 16 at L=4096), and each span's partial sums are
    a row the final sum reads."""
    num_warps = num_warps or 2
    block_d = block_d or 32 * num_warps * (2 if channel_last else 1)
    n_chunks = max(1, ceil_div(length, max_chunk))  # (an empty tensor still gets a valid, empty launch)
    chunk = max(1, ceil_div(length, n_chunks))
    programs = max(1, batch * ceil_div(dim, block_d))
    spans = max(1, min(n_chunks, ceil_div(min_programs, programs)))
    span_chunks = ceil_div(n_chunks, spans)
    return ConvLaunch(block_d, num_warps, chunk, ceil_div(n_chunks, span_chunks), span_chunks)


@triton.jit
def _at(t, length, REVERSE: tl.constexpr):
    """The memory position of walk index ``t`` and whether it lies in the sequence."""
    return (length - 1 - t) if REVERSE else t, (t >= 0) & (t < length)


@triton.jit
def _load_at(seq_ptr, t, offs_d, dim_mask, length, stride_d, stride_l, REVERSE: tl.constexpr):
    """The block's channels at walk index ``t`` as float32, zero outside the sequence (the conv's padding)."""
    pos, inside = _at(t, length, REVERSE)
    return tl.load(seq_ptr + offs_d * stride_d + pos * stride_l, mask=dim_mask & inside, other=0.0).to(tl.float32)


@triton.jit
def _store_at(seq_ptr, values, t, offs_d, dim_mask, length, stride_d, stride_l, REVERSE: tl.constexpr):
    pos, inside = _at(t, length, REVERSE)
    tl.store(seq_ptr + offs_d * stride_d + pos * stride_l, values.to(seq_ptr.dtype.element_ty),
             mask=dim_mask & inside)


@triton.jit
def _pre_activation(xs, first: tl.constexpr, taps, bias, WIDTH: tl.constexpr):
    """``bias + sum_k w[k] * xs[first + k]``: the output whose window starts at ``xs[first]``."""
    pre = bias
    for k in tl.static_range(WIDTH):
        pre += taps[k] * xs[first + k]
    return pre


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, dim, length, x_stride_b, x_stride_d, x_stride_l,
                     out_stride_b, out_stride_d, out_stride_l, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SILU: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                     SPAN: tl.constexpr):
    batch, span, x_seq, offs_d, dim_mask, taps, bias = conv_program_setup(x_ptr, w_ptr, b_ptr, x_stride_b, dim, WIDTH,
                                                                          HAS_BIAS, BLOCK_D)
    out_seq = out_ptr + batch.to(tl.int64) * out_stride_b
    for t0 in tl.range(span * SPAN, tl.minimum(span * SPAN + SPAN, length), CHUNK):
        xs = ()  # x at walk indices t0 - (W-1) .. t0 + CHUNK - 1
        for i in tl.static_range(CHUNK + WIDTH - 1):
            xs = xs + (_load_at(x_seq, t0 + i - (WIDTH - 1), offs_d, dim_mask, length, x_stride_d, x_stride_l,
                                REVERSE),)
        for c in tl.static_range(CHUNK):
            pre = _pre_activation(xs, c, taps, bias, WIDTH)
            out = pre * tl.sigmoid(pre) if SILU else pre
            _store_at(out_seq, out, t0 + c, offs_d, dim_mask, length, out_stride_d, out_stride_l, REVERSE)


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, dout_ptr, dx_ptr, part_ptr, dim, length, n_spans,
                     x_stride_b, x_stride_d, x_stride_l, dout_stride_b, dout_stride_d, dout_stride_l,
                     dx_stride_b, dx_stride_d, dx_stride_l, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SILU: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                     SPAN: tl.constexpr):
    batch, span, x_seq, offs_d, dim_mask, taps, bias = conv_program_setup(x_ptr, w_ptr, b_ptr, x_stride_b, dim, WIDTH,
                                                                          HAS_BIAS, BLOCK_D)
    dout_seq = dout_ptr + batch.to(tl.int64) * dout_stride_b
    dx_seq = dx_ptr + batch.to(tl.int64) * dx_stride_b
    dw_acc = ()
    for _ in tl.static_range(WIDTH):
        dw_acc = dw_acc + (tl.zeros((BLOCK_D,), dtype=tl.float32),)
    db_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t0 in tl.range(span * SPAN, tl.minimum(span * SPAN + SPAN, length), CHUNK):
        xs = ()  # x at walk indices t0 - (W-1) .. t0 + CHUNK + W - 2: the windows of outputs t0 .. t0 + CHUNK + W - 2
        for i in tl.static_range(CHUNK + 2 * (WIDTH - 1)):
            xs = xs + (_load_at(x_seq, t0 + i - (WIDTH - 1), offs_d, dim_mask, length, x_stride_d, x_stride_l,
                                REVERSE),)
        dpres = ()  # dpre at walk indices t0 .. t0 + s (outside the sequence dout is masked to zero, so dpre is too)
        for s in tl.static_range(CHUNK + WIDTH - 1):
            dpre = _load_at(dout_seq, t0 + s, offs_d, dim_mask, length, dout_stride_d, dout_stride_l, REVERSE)
            if SILU:
                pre = _pre_activation(xs, s, taps, bias, WIDTH)
                sig = tl.sigmoid(pre)
                dpre = dpre * sig * (1.0 + pre * (1.0 - sig))
            dpres = dpres + (dpre,)
            if s < CHUNK:  # the chunk's own outputs: dw[k] += dpre[t] * x[t - (W-1) + k], dbias += dpre[t]
                summed = ()
                for k in tl.static_range(WIDTH):
                    summed = summed + (dw_acc[k] + dpre * xs[s + k],)
                dw_acc = summed
                db_acc += dpre
            if s >= WIDTH - 1:  # dx[t] for t = t0 + s - (W-1): every output reading x[t] has its dpre now
                dx = tl.zeros((BLOCK_D,), dtype=tl.float32)
                for k in tl.static_range(WIDTH):
                    dx += taps[k] * dpres[s - k]
                _store_at(dx_seq, dx, t0 + s - (WIDTH - 1), offs_d, dim_mask, length, dx_stride_d, dx_stride_l,
                          REVERSE)
    store_partial_row(part_ptr, dw_acc, db_acc, batch, span, n_spans, dim, offs_d, dim_mask, WIDTH)


@triton.jit
def _sum_partials_kernel(part_ptr, dw_ptr, db_ptr, rows, dim, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dweight (dim, W) and dbias (dim,) in their own dtypes from the backward's (rows, dim, W + 1) partial sums: a
    program sums BLOCK_C columns over every row in a fixed order (deterministic, unlike atomics), in one launch
    where torch would take a sum, a slice's copy and two casts."""
    cols = dim * (WIDTH + 1)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = offs_c < cols
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in tl.range(0, rows, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        at = offs_r[:, None].to(tl.int64) * cols + offs_c[None, :]
        acc += tl.load(part_ptr + at, mask=(offs_r < rows)[:, None] & col_mask[None, :], other=0.0)
    total = tl.sum(acc, axis=0)
    channel, k = offs_c // (WIDTH + 1), offs_c % (WIDTH + 1)
    tl.store(dw_ptr + channel * WIDTH + k, total.to(dw_ptr.dtype.element_ty), mask=col_mask & (k < WIDTH))
    if HAS_BIAS:
        tl.store(db_ptr + channel, total.to(db_ptr.dtype.element_ty), mask=col_mask & (k == WIDTH))


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


def _takes_tiles(x: torch.Tensor, launch: ConvLaunch | None) -> bool:
    """Whether a call runs the position tiles of kernels/triton_causal_conv1d_tiles.py: x not channel-last and no
    explicit chunk-walk launch (bench.conv --launches and the tests pass one to time or check the walk on any
    layout)."""
    return launch is None and not _channel_last(x)


def _launch_for(x: torch.Tensor, launch: ConvLaunch | None
                ) -> tuple[ConvLaunch, tuple[int, int, int], dict[str, int]]:
    """The launch (``conv_launch``'s unless given), its grid (batch, channel blocks, spans) and the kernels'
    tile constexprs and options."""
    batch, dim, length = x.shape
    launch = launch or conv_launch(batch, dim, length, _channel_last(x))
    grid = (batch, ceil_div(dim, launch.block_d), launch.spans)
    return launch, grid, dict(BLOCK_D=launch.block_d, CHUNK=launch.chunk, SPAN=launch.span,
                              num_warps=launch.num_warps)


def causal_conv1d_triton_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool,
                             reverse: bool, launch: ConvLaunch | None = None) -> torch.Tensor:
    weight = weight.contiguous()
    out = empty_in_layout(x)
    if _takes_tiles(x, launch):
        conv_tiles_fwd(x, weight, bias, out, silu, reverse)
        return out
    _, grid, tile = _launch_for(x, launch)
    compiled_launcher(_conv_fwd_kernel)[grid](
        x, weight, bias if bias is not None else weight, out, x.shape[1], x.shape[2], *x.stride(), *out.stride(),
        WIDTH=weight.shape[1], HAS_BIAS=bias is not None, SILU=silu, REVERSE=reverse, **tile)
    return out


def causal_conv1d_triton_bwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dout: torch.Tensor,
                             silu: bool, reverse: bool, launch: ConvLaunch | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dx, dweight, dbias) of the forward above, in the dtypes of x, weight and bias."""
    weight = weight.contiguous()
    batch, dim, length = x.shape
    width = weight.shape[1]
    dx = empty_in_layout(x)
    if _takes_tiles(x, launch):
        partial = torch.empty(batch * tile_spans(length), dim, width + 1, device=x.device, dtype=torch.float32)
        conv_tiles_bwd(x, weight, bias, dout, dx, partial, silu, reverse)
    else:
        launch, grid, tile = _launch_for(x, launch)
        partial = torch.empty(batch * launch.spans, dim, width + 1, device=x.device, dtype=torch.float32)
        compiled_launcher(_conv_bwd_kernel)[grid](
            x, weight, bias if bias is not None else weight, dout, dx, partial, dim, length, launch.spans,
            *x.stride(), *dout.stride(), *dx.stride(), WIDTH=width, HAS_BIAS=bias is not None, SILU=silu,
            REVERSE=reverse, **tile)
    dweight = torch.empty(dim, width, device=x.device, dtype=weight.dtype)
    dbias = torch.empty_like(bias) if bias is not None else None
    compiled_launcher(_sum_partials_kernel)[(ceil_div(dim * (width + 1), SUM_BLOCK_C),)](
        partial, dweight, dbias if dbias is not None else dweight, partial.shape[0], dim, WIDTH=width,
        HAS_BIAS=bias is not None, BLOCK_R=SUM_BLOCK_R, BLOCK_C=SUM_BLOCK_C)
    return dx, dweight, dbias


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


def _conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool, reverse: bool
              ) -> torch.Tensor:
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
