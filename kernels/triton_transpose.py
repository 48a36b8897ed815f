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

from kernels.triton_launch import compiled_launcher

# (rows, columns, warps) of one program's tile. `python -m bench.transpose` on one H100 (twenty-fourth session; raw
# docs/results/transpose_h100_s24.json), GB/s contiguous -> channel-last / back at (128, 768, L=197), where the
# default scan backward copies: (128, 64, 8) 2252 / 1738 against 2203 / 1525 for the first default (64, 64, 4), whose
# back copy writes 64-position rows of a 197-position sequence; within 3 % of the best at the other shapes; a plain
# copy (clone) 2514.
DEFAULT_TILE = (128, 64, 8)


@triton.jit
def _transpose_kernel(X, Y, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Y[b, c, r] = X[b, r, c] for contiguous (batch, rows, cols) X and (batch, cols, rows) Y."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    base = tl.program_id(2).to(tl.int64) * rows * cols
    mask = (offs_r[:, None] < rows) & (offs_c[None, :] < cols)
    tile = tl.load(X + base + offs_r[:, None] * cols + offs_c[None, :], mask=mask)
    tl.store(Y + base + offs_c[None, :] * rows + offs_r[:, None], tile, mask=mask)


def transposed_copy(x: torch.Tensor, tile: tuple[int, int, int] = DEFAULT_TILE) -> torch.Tensor:
    """A contiguous (batch, cols, rows) copy of a contiguous (batch, rows, cols) tensor; ``tile`` = (rows, columns,
    warps) per program, powers of two."""
    batch, rows, cols = x.shape
    y = x.new_empty((batch, cols, rows))
    if x.numel():
        block_r, block_c, warps = tile
        grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c), batch)
        compiled_launcher(_transpose_kernel)[grid](x, y, rows, cols, BLOCK_R=block_r, BLOCK_C=block_c,
                                                   num_warps=warps)
    return y


def channel_last_copy(x: torch.Tensor) -> torch.Tensor:
    """A contiguous (batch, dim, L) tensor as a (batch, dim, L) view of new (batch, L, dim) memory."""
    if not x.is_contiguous():
        raise ValueError(f"channel_last_copy: needs a contiguous (batch, dim, L) tensor, got strides {x.stride()}")
    return transposed_copy(x).transpose(1, 2)


def contiguous_copy(x: torch.Tensor) -> torch.Tensor:
    """A channel-last (batch, dim, L) view (of (batch, L, dim) memory) as a new contiguous tensor."""
    memory = x.transpose(1, 2)
    if not memory.is_contiguous():
        raise ValueError(f"contiguous_copy: needs a channel-last (batch, dim, L) view, got strides {x.stride()}")
    return transposed_copy(memory)

