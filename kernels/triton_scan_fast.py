"""Building blocks of the "v2" scan kernels (kernels/triton_scan_fwd2.py, _bwd2.py): cheaper math and a cheaper
sum over a tile's channels.

- ``FAST`` math (compiled only): softplus and sigmoid on the approximate MUFU units (ex2/lg2/rcp.approx, about
  2^-22 relative error, the same order as float32 rounding). Triton's own tl.log is a ~25-instruction
  polynomial and its division and tl.exp carry denormal guards; the interpreter cannot run inline assembly,
  so there (``FAST`` False) the same formulas use tl.log2 and a true division.
- ``channel_sum_scatter``: the sum over the channels (axis 1) of an (N_PAD, BLOCK_D) tile as a reduce-scatter.
  tl.sum over the channel lanes is a butterfly that exchanges every value at every level (BLOCK_D 16: 32
  shuffles and 32 adds per tile per lane). Here each level exchanges only half of what is left (lane pairs
  swap the half they do not keep), so BLOCK_D 16 needs 4 + 2 + 1 + 1 shuffles; the exchanges are tl.gather
  along the channel axis, which Triton lowers to warp shuffles when that axis lies in one warp's lanes.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _lg2(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _rcp(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def softplus2(x, FAST: tl.constexpr):
    """log(1 + exp(x)) = max(x, 0) + log(1 + exp(-|x|)): one ex2 and one lg2 (1 + exp(-|x|) lies in (1, 2])."""
    return tl.maximum(x, 0.0) + LN2 * _lg2(1.0 + tl.exp2(-tl.abs(x) * LOG2E), FAST)


@triton.jit
def sigmoid2(x, FAST: tl.constexpr):
    """1 / (1 + exp(-x)): one ex2 and one rcp (exp2 overflows to inf for very negative x, giving 0)."""
    return _rcp(1.0 + tl.exp2(-x * LOG2E), FAST)


@triton.jit
def _scatter_level(x, offs_d, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, M: tl.constexpr):
    """(ROWS, BLOCK_D) -> (ROWS / 2, BLOCK_D): channels d and d ^ M add up their top halves (rows >= ROWS / 2)
    where bit M of d is set, their bottom halves where it is clear; each exchanges the half it gives away."""
    lo, hi = tl.split(tl.permute(tl.reshape(x, (2, ROWS // 2, BLOCK_D)), (1, 2, 0)))
    upper = ((offs_d & M) != 0)[None, :]
    give = tl.where(upper, lo, hi)
    keep = tl.where(upper, hi, lo)
    partner = tl.broadcast_to((offs_d ^ M)[None, :], (ROWS // 2, BLOCK_D))
    return keep + tl.gather(give, partner, axis=1)


@triton.jit
def _butterfly_level(x, offs_d, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, M: tl.constexpr):
    partner = tl.broadcast_to((offs_d ^ M)[None, :], (ROWS, BLOCK_D))
    return x + tl.gather(x, partner, axis=1)


@triton.jit
def channel_sum_scatter(x, offs_d, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, LEVELS: tl.constexpr):
    """Sum over axis 1 of an (N_PAD, BLOCK_D) tile, scattered: returns an (N_PAD >> LEVELS, BLOCK_D) tile whose
    element (i, d) is the full sum of row scatter_rows(...)[i, d]; the channels d >= 2 ** LEVELS hold copies.
    LEVELS = scatter_levels(...) (reduce-scatter steps; the rest are plain butterfly steps)."""
    if LEVELS >= 1:
        x = _scatter_level(x, offs_d, N_PAD, BLOCK_D, 1)
    if LEVELS >= 2:
        x = _scatter_level(x, offs_d, N_PAD // 2, BLOCK_D, 2)
    if LEVELS >= 3:
        x = _scatter_level(x, offs_d, N_PAD // 4, BLOCK_D, 4)
    if LEVELS >= 4:
        x = _scatter_level(x, offs_d, N_PAD // 8, BLOCK_D, 8)
    if LEVELS >= 5:
        x = _scatter_level(x, offs_d, N_PAD // 16, BLOCK_D, 16)
    ROWS: tl.constexpr = N_PAD >> LEVELS
    if BLOCK_D > 1 << LEVELS:
        x = _butterfly_level(x, offs_d, ROWS, BLOCK_D, 1 << LEVELS)
    if BLOCK_D > 2 << LEVELS:
        x = _butterfly_level(x, offs_d, ROWS, BLOCK_D, 2 << LEVELS)
    if BLOCK_D > 4 << LEVELS:
        x = _butterfly_level(x, offs_d, ROWS, BLOCK_D, 4 << LEVELS)
    if BLOCK_D > 8 << LEVELS:
        x = _butterfly_level(x, offs_d, ROWS, BLOCK_D, 8 << LEVELS)
    if BLOCK_D > 16 << LEVELS:
        x = _butterfly_level(x, offs_d, ROWS, BLOCK_D, 16 << LEVELS)
    return x


@triton.jit
def scatter_rows(offs_d, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, LEVELS: tl.constexpr):
    """The state index held at (i, d) by channel_sum_scatter's result: level j sends channel d to the top
    half (N_PAD >> (j + 1) rows further) when bit j of d is set. Also whether (i, d) is the copy to write
    (d < 2 ** LEVELS)."""
    ROWS: tl.constexpr = N_PAD >> LEVELS
    rows = tl.zeros((ROWS, BLOCK_D), dtype=tl.int32) + tl.arange(0, ROWS)[:, None]
    for j in tl.static_range(LEVELS):
        rows += ((offs_d >> j) & 1)[None, :] * (N_PAD >> (j + 1))
    owner = (offs_d < (1 << LEVELS))[None, :] & (rows >= 0)
    return rows, owner


def scatter_levels(n_state_padded: int, block_d: int) -> int:
    """Reduce-scatter steps for an (N_PAD, BLOCK_D) one-warp tile: while the halves being split are each
    thread's own registers (rows beyond the 32 / BLOCK_D lanes along N) and channels are left to pair up."""
    lanes_n = max(1, 32 // block_d)
    levels = 0
    while (n_state_padded >> levels) > lanes_n and (1 << levels) < block_d:
        levels += 1
    return levels
