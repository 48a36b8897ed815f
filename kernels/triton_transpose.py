"""(batch, dim, L) tensors moved between the contiguous layout and the channel-last one ((batch, L, dim) memory)
by one Triton kernel: a batched transpose of the last two axes in tiles, read and written along their contiguous
axes (Triton moves each tile between the two access patterns through shared memory).

The scan's v1 / v2 kernels read channel-last u / delta / dout and write the gradients in that layout with every
access coalesced across a warp's channels; in the contiguous layout each position's access is one 2-byte element per
channel, and at batch 128, L=197 the same kernels run 0.5 ms slower (docs/scan_kernels.md, twenty-third session).
``ScanLaunchConfig.transpose_io`` puts these copies around the backward. torch's own copy of a transposed view
(``x.transpose(1, 2).contiguous()``) reads or writes one side uncoalesced.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_launch import ceil_div, compiled_launcher

# (rows, columns, warps) of one program's tile. `python -m bench.transpose` on one H100 (twenty-fourth session; raw
# docs/results/transpose_h100_s24.json), GB/s contiguous -> channel-last / back at (128, 768, L=197), where the
# default scan backward copies: (128, 64, 8) 2252 / 1738 against 2203 / 1525 for the first default (64, 64, 4), whose
# back copy writes 64-position rows of a 197-position sequence; within 3 % of the best at the other shapes; a plain
# copy (clone) 2514.
DEFAULT_TILE = (128, 64, 8)


# Tensors one launch copies (the kernel's pointer pairs): the copied backward's four inputs in one launch and its
# three gradients in another, instead of seven launches (at batch 128, L=197 the host's time per launch showed in the
# wall clock on some hosts: fwd+bwd 1.85-1.89 ms wall against 1.53 GPU-busy, twenty-fourth session).
MAX_TENSORS = 4


@triton.jit
def _transpose_tile(X, Y, base, offs_r, offs_c, rows, cols):
    mask = (offs_r[:, None] < rows) & (offs_c[None, :] < cols)
    tile = tl.load(X + base + offs_r[:, None] * cols + offs_c[None, :], mask=mask)
    tl.store(Y + base + offs_c[None, :] * rows + offs_r[:, None], tile, mask=mask)


@triton.jit
def _transpose_kernel(X0, X1, X2, X3, Y0, Y1, Y2, Y3, rows, cols, batch, BLOCK_R: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """Yk[b, c, r] = Xk[b, r, c] for contiguous (batch, rows, cols) Xk and (batch, cols, rows) Yk; grid axis 2 runs
    over (tensor k, batch index) pairs (the unused pointer pairs repeat the first)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    which = tl.program_id(2) // batch
    base = (tl.program_id(2) % batch).to(tl.int64) * rows * cols
    if which == 0:
        _transpose_tile(X0, Y0, base, offs_r, offs_c, rows, cols)
    elif which == 1:
        _transpose_tile(X1, Y1, base, offs_r, offs_c, rows, cols)
    elif which == 2:
        _transpose_tile(X2, Y2, base, offs_r, offs_c, rows, cols)
    else:
        _transpose_tile(X3, Y3, base, offs_r, offs_c, rows, cols)


def transposed_copies(xs: list[torch.Tensor], tile: tuple[int, int, int] = DEFAULT_TILE) -> list[torch.Tensor]:
    """A contiguous (batch, cols, rows) copy of each contiguous (batch, rows, cols) tensor of ``xs`` (one shape, any
    dtypes), MAX_TENSORS per launch; ``tile`` = (rows, columns, warps) per program, powers of two."""
    for x in xs:
        if not x.is_contiguous() or x.shape != xs[0].shape:
            raise ValueError(f"transposed_copies: needs contiguous tensors of one shape, got {x.shape} with strides "
                             f"{x.stride()} (first {xs[0].shape})")
    ys = [x.new_empty((x.shape[0], x.shape[2], x.shape[1])) for x in xs]
    if not xs or not xs[0].numel():
        return ys
    batch, rows, cols = xs[0].shape
    block_r, block_c, warps = tile
    for start in range(0, len(xs), MAX_TENSORS):
        pairs = list(zip(xs[start:start + MAX_TENSORS], ys[start:start + MAX_TENSORS]))
        padded = pairs + [pairs[0]] * (MAX_TENSORS - len(pairs))
        grid = (ceil_div(rows, block_r), ceil_div(cols, block_c), batch * len(pairs))
        compiled_launcher(_transpose_kernel)[grid](*(x for x, _ in padded), *(y for _, y in padded), rows, cols,
                                                   batch, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return ys


def transposed_copy(x: torch.Tensor, tile: tuple[int, int, int] = DEFAULT_TILE) -> torch.Tensor:
    """A contiguous (batch, cols, rows) copy of a contiguous (batch, rows, cols) tensor (``transposed_copies``)."""
    return transposed_copies([x], tile)[0]


def channel_last_copies(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous (batch, dim, L) tensors (one shape) as (batch, dim, L) views of new (batch, L, dim) memory, in one
    launch."""
    return [y.transpose(1, 2) for y in transposed_copies(xs)]


def contiguous_copies(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Channel-last (batch, dim, L) views (of (batch, L, dim) memory; one shape) as new contiguous tensors, in one
    launch."""
    memories = [x.transpose(1, 2) for x in xs]
    for x, memory in zip(xs, memories):
        if not memory.is_contiguous():
            raise ValueError(f"contiguous_copies: needs channel-last (batch, dim, L) views, got strides {x.stride()}")
    return transposed_copies(memories)
