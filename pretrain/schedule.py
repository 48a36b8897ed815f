"""Optimizer parameter groups, LR scaling and the per-iteration warmup + cosine schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from common.optim import adamw
from pretrain.master_weights import MasterWeights


@dataclass(frozen=True)
class Schedule:
    """LR as a pure function of the optimizer step, so a resumed run needs no scheduler state."""

    lr: float
    min_lr: float
    warmup_steps: float
    total_steps: int

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        span = max(1.0, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def absolute_lr(blr: float, lr: float | None, effective_batch: int) -> float:
    """MAE's linear scaling rule: ``lr = blr * effective_batch / 256`` unless ``lr`` is given."""
    return float(lr) if lr is not None else blr * effective_batch / 256


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and no decay for 1-D params (norms, biases) and ``no_weight_decay()`` names."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, fused: bool,
                    masters: MasterWeights | None = None) -> torch.optim.Optimizer:
    """AdamW with MAE's betas (0.9, 0.95); fused kernels on CUDA (``common.optim.use_fused_adamw``). With
    ``masters`` (``--precision bf16_weights``) it steps their float32 copies of the model's bf16 weights."""
    groups = param_groups(model, weight_decay)
    if masters is not None:
        groups = masters.optimizer_groups(groups)
    return adamw(groups, lr, fused, betas=(0.9, 0.95))
