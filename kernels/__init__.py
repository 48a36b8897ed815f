"""Selective scan (Triton / chunked torch / reference / mamba-ssm) and causal depthwise conv1d."""

from kernels.causal_conv1d import causal_conv1d_fn, causal_conv1d_ref
from kernels.selective_scan_chunked import selective_scan_chunked
from kernels.selective_scan_interface import BACKENDS, resolve_backend, selective_scan_fn
from kernels.selective_scan_ref import selective_scan_ref

__all__ = [
    "BACKENDS",
    "causal_conv1d_fn",
    "causal_conv1d_ref",
    "resolve_backend",
    "selective_scan_chunked",
    "selective_scan_fn",
    "selective_scan_ref",
]
