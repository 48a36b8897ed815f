"""Putting a tensor into given strides, shared by the scan's launch path and the Vim block (no Triton import)."""

from __future__ import annotations

import torch


def with_strides(t: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor:
    """``t`` laid out with ``strides`` (dense ones for its shape): itself when it has them, else one copy
    (differentiable)."""
    if t.stride() == strides:
        return t
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)
