"""Triton helpers and launch configuration shared by the scan kernels (kernels/triton_scan_fwd.py, _bwd.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import triton
import triton.language as tl


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


@triton.jit
def channel_params(A_T, D, DELTA_BIAS, dim, offs_n, offs_d, nd_mask, d_mask, BLOCK_D: tl.constexpr,
                   HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The block's A * log2(e) as an (N, BLOCK_D) tile from A transposed to (N, dim) (each decay is then one
    exp2), and its D and delta_bias (zeros when absent)."""
    A2 = tl.load(A_T + offs_n[:, None] * dim + offs_d[None, :], mask=nd_mask, other=0.0) * 1.4426950408889634
    D_vec = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        D_vec = tl.load(D + offs_d, mask=d_mask, other=0.0)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(DELTA_BIAS + offs_d, mask=d_mask, other=0.0)
    return A2, D_vec, bias


@triton.jit
def chunk_position(base, s, CHUNK: tl.constexpr, REVERSE: tl.constexpr):
    """Position of the s-th step of the chunk starting at ``base``, in scan order."""
    if REVERSE:
        return base + (CHUNK - 1 - s)
    else:
        return base + s


@triton.jit
def backward_start(DLAST, row, n_state, offs_n, nd_mask, n_chunks, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                   HAS_DLAST: tl.constexpr, REVERSE: tl.constexpr):
    """A backward program's starting point: the adjoint of the state after the last position (the last state's
    incoming gradient, or zeros), zeroed dA / dD / ddelta_bias accumulators, and the first chunk and the step of
    its walk (the opposite of the scan order)."""
    g = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    if HAS_DLAST:
        g = tl.load(DLAST + row[None, :] * n_state + offs_n[:, None], mask=nd_mask, other=0.0)
    dA_acc = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if REVERSE:
        chunk_idx = 0 * n_chunks
        chunk_step = 1
    else:
        chunk_idx = n_chunks - 1
        chunk_step = -1
    return g, dA_acc, dD_acc, dbias_acc, chunk_idx, chunk_step


@triton.jit
def backward_finish(DA, DD, DDELTA_BIAS, dA_acc, dD_acc, dbias_acc, offs_d, offs_n, n_state, d_mask, nd_mask,
                    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Add a program's dA, dD and ddelta_bias sums (over its positions) into the float32 outputs."""
    tl.atomic_add(DA + offs_d[None, :] * n_state + offs_n[:, None], dA_acc, mask=nd_mask, sem="relaxed")
    if HAS_D:
        tl.atomic_add(DD + offs_d, dD_acc, mask=d_mask, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(DDELTA_BIAS + offs_d, dbias_acc, mask=d_mask, sem="relaxed")


SCAN_VARIANTS = ("v1", "v2", "v3")


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
    "v3" those of kernels/triton_scan_fwd3.py / _bwd3.py (one lane per channel with all its N states, positions
    read and written a chunk at a time; block_d = 32 per warp).
    """

    block_d: int
    chunk: int
    maxnreg: int | None = None
    prefetch: bool = False
    variant: str = "v1"

    def __post_init__(self) -> None:
        for name in ("block_d", "chunk"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"ScanLaunchConfig.{name} must be a power of two, got {value}")
        if self.block_d > (128 if self.variant == "v3" else 32):
            raise ValueError(f"ScanLaunchConfig: block_d is at most 32 (one warp per program; v3: 128, a warp per "
                             f"32 channels), got {self}")
        if self.variant not in SCAN_VARIANTS:
            raise ValueError(f"ScanLaunchConfig.variant must be one of {SCAN_VARIANTS}, got {self.variant!r}")


# One-warp block_d-16 backward programs resident per multiprocessor (about 230 registers per thread:
# 65536 / (256 * 32) = 8 after allocation rounding).
BWD_RESIDENT_PROGRAMS = 8


def default_launch_config(n_state_padded: int, length: int, backward: bool, rows: int | None = None,
                          multiprocessors: int | None = None) -> ScanLaunchConfig:
    """Tiles of the scan kernels, a saved state every 4 positions, tiles from the H200 sweeps of
    bench/scan.py (README, 2026-11-22).

    Forward: 8 channels per warp (third sweep, forward alone: L=197 batch 128 0.39 vs 0.61 ms at block_d 16,
    L=1024 0.375 vs 0.423, L=4096 1.48 vs 1.71, L=50 0.116 vs 0.113, a tie). Backward: ``rows`` = batch * dim and ``multiprocessors`` (the device's
    count) decide. A grid of block_d-16 programs that fills the device several times over (more than
    multiprocessors x 8, the residency at ~230 registers) takes block_d 16 with the next chunk's inputs
    prefetched (batch 128: L=197 1.90 vs 2.17 ms fwd+bwd, L=50 equal); a smaller grid takes block_d 8, twice
    the programs (batch 16: L=1024 1.49 vs 1.84 ms, L=4096 5.81 vs 7.24). No register cap: 168 / 200 lost or
    tied in that sweep. Without a device (the interpreter) the backward takes the large-grid tiles."""
    chunk = min(4, triton.next_power_of_2(length))
    if not backward:
        return ScanLaunchConfig(block_d=8, chunk=chunk)
    small_grid = (rows is not None and multiprocessors is not None
                  and triton.cdiv(rows, 16) <= multiprocessors * BWD_RESIDENT_PROGRAMS)
    if small_grid:
        return ScanLaunchConfig(block_d=8, chunk=chunk)
    return ScanLaunchConfig(block_d=16, chunk=chunk, prefetch=True)



def launch_options(config: ScanLaunchConfig) -> dict[str, Any]:
    """Triton launch keywords: one warp per program (v3: one per 32 channels), and the register cap when set."""
    options: dict[str, Any] = {"num_warps": max(1, config.block_d // 32) if config.variant == "v3" else 1}
    if config.maxnreg is not None:
        options["maxnreg"] = config.maxnreg
    return options
