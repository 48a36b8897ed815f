"""Triton helpers and launch configuration shared by the scan kernels (kernels/triton_scan_fwd.py, _bwd.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from kernels.triton_launch import ceil_div, next_power_of_2


@triton.jit
def softplus(x):
    """log(1 + exp(x)) without overflow for large x."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def channel_block(n_groups, dim_per_group, n_state, BLOCK_D: tl.constexpr, N_PAD: tl.constexpr):
    """This program's (batch, group) and its BLOCK_D channels: grid axis 0 = channel block, axis 1 =
    batch * groups. Returns batch_idx, group, offs_d (global channel indices), d_mask, offs_n, n_mask, nd_mask."""
    pid_bg = tl.program_id(1)
    batch_idx = pid_bg // n_groups
    group = pid_bg % n_groups
    offs_in_group = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_in_group < dim_per_group
    offs_d = group * dim_per_group + offs_in_group
    offs_n = tl.arange(0, N_PAD)
    n_mask = offs_n < n_state
    nd_mask = n_mask[:, None] & d_mask[None, :]
    return batch_idx, group, offs_d, d_mask, offs_n, n_mask, nd_mask


# Integer arguments every scan kernel takes unspecialised (``do_not_specialize``). dim and dim_per_group: with their
# divisibility by 16 known, Triton vectorises the (N, BLOCK_D) tiles 4 channels per thread, which costs 3-level
# shuffles in every sum over N (sm_90 SASS, bench/scan_sass.py: forward 236 -> 146 and backward 523 -> 480
# instructions per position at dim 768). A's state stride: see channel_params.
UNSPECIALIZED = ["dim", "dim_per_group", "a_state_stride"]
# The v1 / v2 kernels' batch and channel strides of u / delta / out (seq_*) and z (z_*): a channel stride of 1
# (channel-last inputs) known at compile time would let Triton vectorise the (N, BLOCK_D) tiles along the
# channels, with the shuffle cost above. Their position strides stay specialisable: 1 for contiguous inputs, as the
# kernels were written for.
SEQ_UNSPECIALIZED = ["seq_sb", "seq_sd", "z_sb", "z_sd"]
# The variants whose kernels take those strides (the others read u / delta / z contiguous).
SEQUENCE_STRIDED_VARIANTS = ("v1", "v2")


