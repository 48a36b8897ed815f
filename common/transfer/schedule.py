"""Per-iteration learning-rate schedule: linear warmup then half-cosine decay (MAE's recipe)."""

from __future__ import annotations

import math

import torch


def effective_lr(blr: float, lr: float | None, batch_size: int, accum_iter: int, world_size: int) -> float:
    """Absolute LR: ``lr`` if given, else ``blr * effective batch / 256`` (the MAE linear scaling rule)."""
    if lr is not None:
        return float(lr)
    return float(blr) * batch_size * accum_iter * world_size / 256.0


def lr_at(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """LR at fractional ``epoch`` (e.g. 3.25 = a quarter through the fourth epoch)."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    progress = min(max((epoch - warmup_epochs) / span, 0.0), 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_schedule(optimizer: torch.optim.Optimizer, epoch: float, base_lr: float, min_lr: float,
                   warmup_epochs: float, epochs: float) -> float:
    """Set each group's LR for fractional ``epoch``; returns the LR of an unscaled group.

    A group may carry its own ``peak_lr`` (a head of an LR grid) and an ``lr_scale`` (layer-wise decay).
    """
    for group in optimizer.param_groups:
        peak = group.get("peak_lr", base_lr)
        group["lr"] = lr_at(epoch, peak, min_lr, warmup_epochs, epochs) * group.get("lr_scale", 1.0)
    return lr_at(epoch, base_lr, min_lr, warmup_epochs, epochs)
