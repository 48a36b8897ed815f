"""Depthwise causal 1-D convolution for Mamba blocks.

Output position l sees inputs l-W+1..l only (``reverse=True``: l..l+W-1, the causal conv of the reversed
sequence, reversed back). The torch path pads one side and runs one grouped ``F.conv1d`` (no extra outputs
computed then cropped, no flipped copies of the sequence). On CUDA the default is the Triton kernel
(``kernels/triton_causal_conv1d.py``); the optional ``causal_conv1d`` package is used when asked for by name.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "silu", "swish")


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
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None,
    reverse: bool = False,
) -> torch.Tensor:
    """Explicit sum over the kernel taps; the definition the fast path is tested against. ``reverse``: tap k
    reads position l + (W-1-k) instead of l - (W-1-k)."""
    _check(x, weight, bias, activation)
    width = weight.shape[1]
    length = x.shape[-1]
    if reverse:
        padded = F.pad(x, (0, width - 1))
        out = sum(padded[:, :, width - 1 - k : width - 1 - k + length] * weight[:, k, None] for k in range(width))
    else:
        padded = F.pad(x, (width - 1, 0))
        out = sum(padded[:, :, k : k + length] * weight[:, k, None] for k in range(width))
    if bias is not None:
        out = out + bias[:, None]
    return F.silu(out) if activation is not None else out


def resolve_conv_backend(backend: str, is_cuda: bool) -> str:
    """The backend "auto" stands for: triton on CUDA, torch elsewhere; a named backend is returned as it is."""
    if backend not in ("auto", "torch", "causal_conv1d", "triton"):
        raise ValueError(f"causal_conv1d: unknown backend {backend!r}")
    if backend != "auto":
        return backend
    # Triton is the CUDA default, also over the package: it reads a channel-last x in place and has the anti-causal
    # mode, so a Vim block makes no layout copies around it (Vim-S MAE step on an H100: +26 % eager, +25 % compiled
    # against torch's depthwise conv, eighteenth session).
    return "triton" if is_cuda else "torch"


def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str = "auto",
    reverse: bool = False,
) -> torch.Tensor:
    """Causal depthwise conv: x (batch, dim, L), weight (dim, width), bias (dim,) -> (batch, dim, L).

    ``activation`` is None or "silu"/"swish". ``backend``: "torch", "causal_conv1d" (the optional CUDA package),
    "triton" (``kernels/triton_causal_conv1d.py``: CUDA, or CPU under ``TRITON_INTERPRET=1``), or "auto" (triton on
    CUDA, torch otherwise). ``reverse``: anti-causal (each output sees itself and the W-1 positions after it), for
    the backward direction of a bidirectional block.
    """
    _check(x, weight, bias, activation)
    backend = resolve_conv_backend(backend, x.is_cuda)
    if backend == "triton":
        from kernels.triton_causal_conv1d import causal_conv1d_triton

        return causal_conv1d_triton(x, weight, bias, activation, reverse)
    if backend == "causal_conv1d":
        if not x.is_cuda:
            raise ValueError("causal_conv1d: the causal_conv1d backend needs CUDA tensors")
        # Checked in eager code only: dynamo skips importlib, so tracing the lookup broke the graph at each conv
        # of a compiled Vim (without the package, tracing the import below fails and eager code reports it).
        if not torch.compiler.is_compiling() and not causal_conv1d_available():
            raise ValueError("causal_conv1d: the causal_conv1d backend needs the optional causal_conv1d package "
                             "(pip install causal-conv1d)")
        from causal_conv1d import causal_conv1d_fn as package_fn

        if reverse:  # the package has no anti-causal mode
            return package_fn(x.flip(-1), weight, bias, activation).flip(-1)
        return package_fn(x, weight, bias, activation)
    width = weight.shape[1]
    if reverse:
        # Right padding and the taps in the opposite order: output l = sum_j weight[W-1-j] * x[l + j].
        out = F.conv1d(F.pad(x, (0, width - 1)), weight.flip(-1).unsqueeze(1), bias, groups=x.shape[1])
    else:
        out = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out) if activation is not None else out
