"""Triton helper and launch configuration of the seq2 scan kernels (kernels/triton_scan_seq.py)."""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl


@triton.jit
def softplus(x):
    """log(1 + exp(x)) without overflow for large x."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@dataclass(frozen=True)
class ScanLaunchConfig:
    """Tiles of the seq2 kernels (kernels/triton_scan_seq.py): one warp per program holding ``block_d`` <= 32
    channels (32 / block_d lanes per channel). The forward saves the state every ``chunk`` positions, so
    forward and backward configs must agree on ``chunk``.

    ``segments`` > 1 splits the sequence into that many runs of whole chunks scanned in parallel
    (a first pass sums each segment up as one linear step, the main pass folds the earlier segments'
    summaries into its entry state or adjoint), for long sequences with few (batch, channel) programs.
    It lost or tied on the H200 at every benchmarked shape, so the defaults never pick it.
    ``maxnreg`` caps registers per thread (more resident warps, at the price of some recomputation).
    ``prefetch`` (backward): load the next chunk's entry state, u, delta, dout and z before the current
    chunk's arithmetic (hides L2 latency; sm_90: 251 registers instead of 231, spills under a register cap).
    """

    block_d: int
    chunk: int
    segments: int = 1
    maxnreg: int | None = None
    prefetch: bool = False

    def __post_init__(self) -> None:
        for name in ("block_d", "chunk"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"ScanLaunchConfig.{name} must be a power of two, got {value}")
        if self.block_d > 32:
            raise ValueError(f"ScanLaunchConfig: one warp per program holds block_d <= 32 channels, got {self}")
        if self.segments < 1:
            raise ValueError(f"ScanLaunchConfig.segments must be >= 1, got {self}")


# One-warp block_d-16 seq2 backward programs resident per multiprocessor (about 230 registers per thread:
# 65536 / (256 * 32) = 8 after allocation rounding).
BWD_RESIDENT_PROGRAMS = 8


def default_launch_config(n_state_padded: int, length: int, backward: bool, rows: int | None = None,
                          multiprocessors: int | None = None) -> ScanLaunchConfig:
    """The seq2 kernels (kernels/triton_scan_seq.py), a saved state every 4 positions, tiles from the second
    H200 sweep of bench/scan.py (README, 2026-11-22).

    Forward: 16 channels per warp. Backward: ``rows`` = batch * dim and ``multiprocessors`` (the device's
    count) decide. A grid of block_d-16 programs that fills the device several times over (more than
    multiprocessors x 8, the residency at ~230 registers) takes block_d 16 with the next chunk's inputs
    prefetched (batch 128: L=197 1.90 vs 2.17 ms fwd+bwd, L=50 equal); a smaller grid takes block_d 8, twice
    the programs (batch 16: L=1024 1.49 vs 1.84 ms, L=4096 5.81 vs 7.24). No register cap: 168 / 200 lost or
    tied in that sweep. ``segments`` stays 1: splitting the sequence lost or tied at every shape of the first
    sweep. Without a device (the interpreter) the backward takes the large-grid tiles."""
    chunk = min(4, triton.next_power_of_2(length))
    if not backward:
        return ScanLaunchConfig(block_d=16, chunk=chunk)
    small_grid = (rows is not None and multiprocessors is not None
                  and triton.cdiv(rows, 16) <= multiprocessors * BWD_RESIDENT_PROGRAMS)
    if small_grid:
        return ScanLaunchConfig(block_d=8, chunk=chunk)
    return ScanLaunchConfig(block_d=16, chunk=chunk, prefetch=True)

