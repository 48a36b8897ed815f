"""LARS: SGD with momentum whose step for each weight matrix is rescaled by a layer-wise trust ratio.

Used for linear probing (as in MAE / MoCo v3): with a BatchNorm in front of the linear head, LARS makes the
probe insensitive to the feature scale. Biases and other 1-D parameters take plain momentum-SGD steps
without weight decay or rescaling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class LARS(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Any], lr: float = 0.0, weight_decay: float = 0.0,
                 momentum: float = 0.9, trust_coefficient: float = 0.001):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(f"invalid LARS settings: lr={lr}, weight_decay={weight_decay}, "
                             f"momentum={momentum}, trust_coefficient={trust_coefficient}")
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                    "trust_coefficient": trust_coefficient}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:  # weight matrices: decay and trust-ratio scaling
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    ratio = torch.where((w_norm > 0) & (u_norm > 0),
                                        group["trust_coefficient"] * w_norm / u_norm.clamp_min(1e-30),
                                        torch.ones_like(w_norm))
                    update = update.mul(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss
