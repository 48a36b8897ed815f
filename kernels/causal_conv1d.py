"""Depthwise causal 1-D convolution for Mamba blocks.

Output position l sees inputs l-W+1..l only. The torch path pads on the left and runs one grouped
``F.conv1d`` (no extra outputs computed then cropped); on CUDA the ``causal_conv1d`` package is used
when it is installed.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "silu", "swish")


# A constant for torch.compile: dynamo skips importlib, so tracing the lookup on every call broke the graph
# at each conv of a compiled Vim on CUDA.
@torch.compiler.assume_constant_result
def causal_conv1d_available() -> bool:
    """Whether the optional ``causal_conv1d`` CUDA package can be imported."""
    return importlib.util.find_spec("causal_conv1d") is not None


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None) -> None:
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be (batch, dim, L), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"causal_conv1d: weight must be (dim={x.shape[1]}, width), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (x.shape[1],):
        raise ValueError(f"causal_conv1d: bias must be (dim={x.shape[1]},), got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation must be one of {ACTIVATIONS}, got {activation!r}")


def causal_conv1d_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """Explicit sum over the kernel taps; the definition the fast path is tested against."""
    _check(x, weight, bias, activation)
    width = weight.shape[1]
    length = x.shape[-1]
    padded = F.pad(x, (width - 1, 0))
    out = sum(padded[:, :, k : k + length] * weight[:, k, None] for k in range(width))
    if bias is not None:
        out = out + bias[:, None]
    return F.silu(out) if activation is not None else out


def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal depthwise conv: x (batch, dim, L), weight (dim, width), bias (dim,) -> (batch, dim, L).

    ``activation`` is None or "silu"/"swish". ``backend``: "torch", "causal_conv1d" (CUDA package),
    or "auto" (the package on CUDA when installed, torch otherwise).
    """
    _check(x, weight, bias, activation)
    if backend not in ("auto", "torch", "causal_conv1d"):
        raise ValueError(f"causal_conv1d: unknown backend {backend!r}")
    use_package = backend == "causal_conv1d" or (
        backend == "auto" and x.is_cuda and causal_conv1d_available()
    )
    if use_package:
        if not x.is_cuda:
            raise ValueError("causal_conv1d: the causal_conv1d backend needs CUDA tensors")
        from causal_conv1d import causal_conv1d_fn as package_fn

        return package_fn(x, weight, bias, activation)
    width = weight.shape[1]
    out = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out) if activation is not None else out
