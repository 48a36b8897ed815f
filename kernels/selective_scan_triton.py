"""Triton backend of the selective scan: the autograd.Function around the fused kernels."""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
from torch.autograd.function import once_differentiable

from kernels.triton_scan_bwd import selective_scan_bwd_launch
from kernels.triton_scan_common import ScanLaunchConfig, default_launch_config
from kernels.triton_scan_fwd import selective_scan_fwd_launch


def _as_grouped(bc: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, N, L) or (batch, g, N, L) -> contiguous (batch, groups, N, L); differentiable (torch ops)."""
    if bc.dim() == 3:
        bc = bc.unsqueeze(1)
    if bc.shape[1] != groups:
        bc = bc.repeat_interleave(groups // bc.shape[1], dim=1)
    return bc.contiguous()


def _optional_contiguous(t: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    if t is None:
        return None
    return (t.to(dtype) if dtype is not None else t).contiguous()


class SelectiveScanTritonFn(torch.autograd.Function):
    """Forward and backward through the fused Triton kernels; saves inputs plus per-chunk states."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, fwd_config, bwd_config):
        needs_grad = any(ctx.needs_input_grad[:8])
        out, last_state, chunk_states = selective_scan_fwd_launch(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, needs_grad, fwd_config
        )
        if needs_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, chunk_states)
        ctx.delta_softplus = delta_softplus
        ctx.reverse = reverse
        ctx.bwd_config = bwd_config
        ctx.set_materialize_grads(False)
        return out, last_state

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, chunk_states = ctx.saved_tensors
        dout = torch.zeros_like(u) if dout is None else dout.contiguous()
        dlast = None if dlast is None else dlast.to(torch.float32).contiguous()
        grads = selective_scan_bwd_launch(
            u, delta, A, B, C, D, z, delta_bias, dout, chunk_states, dlast,
            ctx.delta_softplus, ctx.reverse, ctx.bwd_config,
        )
        dD = grads["D"].to(D.dtype) if D is not None else None
        dbias = grads["delta_bias"].to(delta_bias.dtype) if delta_bias is not None else None
        return (
            grads["u"], grads["delta"], grads["A"].to(A.dtype), grads["B"].to(B.dtype), grads["C"].to(C.dtype),
            dD, grads["z"], dbias, None, None, None, None,
        )


def launch_configs(
    n_state: int, length: int, fwd_config: ScanLaunchConfig | None, bwd_config: ScanLaunchConfig | None,
    rows: int | None = None, multiprocessors: int | None = None,
) -> tuple[ScanLaunchConfig, ScanLaunchConfig]:
    """Fill in default tile configs (``rows`` = batch * dim and the device's ``multiprocessors`` pick the
    backward's tiles); the backward must use the forward's chunk length."""
    n_pad = triton.next_power_of_2(n_state)
    fwd = fwd_config or default_launch_config(n_pad, length, backward=False, rows=rows,
                                              multiprocessors=multiprocessors)
    bwd = bwd_config or default_launch_config(n_pad, length, backward=True, rows=rows,
                                              multiprocessors=multiprocessors)
    if bwd.chunk != fwd.chunk:
        if bwd_config is not None:
            raise ValueError(f"selective_scan: backward chunk {bwd.chunk} must equal forward chunk {fwd.chunk}")
        bwd = dataclasses.replace(bwd, chunk=fwd.chunk)
    return fwd, bwd


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    reverse: bool = False,
    fwd_config: ScanLaunchConfig | None = None,
    bwd_config: ScanLaunchConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan through the fused Triton kernels (inputs already validated by the caller).

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``. ``fwd_config`` /
    ``bwd_config`` override the tile sizes (benchmarks and tuning).
    """
    groups_b = 1 if B.dim() == 3 else B.shape[1]
    groups_c = 1 if C.dim() == 3 else C.shape[1]
    groups = math.lcm(groups_b, groups_c)
    # The backward's tiles depend on how many programs fit on the device at once (None under the interpreter).
    sms = torch.cuda.get_device_properties(u.device).multi_processor_count if u.is_cuda else None
    fwd, bwd = launch_configs(A.shape[1], u.shape[-1], fwd_config, bwd_config, rows=u.shape[0] * u.shape[1],
                              multiprocessors=sms)
    out, last_state = SelectiveScanTritonFn.apply(
        u.contiguous(), delta.contiguous(), A.to(torch.float32).contiguous(),
        _as_grouped(B, groups), _as_grouped(C, groups),
        _optional_contiguous(D, torch.float32), _optional_contiguous(z),
        _optional_contiguous(delta_bias, torch.float32),
        delta_softplus, reverse, fwd, bwd,
    )
    return (out, last_state) if return_last_state else out