@triton.jit
def channel_params(A, D, DELTA_BIAS, a_state_stride, offs_n, offs_d, nd_mask, d_mask,
                   BLOCK_D: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The block's A * log2(e) as an (N, BLOCK_D) tile (each decay is then one exp2), from an A whose channels are
    adjacent in memory (``dim_major``; the state stride is an argument), and its D and delta_bias (zeros when
    absent).

    Why channels adjacent: Triton lays a loaded tile out along the axis it knows to be contiguous, and the scan
    loop inherits that layout. Read from the (dim, N) parameter as it is, the loop ran along N, with redundant
    exp2s and spills: 456 -> 670 SASS instructions per position in the v1 backward (bench/scan_sass.py) and 2.08
    -> 2.90 ms fwd+bwd at L=197 on the H100 (tenth session). Through two unspecialised strides (no contiguity
    known either way) Triton 3.8 kept the channel layout but Triton 3.6, the GPU machine's, did not: 466 -> 692
    with spills offline, and 2.03 -> 2.91 ms on the H100 in the twelfth session.
    """
    A2 = tl.load(A + offs_n[:, None] * a_state_stride + offs_d[None, :], mask=nd_mask, other=0.0)
    A2 = A2 * 1.4426950408889634
    D_vec, bias = skip_and_bias(D, DELTA_BIAS, offs_d, d_mask, BLOCK_D, HAS_D, HAS_BIAS)
    return A2, D_vec, bias


@triton.jit
def skip_and_bias(D, DELTA_BIAS, offs_d, d_mask, BLOCK_D: tl.constexpr, HAS_D: tl.constexpr,
                  HAS_BIAS: tl.constexpr):
    """The block's D and delta_bias, zeros when absent."""
    D_vec = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        D_vec = tl.load(D + offs_d, mask=d_mask, other=0.0)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(DELTA_BIAS + offs_d, mask=d_mask, other=0.0)
    return D_vec, bias


@triton.jit
def position_walk(first_chunk, CHUNK: tl.constexpr, REVERSE: tl.constexpr):
    """The first position a per-position forward visits from chunk ``first_chunk`` (segment_walk's first chunk)
    and its step: the chunk's lowest position upwards, or its highest (padded) position downwards for a reverse
    scan."""
    pos = chunk_position(first_chunk * CHUNK, 0, CHUNK, REVERSE)
    if REVERSE:
        return pos, -1
    else:
        return pos, 1


@triton.jit
def chunk_position(base, s, CHUNK: tl.constexpr, REVERSE: tl.constexpr):
    """Position of the s-th step of the chunk starting at ``base``, in scan order."""
    if REVERSE:
        return base + (CHUNK - 1 - s)
    else:
        return base + s


@triton.jit
def state_offsets(batch_idx, chunk_idx, n_chunks, n_state, dim, offs_d, offs_n):
    """Offsets of one chunk's (N_PAD, BLOCK_D) entry states in the (batch, chunks, N, dim) buffer of every
    variant (dim fastest: each state row is one coalesced access, in the lanes-over-channels layout)."""
    first = (batch_idx * n_chunks + chunk_idx).to(tl.int64) * n_state * dim
    return first + offs_n[:, None] * dim + offs_d[None, :]


@triton.jit
def segment_walk(seg, chunks_per_seg, n_chunks, REVERSE: tl.constexpr, BACKWARD: tl.constexpr):
    """The first chunk a program of segment ``seg`` visits, the step to the next one and how many it visits.
    Segments are runs of chunks in scan order; a forward walk goes in scan order, a backward walk against it."""
    first = seg * chunks_per_seg
    count = tl.minimum(n_chunks - first, chunks_per_seg)
    if BACKWARD:
        step_in_scan = first + count - 1
    else:
        step_in_scan = first
    if REVERSE:
        chunk_idx = n_chunks - 1 - step_in_scan
    else:
        chunk_idx = step_in_scan
    if REVERSE == BACKWARD:
        chunk_step = 1
    else:
        chunk_step = -1
    return chunk_idx, chunk_step, count


@triton.jit
def carry_in(x, SEG_STATES, SEG_DTSUM, first, count, step, batch_idx, n_seg, n_state, dim, A2, offs_d, offs_n,
             d_mask, nd_mask):
    """``x`` carried through ``count`` segment summaries, from segment ``first`` in steps of ``step``: each one
    decays it by exp(A * sum dt) and adds the segment's own end value."""
    for i in range(count):
        seg = first + i * step
        end = tl.load(SEG_STATES + state_offsets(batch_idx, seg, n_seg, n_state, dim, offs_d, offs_n),
                      mask=nd_mask, other=0.0)
        dt_sum = tl.load(SEG_DTSUM + (batch_idx * n_seg + seg).to(tl.int64) * dim + offs_d, mask=d_mask, other=0.0)
        x = tl.exp2(dt_sum[None, :] * A2) * x + end
    return x


@triton.jit
def backward_start(DLAST_T, batch_idx, dim, n_state, offs_n, offs_d, nd_mask, N_PAD: tl.constexpr,
                   BLOCK_D: tl.constexpr, HAS_DLAST: tl.constexpr):
    """A backward program's starting point: the adjoint of the state after the last position (the last state's
    incoming gradient, or zeros) and zeroed dA / dD / ddelta_bias accumulators. Its chunk walk is
    segment_walk(..., BACKWARD=True). The last state's gradient comes transposed, (batch, N, dim), for the reason
    given in channel_params (read as (batch, dim, N) the backward's hot loop grew from 457 to 642 instructions)."""
    g = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    if HAS_DLAST:
        g = tl.load(DLAST_T + batch_idx.to(tl.int64) * n_state * dim + offs_n[:, None] * dim + offs_d[None, :],
                    mask=nd_mask, other=0.0)
    dA_acc = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    return g, dA_acc, dD_acc, dbias_acc


@triton.jit
def backward_finish(DA, DD, DDELTA_BIAS, dA_acc, dD_acc, dbias_acc, offs_d, offs_n, n_state, d_mask, nd_mask,
                    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Add a program's dA, dD and ddelta_bias sums (over its positions) into the float32 outputs."""
    tl.atomic_add(DA + offs_d[None, :] * n_state + offs_n[:, None], dA_acc, mask=nd_mask, sem="relaxed")
    if HAS_D:
        tl.atomic_add(DD + offs_d, dD_acc, mask=d_mask, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(DDELTA_BIAS + offs_d, dbias_acc, mask=d_mask, sem="relaxed")


SCAN_VARIANTS = ("v1", "v2", "v3", "v4")
# Variants with a forward kernel only: their saved chunk states feed a v1 or v2 backward.
FORWARD_ONLY_VARIANTS = ("v4",)


@dataclass(frozen=True)
class ScanLaunchConfig:
    """Tiles of the scan kernels (kernels/triton_scan_fwd.py, _bwd.py): one warp per program holding ``block_d`` <= 32
    channels (32 / block_d lanes per channel). The forward saves the state every ``chunk`` positions, so
    forward and backward configs must agree on ``chunk``.

    ``maxnreg`` caps registers per thread (more resident warps, at the price of some recomputation).
    ``prefetch`` (backward): load the next chunk's entry state, u, delta, dout and z before the current
    chunk's arithmetic (hides L2 latency; sm_90: 251 registers instead of 231, spills under a register cap).
    ``variant``: "v1" the kernels of kernels/triton_scan_fwd.py / _bwd.py; "v2" those of
    kernels/triton_scan_fwd2.py / _bwd2.py (same tiles and results, fewer instructions per position: unmasked
    clamped reads, approximate-math softplus / sigmoid on CUDA, backward dB / dC summed by reduce-scatter);
    "v3" those of kernels/triton_scan_fwd3.py / _bwd3.py (one lane per channel with all its N states, u / delta /
    z read and outputs written as position tiles, ``tile_l`` positions in the forward and a chunk in the backward,
    moved between lanes through shared memory; block_d = 32 per warp); "v4" the forward of kernels/triton_scan_fwd4.py
    (parallel over positions: spans of ``block_l`` positions scanned with tl.associative_scan, block_d channels per
    program), forward only: its backward is a v1 or v2 config. A config built without ``variant`` names v1; the
    device defaults (``default_launch_config``, what ``selective_scan_fn`` uses unless given tiles) run
    DEFAULT_VARIANT.
    ``tile_io`` (v2): read u / delta / z (dout) and write out (du / ddelta / dz) as one (block_d, chunk) tile per
    chunk, moved to the lanes of its channels through shared memory, where their position stride is 1 ((batch, dim,
    L) contiguous; ignored for channel-last inputs): one memory request per tensor and chunk instead of one per
    position.
    ``transpose_io`` (v1 / v2 backward): contiguous u / delta / z / dout copied to channel-last by a transpose kernel
    (kernels/triton_transpose.py), the kernel run on the copies, du / ddelta / dz copied back: four tensors in and
    three out at copy speed instead of the kernel's strided accesses.
    ``tile_grads`` (v2, with ``transpose_io``): the kernel on the channel-last copies writes du / ddelta / dz straight
    into contiguous buffers as chunk tiles (the ``tile_io`` stores) instead of the three copies back.
    ``bf16_states``: with bfloat16 inputs, the forward saves the chunk states in bfloat16 (82 of the 121 MB a (128,
    768, 16, L=50) forward+backward moves in float32); the backward recomputes each chunk from its rounded entry
    state in float32: gradients move by about bfloat16's rounding (2^-9 relative), the output not at all.
    ``segments`` (v2, v3): split each sequence into up to this many runs of whole chunks, scanned by parallel
    programs after a summary pass (kernels/triton_scan_segments.py); for grids too small to fill the device. v2
    splits only (batch, dim, L)-contiguous u / delta / z (/ dout): its summaries read those rows. Opt-in: on an
    H100 at batch 16 (L=1024 / 4096) v2 with 2-16 segments was slower than unsplit (docs/scan_kernels.md,
    twenty-fifth session).
    """

    block_d: int
    chunk: int
    maxnreg: int | None = None
    prefetch: bool = False
    variant: str = "v1"
    segments: int = 1
    block_l: int = 256  # v4: positions per span (a power of two; ignored by the other variants)
    tile_l: int = 16  # v3 forward: positions of u / delta / z read, and of out written, as one tile
    tile_io: bool = False  # v2: chunk tiles for unit position strides
    transpose_io: bool = False  # v1 / v2 backward: run on channel-last copies of contiguous inputs
    tile_grads: bool = False  # v2 with transpose_io: gradients written contiguous as chunk tiles
    bf16_states: bool = False  # bfloat16 inputs: chunk states saved in bfloat16

    def saved_state_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the chunk states the forward saves for inputs of ``input_dtype``."""
        return torch.bfloat16 if self.bf16_states and input_dtype == torch.bfloat16 else torch.float32

    def log2_tile(self) -> int:
        """log2 of the v3 forward's tile length: ``tile_l``, at least one chunk."""
        return max(self.tile_l, self.chunk).bit_length() - 1

    def __post_init__(self) -> None:
        for name in ("block_d", "chunk", "segments", "block_l", "tile_l"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"ScanLaunchConfig.{name} must be a power of two, got {value}")
        if self.block_d > (128 if self.variant == "v3" else 32):
            raise ValueError(f"ScanLaunchConfig: block_d is at most 32 (one warp per program; v3: 128, a warp per "
                             f"32 channels), got {self}")
        if self.variant not in SCAN_VARIANTS:
            raise ValueError(f"ScanLaunchConfig.variant must be one of {SCAN_VARIANTS}, got {self.variant!r}")
        if self.segments > 1 and self.variant not in ("v2", "v3"):
            raise ValueError(f"ScanLaunchConfig: segments need the v2 or v3 kernels, got {self}")


# The kernels the default tiles run: v2 since the nineteenth session (one H100, same call, v1 -> v2: the Vim-S
# training step's scans 39.5 -> 30.0 ms of kernel time, fwd+bwd at L=197 / 1024 / 4096 2.055 -> 1.966, 1.524 -> 1.262,
# 6.075 -> 5.070 ms). v1 stays selectable (ScanLaunchConfig(variant="v1"), backend "triton_v1").
DEFAULT_VARIANT = "v2"

# One-warp block_d-16 backward programs resident per multiprocessor (about 230 registers per thread:
# 65536 / (256 * 32) = 8 after allocation rounding).
BWD_RESIDENT_PROGRAMS = 8


def default_launch_config(n_state_padded: int, length: int, backward: bool, rows: int | None = None,
                          multiprocessors: int | None = None, channel_last: bool = False) -> ScanLaunchConfig:
    """Tiles of the scan kernels, a saved state every 4 positions, tiles from the H200 sweeps of
    bench/scan.py (docs/kernels.md, 2026-11-22).

    Forward: 8 channels per warp (third sweep, forward alone: L=197 batch 128 0.39 vs 0.61 ms at block_d 16,
    L=1024 0.375 vs 0.423, L=4096 1.48 vs 1.71, L=50 0.116 vs 0.113, a tie). Backward: ``rows`` = batch * dim and
    ``multiprocessors`` (the device's count) decide. A grid of block_d-16 programs that fills the device several
    times over (more than multiprocessors x 8, the residency at ~230 registers) takes block_d 16 with the next
    chunk's inputs prefetched (batch 128: L=197 1.90 vs 2.17 ms fwd+bwd, L=50 equal); a smaller grid takes block_d
    8, twice the programs (batch 16: L=1024 1.49 vs 1.84 ms, L=4096 5.81 vs 7.24). No register cap: 168 / 200 lost
    or tied in that sweep. Without a device (the interpreter) the backward takes the large-grid tiles. The kernels
    are DEFAULT_VARIANT's: swept on v1, and the twentieth session's v2 sweep on an H100 found the same tiles best
    (docs/scan_kernels.md).

    For the (batch, dim, L) layout of mamba-ssm's callers (unit position strides; the launchers check, so a Vim
    block's channel-last tensors keep the plain kernels under the same config), from L = LAYOUT_IO_MIN_LENGTH: chunk
    tiles (``tile_io``) in the forward and in the backward of grids smaller than the device's residency, and the
    large-grid backward on channel-last copies (``transpose_io``). bench/scan_cross.py, one H100, twenty-third
    session, fwd+bwd ms: batch 128 L=197 1.766 with the tile forward vs 1.940 without (its forward alone 0.367 vs
    0.428), then 1.570 with the copied backward behind it (the tile backward: 1.775); batch 16 L=1024 1.193 vs 1.264
    with the tile backward (the copied one 1.322), L=4096 4.720 vs 5.063. ``channel_last`` (``is_channel_last``,
    a Vim block's u): the forward takes CHANNEL_LAST_FORWARD's tiles, the backward is unchanged."""
    chunk = min(4, next_power_of_2(length))
    if channel_last and not backward:
        variant, block_d = CHANNEL_LAST_FORWARD
        return ScanLaunchConfig(block_d=block_d, chunk=chunk, variant=variant)
    small_grid = rows is not None and multiprocessors is not None and (
        ceil_div(rows, 16) <= multiprocessors * BWD_RESIDENT_PROGRAMS)
    layout_io = length >= LAYOUT_IO_MIN_LENGTH
    if not backward or small_grid:
        return ScanLaunchConfig(block_d=8, chunk=chunk, variant=DEFAULT_VARIANT, tile_io=layout_io)
    return ScanLaunchConfig(block_d=16, chunk=chunk, prefetch=True, variant=DEFAULT_VARIANT, transpose_io=layout_io)


# The forward's (variant, block_d) on channel-last inputs, where a wider program reads whole sectors. One H100, a
# Vim-S step's scans (docs/scan_kernels.md, thirty-second and thirty-third sessions): v2 block_d 8 0.463 ms, v1 block_d
# 32 0.284, v2 block_d 32 0.256 without states kept; ties with v1 block_d 32 when training. The v2 backward follows.
CHANNEL_LAST_FORWARD = ("v2", 32)


# The shortest sequence whose default kernels read and write chunk tiles or run on channel-last copies. At L=50,
# batch 128 the step is bound by the host (0.41 ms of kernels, 0.8 ms wall in the twenty-third session's call), the
# tile forward's kernel gains 0.01 ms and a copy costs a launch: not worth it there.
LAYOUT_IO_MIN_LENGTH = 128


# Resident one-warp v3 programs per multiprocessor that a grid should reach before sequences are split
# (sm_90, offline: forward 128 registers per thread -> 16 warps; backward, Triton 3.6 after the thirteenth
# session's cut, 202-208 at chunk 2 -> 9, 255 at chunk 4 -> 8).
V3_RESIDENT_PROGRAMS = {False: 16, True: 8}
# A segment costs a summary pass over its inputs and a carry-in per later segment: keep them long.
MIN_SEGMENT_CHUNKS = 16


def default_segments(programs: int, n_chunks: int, backward: bool, multiprocessors: int | None) -> int:
    """Segments per sequence for a v3 grid of ``programs`` one-warp programs (kernels/triton_scan_segments.py):
    the fewest (a power of two) that fill ``multiprocessors`` x the resident programs, each segment at least
    MIN_SEGMENT_CHUNKS chunks. One without a device (the interpreter) and for grids that fill the device."""
    if multiprocessors is None:
        return 1
    segments = 1
    while (programs * segments < multiprocessors * V3_RESIDENT_PROGRAMS[backward]
           and n_chunks // (2 * segments) >= MIN_SEGMENT_CHUNKS):
        segments *= 2
    return segments


def dim_major(A: Any) -> Any:
    """A (dim, N) with its channels adjacent in memory (unit stride over dim), as the kernels read it
    (``channel_params``): a transposed copy of the contiguous parameter, or A itself when it already is."""
    return A if A.stride(0) == 1 else A.t().contiguous().t()


def position_major(B: Any, C: Any) -> tuple[Any, Any, tuple[int, int, int]]:
    """B and C, (batch, groups, N, L), with unit stride over N (one position's N values contiguous, as the v1 / v2
    kernels read them) and their shared (batch, group, position) strides. No copy when both already are and share
    strides: a Mamba block's B and C are slices of one x_proj output, (batch, L, dt_rank + 2N). Anything else is
    copied (one buffer when the dtypes match). (In mamba-ssm's (batch, N, L) layout the kernels ran 2x slower on the
    H100, eleventh session.) No views on the no-copy path: it runs three times per scan, and L=50 is host-bound."""
    b_strides = B.stride()
    if b_strides[2] != 1 or b_strides != C.stride():
        if B.dtype == C.dtype:  # both in one copy: one launch, and L=50 is bound by the host's time per torch call
            b_t, c_t = torch.stack((B.transpose(-1, -2), C.transpose(-1, -2))).unbind(0)
        else:
            b_t, c_t = B.transpose(-1, -2).contiguous(), C.transpose(-1, -2).contiguous()
        B, C = b_t.transpose(-1, -2), c_t.transpose(-1, -2)
        b_strides = B.stride()
    return B, C, (b_strides[0], b_strides[1], b_strides[3])


def is_channel_last(t: Any) -> bool:
    """Whether a (batch, dim, L) tensor is a channel-last view ((batch, L, dim) memory, dim > 1 and L > 1)."""
    batch, dim, length = t.shape
    return dim > 1 and length > 1 and t.stride() == (length * dim, 1, dim)


def is_sequence_layout(t: Any) -> bool:
    """Whether a (batch, dim, L) tensor is dense in a layout the v1 / v2 kernels read through strides: contiguous, or
    channel-last as a Vim block's projections make it (with one channel or one position, that is contiguous too)."""
    return t.is_contiguous() or is_channel_last(t) or t.numel() <= 1


def sequence_strides(u: Any, delta: Any, z: Any, dout: Any = None) -> tuple[int, ...]:
    """The v1 / v2 kernels' (batch, channel, position) strides of u / delta / out (and, backward, dout) and of z. u,
    delta and dout must share one layout (the launchers make out and the gradients in it; ``with_strides`` puts
    them there); z may be any strided view."""
    for name, t in (("delta", delta), ("dout", dout)):
        if t is not None and t.stride() != u.stride():
            raise ValueError(f"selective_scan: {name} must have u's strides {u.stride()}, got {t.stride()}")
    z_strides = z.stride() if z is not None else u.stride()
    return (*u.stride(), *z_strides)


def tile_io(config: ScanLaunchConfig, strides: tuple[int, ...]) -> bool:
    """Whether a v2 launch reads and writes chunk tiles (``ScanLaunchConfig.tile_io``): asked for, and the position
    strides of u / delta / out and of z (``sequence_strides``) are 1."""
    return config.tile_io and strides[2] == 1 and strides[5] == 1


def v4_warps(config: ScanLaunchConfig) -> int:
    """Warps of a v4 program: 4, fewer for spans too short to give each lane a position."""
    return max(1, min(4, config.block_l // 32))


def launch_options(config: ScanLaunchConfig) -> dict[str, Any]:
    """Triton launch keywords: one warp per program (v3: one per 32 channels), and the register cap when set."""
    if config.variant == "v3":
        warps = max(1, config.block_d // 32)
    elif config.variant == "v4":
        warps = v4_warps(config)
    else:
        warps = 1
    options: dict[str, Any] = {"num_warps": warps}
    if config.maxnreg is not None:
        options["maxnreg"] = config.maxnreg
    return options
