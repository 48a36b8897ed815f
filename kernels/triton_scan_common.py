"""Triton helpers and launch configuration shared by the forward and backward scan kernels."""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl


@triton.jit
def linear_recurrence_combine(a_left, b_left, a_right, b_right):
    """Compose two steps x -> a*x + b: first (a_left, b_left), then (a_right, b_right)."""
    return a_left * a_right, b_left * a_right + b_right


@triton.jit
def softplus(x):
    """log(1 + exp(x)) without overflow for large x."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def column(tile, offs_t, index):
    """tile[:, :, index] of a (BLOCK_D, N, CHUNK) register tile (a masked reduction: no dynamic indexing)."""
    return tl.sum(tl.where(offs_t[None, None, :] == index, tile, 0.0), axis=2)


@dataclass(frozen=True)
class ScanLaunchConfig:
    """Tile sizes: BLOCK_D channels x N_PAD states x CHUNK positions per step of the sequential loop."""

    block_d: int
    chunk: int
    num_warps: int
    # Forward only: walk positions one by one, one channel per thread (block_d is then 32 * num_warps).
    sequential: bool = False

    def __post_init__(self) -> None:
        for name in ("block_d", "chunk"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"ScanLaunchConfig.{name} must be a power of two, got {value}")


def default_launch_config(n_state_padded: int, length: int, backward: bool) -> ScanLaunchConfig:
    """Defaults from the H200 sweep in bench/scan.py (docs/sections/kernels.md).

    Forward: the sequential kernel, one warp (32 channels) per program. Backward: chunk-scan tiles of
    about 1K fp32 elements, 4 warps; chunks of 16 positions for short sequences, 32 for long ones.
    """
    chunk = 16 if length <= 256 else 32
    chunk = min(chunk, triton.next_power_of_2(length))
    if not backward:
        return ScanLaunchConfig(block_d=32, chunk=chunk, num_warps=1, sequential=True)
    block_d = max(1, min(64, 1024 // (n_state_padded * chunk)))
    return ScanLaunchConfig(block_d=block_d, chunk=chunk, num_warps=4)
