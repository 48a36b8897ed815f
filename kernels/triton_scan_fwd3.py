"""Forward kernel of the selective scan, variant "v3" (ScanLaunchConfig.variant): one lane per channel.

v1 and v2 spread a channel's N states over 32 / BLOCK_D lanes, which costs shuffles in every sum over N and
repeats each channel's own work (loads, softplus, gate, store) on every lane of the channel. Here the tiles
are (N_PAD, BLOCK_D) with BLOCK_D = 32 * num_warps: a lane holds all N states of its channel, sums over N
stay in its registers, and per-channel work happens once.

The launcher (kernels/triton_scan_fwd.py) hands B and C over as float32 (batch, groups, L, N_PAD), zero-padded
to N_PAD states: a position's B is contiguous in each lane (16-byte vector loads) with no conversions and no state
mask (a padded state has A = 0 and B = C = 0, so it stays 0 and adds nothing).

u / delta / z are read, and out written, as (BLOCK_D, TILE) tiles with lanes along the positions, and moved to
one lane per channel through shared memory (tile_columns / columns_tile): in (batch, dim, L) memory a
position's channels are L apart, so a read of one position per lane used 2 of every 32 bytes of each sector it
moved, and on the H100 the L2 was the limit (twenty-second session; docs/scan_kernels.md). The state entering
each chunk is saved for the backward in the layout of every variant, (batch, chunks, N, dim).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_scan_common import (
    UNSPECIALIZED,
    carry_in,
    channel_block,
    channel_params,
    chunk_position,
    segment_walk,
    state_offsets,
)
from kernels.triton_scan_fast import sigmoid2, softplus2


@triton.jit
def chunk_loads(rows, seq_row, chunk_idx, n_chunks, length, CHUNK: tl.constexpr, REVERSE: tl.constexpr):
    """Per step of one chunk (scan order), the (BLOCK_D,) values of each row pointer in the tuple ``rows`` at that
    position, as stored. Unmasked: the chunk index and positions are clamped into range (``seq_row`` must hold
    only real channels), so reads past either end repeat real values that the caller discards."""
    chunk_idx = tl.minimum(tl.maximum(chunk_idx, 0), n_chunks - 1)
    steps = ()
    for s in tl.static_range(CHUNK):
        at = tl.minimum(chunk_position(chunk_idx * CHUNK, s, CHUNK, REVERSE), length - 1)
        values = ()
        for k in tl.static_range(len(rows)):
            values = values + (tl.load(rows[k] + seq_row + at),)
        steps = steps + (values,)
    return steps


@triton.constexpr_function
def bit_reverse(i, bits):
    """``i`` with its lowest ``bits`` bits in reverse order (compile time)."""
    i, bits = int(i), int(bits)
    return sum(((i >> b) & 1) << (bits - 1 - b) for b in range(bits))


@triton.constexpr_function
def tile_offset(step, tile, reverse):
    """The memory offset within a tile of scan step ``step`` (and the step of an offset: the map is its own
    inverse); a reverse scan walks the tile from its end."""
    return int(tile) - 1 - int(step) if reverse else int(step)


@triton.jit
def tile_columns(tile, BLOCK: tl.constexpr, LOG2_L: tl.constexpr):
    """The 2**LOG2_L columns of a (BLOCK, 2**LOG2_L) tile as a tuple of (BLOCK,) vectors, column j at index
    bit_reverse(j). Splitting the last axis in halves needs it in each thread's registers, so Triton moves a tile
    loaded with lanes along the positions (coalesced) to one lane per row through shared memory: a transpose."""
    shape: tl.constexpr = (BLOCK,) + (2,) * LOG2_L
    cols = (tl.reshape(tile, shape),)
    for _level in tl.static_range(LOG2_L):
        halves = ()
        for k in tl.static_range(len(cols)):
            even, odd = tl.split(cols[k])
            halves = halves + (even, odd)
        cols = halves
    return cols


@triton.jit
def columns_tile(cols, BLOCK: tl.constexpr, LOG2_L: tl.constexpr):
    """The inverse of tile_columns: a (BLOCK, 2**LOG2_L) tile from its columns in bit-reversed order."""
    for _level in tl.static_range(LOG2_L):
        pairs = ()
        for k in tl.static_range(len(cols) // 2):
            pairs = pairs + (tl.join(cols[2 * k], cols[2 * k + 1]),)
        cols = pairs
    return tl.reshape(cols[0], (BLOCK, 1 << LOG2_L))


@triton.constexpr_function
def log2_of(n):
    """log2 of a power of two (compile time)."""
    return int(n).bit_length() - 1


@triton.jit
def tile_steps(tile, BLOCK: tl.constexpr, LOG2_L: tl.constexpr, REVERSE: tl.constexpr):
    """The columns of a (BLOCK, 2**LOG2_L) position tile as a tuple in scan order: step s is memory offset
    tile_offset(s, 2**LOG2_L, REVERSE)."""
    cols = tile_columns(tile, BLOCK, LOG2_L)
    steps = ()
    for s in tl.static_range(1 << LOG2_L):
        steps = steps + (cols[bit_reverse(tile_offset(s, 1 << LOG2_L, REVERSE), LOG2_L)],)
    return steps


@triton.jit
def steps_tile(steps, BLOCK: tl.constexpr, LOG2_L: tl.constexpr, REVERSE: tl.constexpr):
    """The inverse of tile_steps: a (BLOCK, 2**LOG2_L) tile from one (BLOCK,) vector per step, ``steps[i]`` at
    memory offset tile_offset(i, 2**LOG2_L, REVERSE)."""
    cols = ()
    for i in tl.static_range(1 << LOG2_L):
        cols = cols + (steps[tile_offset(bit_reverse(i, LOG2_L), 1 << LOG2_L, REVERSE)],)
    return columns_tile(cols, BLOCK, LOG2_L)


@triton.jit
def chunk_tiles(rows, read_row, chunk_idx, length, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                REVERSE: tl.constexpr):
    """As chunk_loads, the chunk's values of each row pointer in ``rows`` per step (scan order), read as one
    (BLOCK_D, CHUNK) tile per row with lanes along the positions (tile_columns moves it to one lane per channel):
    CHUNK positions of a channel in one request instead of one request per position. Positions outside the
    sequence read 0."""
    offs = chunk_idx * CHUNK + tl.arange(0, CHUNK)
    ptrs = read_row[:, None] + offs[None, :]
    mask = (offs[None, :] >= 0) & (offs[None, :] < length)
    per_row = ()
    for k in tl.static_range(len(rows)):
        per_row = per_row + (tile_steps(tl.load(rows[k] + ptrs, mask=mask, other=0.0), BLOCK_D, log2_of(CHUNK),
                                        REVERSE),)
    steps = ()
    for s in tl.static_range(CHUNK):
        values = ()
        for k in tl.static_range(len(rows)):
            values = values + (per_row[k][s],)
        steps = steps + (values,)
    return steps


@triton.jit
def store_chunk_tile(ptr, seq_row, values, chunk_idx, length, d_mask, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                     REVERSE: tl.constexpr):
    """Store CHUNK (BLOCK_D,) vectors as the chunk's (BLOCK_D, CHUNK) tile, ``values[i]`` at memory offset
    tile_offset(i, CHUNK, REVERSE) (steps_tile), masked to the sequence and the real channels: one request per
    channel and chunk instead of one per position."""
    offs = chunk_idx * CHUNK + tl.arange(0, CHUNK)
    mask = d_mask[:, None] & (offs[None, :] < length)
    tile = steps_tile(values, BLOCK_D, log2_of(CHUNK), REVERSE)
    tl.store(ptr + seq_row[:, None] + offs[None, :], tile.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def discretize(delta, bias, valid, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr):
    """dt from a loaded delta (0 where not ``valid``) and the raw value softplus was applied to."""
    dt_raw = delta.to(tl.float32)
    if HAS_BIAS:
        dt_raw += bias
    dt = dt_raw
    if SOFTPLUS:
        dt = softplus2(dt_raw, FAST)
    return tl.where(valid, dt, 0.0), dt_raw


@triton.jit(do_not_specialize=UNSPECIALIZED)  # see kernels/triton_scan_common.py
def _scan_fwd_kernel_v3(
    U, DELTA, A, B, C, D, Z, DELTA_BIAS,
    OUT, CHUNK_STATES, LAST_STATE, SEG_STATES, SEG_DTSUM,
    dim, length, dim_per_group, n_groups, n_chunks, n_state, a_state_stride, n_seg, chunks_per_seg,
    N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, LOG2_TILE: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, STORE_STATES: tl.constexpr, FAST: tl.constexpr,
):
    TILE: tl.constexpr = 1 << LOG2_TILE
    TILE_CHUNKS: tl.constexpr = TILE // CHUNK
    batch_idx, group, offs_d, d_mask, offs_n, n_mask, nd_mask = channel_block(
        n_groups, dim_per_group, n_state, BLOCK_D, N_PAD)
    A2, D_vec, bias = channel_params(A, D, DELTA_BIAS, a_state_stride, offs_n, offs_d, nd_mask,
                                     d_mask, BLOCK_D, HAS_D, HAS_BIAS)
    row = (batch_idx * dim + offs_d).to(tl.int64)
    seq_row = row * length
    B_seq = B + (batch_idx * n_groups + group).to(tl.int64) * length * N_PAD
    C_seq = C + (batch_idx * n_groups + group).to(tl.int64) * length * N_PAD
    offs_t = tl.arange(0, TILE)

    # Grid axis 2: the segment of the sequence (kernels/triton_scan_segments.py; one segment = the whole of it).
    seg = tl.program_id(2)
    chunk_idx, chunk_step, count = segment_walk(seg, chunks_per_seg, n_chunks, REVERSE, False)
    h = carry_in(tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32), SEG_STATES, SEG_DTSUM, 0, seg, 1, batch_idx, n_seg,
                 n_state, dim, A2, offs_d, offs_n, d_mask, nd_mask)
    for tile_idx in range(tl.cdiv(count, TILE_CHUNKS)):
        # The tile's chunks in scan order are chunk_idx, chunk_idx + chunk_step, ...; in memory it starts at its
        # lowest position. Reads past the segment or the sequence are masked (identity steps, nothing stored).
        if REVERSE:
            first_pos = (chunk_idx - (TILE_CHUNKS - 1)) * CHUNK
            chunk_of_offset = TILE_CHUNKS - 1 - offs_t // CHUNK
        else:
            first_pos = chunk_idx * CHUNK
            chunk_of_offset = offs_t // CHUNK
        tile_pos = first_pos + offs_t
        chunks_left = count - tile_idx * TILE_CHUNKS
        tile_valid = (chunk_of_offset < chunks_left) & (tile_pos < length)
        tile_mask = d_mask[:, None] & tile_valid[None, :]
        tile_offs = seq_row[:, None] + tile_pos[None, :]
        u_steps = tile_steps(tl.load(U + tile_offs, mask=tile_mask, other=0.0), BLOCK_D, LOG2_TILE, REVERSE)
        delta_steps = tile_steps(tl.load(DELTA + tile_offs, mask=tile_mask, other=0.0), BLOCK_D, LOG2_TILE, REVERSE)
        if HAS_Z:
            z_steps = tile_steps(tl.load(Z + tile_offs, mask=tile_mask, other=0.0), BLOCK_D, LOG2_TILE, REVERSE)
        ys = ()  # in scan order
        for s in tl.static_range(TILE):
            chunk_valid = tile_idx * TILE_CHUNKS + s // CHUNK < count
            if STORE_STATES and s % CHUNK == 0:
                offs = state_offsets(batch_idx, chunk_idx + (s // CHUNK) * chunk_step, n_chunks, n_state, dim,
                                     offs_d, offs_n)
                tl.store(CHUNK_STATES + offs, h, mask=nd_mask & chunk_valid)
            pos = first_pos + tile_offset(s, TILE, REVERSE)
            valid = chunk_valid & (pos < length)
            u = u_steps[s].to(tl.float32)
            dt, _dt_raw = discretize(delta_steps[s], bias, valid, HAS_BIAS, SOFTPLUS, FAST)
            # Past the end dt = 0: an identity step whatever the clamped B and C hold.
            at = tl.maximum(tl.minimum(pos, length - 1), 0)
            B_col = tl.load(B_seq + at * N_PAD + offs_n)
            C_col = tl.load(C_seq + at * N_PAD + offs_n)
            h = tl.exp2(dt[None, :] * A2) * h + B_col[:, None] * (dt * u)[None, :]
            y = tl.sum(h * C_col[:, None], axis=0)
            if HAS_D:
                y += D_vec * u
            if HAS_Z:
                z = z_steps[s].to(tl.float32)
                y = y * z * sigmoid2(z, FAST)
            ys = ys + (y,)
        out_tile = steps_tile(ys, BLOCK_D, LOG2_TILE, REVERSE)
        tl.store(OUT + tile_offs, out_tile.to(OUT.dtype.element_ty), mask=tile_mask)
        chunk_idx += TILE_CHUNKS * chunk_step

    tl.store(LAST_STATE + row[None, :] * n_state + offs_n[:, None], h, mask=nd_mask & (seg == n_seg - 1))


def padded_float32(bc: torch.Tensor, n_pad: int) -> torch.Tensor:
    """Grouped B or C (batch, groups, N, L) as the v3 kernels read it: float32 (batch, groups, L, n_pad), the
    states past N zero (one copy, as the (L, N) transpose needs anyway)."""
    batch, groups, n_state, length = bc.shape
    out = bc.new_zeros((batch, groups, length, n_pad), dtype=torch.float32)
    out[..., :n_state] = bc.transpose(-1, -2)
    return out
