"""Shared pieces of the selective-state-space (Mamba) layers: initialisation and float32 SSM parameters.

Why float32: ``A_log``, ``D`` and the ``dt`` bias feed ``exp`` / ``softplus`` inside the scan; in bf16
or fp16 they lose enough precision to drive the recurrence unstable (the NaN reports of Vim and mamba
users). They are marked with ``_keep_fp32`` and ``KeepSSMParamsFp32`` keeps them float32 even when the
whole model is cast (``model.bfloat16()``, as DeepSpeed does). The scan itself runs with autocast off.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def mark_ssm_param(param: nn.Parameter) -> nn.Parameter:
    """Flag an SSM parameter: no weight decay, kept float32 under model-wide casts."""
    param._no_weight_decay = True
    param._keep_fp32 = True
    return param


def init_a_log(d_inner: int, d_state: int, copies: int = 1) -> nn.Parameter:
    """S4D-real initialisation ``A = -[1..N]`` stored as ``log``; ``copies`` stacked along dim 0."""
    a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner * copies, 1)
    return mark_ssm_param(nn.Parameter(torch.log(a)))


def init_d(d_inner: int, copies: int = 1) -> nn.Parameter:
    return mark_ssm_param(nn.Parameter(torch.ones(d_inner * copies)))


def dt_bias_init(d_inner: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4,
                 copies: int = 1) -> torch.Tensor:
    """Bias whose softplus is log-uniform in [dt_min, dt_max] (inverse softplus of a sampled dt)."""
    dt = torch.exp(torch.rand(copies * d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


def dt_weight_init_(weight: torch.Tensor, dt_rank: int, scale: float = 1.0) -> torch.Tensor:
    bound = dt_rank ** -0.5 * scale
    return nn.init.uniform_(weight, -bound, bound)


def resolve_dt_rank(dt_rank: int | str, d_model: int) -> int:
    if dt_rank == "auto":
        return math.ceil(d_model / 16)
    return int(dt_rank)


class KeepSSMParamsFp32(nn.Module):
    """Module whose ``_keep_fp32`` parameters (and their grads) survive dtype casts as float32.

    Device moves still apply; only a floating-point dtype change away from float32 is refused, and the
    original float32 values are kept rather than a rounded copy.
    """

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        keep: set[int] = set()
        for p in self.parameters():
            if getattr(p, "_keep_fp32", False) and p.dtype == torch.float32:
                keep.add(id(p))
                if p.grad is not None:
                    keep.add(id(p.grad))
        if not keep:
            return super()._apply(fn, recurse)

        def guarded(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if id(t) in keep and out.is_floating_point() and out.dtype != torch.float32:
                return t.to(device=out.device)
            return out

        return super()._apply(guarded, recurse)
