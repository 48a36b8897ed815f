"""The training and evaluation loops shared by linprobe and finetune (accelerate-aware)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from common.logging import progress
from common.transfer.schedule import apply_schedule


@dataclass
class LrSchedule:
    base_lr: float
    min_lr: float
    warmup_epochs: float
    epochs: float


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def train_one_epoch(model: nn.Module, loader: Iterable[Any], optimizer: torch.optim.Optimizer,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], accelerator: Accelerator,
                    epoch: int, schedule: LrSchedule, accum_iter: int = 1, clip_grad: float | None = None,
                    batch_transform: BatchTransform | None = None,
                    after_step: Callable[[], None] | None = None, desc: str = "train") -> dict[str, float]:
    """One pass over ``loader`` (batches of ``(images, targets)``); returns mean loss and last LR.

    The LR is set per optimizer step from the fractional epoch; gradients are accumulated over
    ``accum_iter`` batches (without DDP synchronisation in between); ``after_step`` runs after every
    optimizer step (EMA update).
    """
    model.train()
    steps = len(loader)  # type: ignore[arg-type]
    if steps == 0:
        raise ValueError("the training loader yields no batch (dataset smaller than one batch?)")
    total, count, lr = 0.0, 0, 0.0
    optimizer.zero_grad(set_to_none=True)
    bar = progress(loader, total=steps, desc=f"{desc} epoch {epoch}", leave=False)
    for i, (images, targets) in enumerate(bar):
        if i % accum_iter == 0:
            lr = apply_schedule(optimizer, epoch + i / steps, schedule.base_lr, schedule.min_lr,
                                schedule.warmup_epochs, schedule.epochs)
        images = images.to(accelerator.device, non_blocking=True)
        targets = targets.to(accelerator.device, non_blocking=True)
        if batch_transform is not None:
            images, targets = batch_transform(images, targets)
        sync = (i + 1) % accum_iter == 0 or i + 1 == steps
        with accelerator.no_sync(model) if not sync else contextlib.nullcontext(), accelerator.autocast():
            loss = loss_fn(model(images), targets)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLossError(f"loss is {value} at epoch {epoch}, step {i}: stopping "
                                         "(lower the LR or check the inputs)")
            accelerator.backward(loss / accum_iter)
        if sync:
            if clip_grad is not None:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
        total += value
        count += 1
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
    return {"loss": total / count, "lr": lr}


def gather_strided(accelerator: Accelerator, local: np.ndarray, sharded: bool) -> np.ndarray:
    """Reassemble an array evaluated as ``rank::world_size`` shards into dataset order."""
    world = accelerator.num_processes
    if not sharded or world == 1:
        return local
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, local)
    n = sum(len(p) for p in parts)
    out = np.empty((n,) + local.shape[1:], dtype=local.dtype)
    for rank, part in enumerate(parts):
        out[rank::world] = part
    return out


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[Any], accelerator: Accelerator, multilabel: bool,
            sharded: bool = False, desc: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """(scores, targets) over ``loader``: softmax probabilities, or sigmoids for multi-label.

    Runs the unwrapped module: a DDP wrapper would broadcast buffers on every forward, a collective that
    deadlocks when the evaluation shards of the processes differ in batch count.
    """
    model = accelerator.unwrap_model(model)
    model.eval()
    scores, targets = [], []
    for images, target in progress(loader, desc=desc, leave=False):
        with accelerator.autocast():
            logits = model(images.to(accelerator.device, non_blocking=True)).float()
        scores.append((torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=-1)).cpu().numpy())
        targets.append(target.numpy())
    if not scores:
        raise ValueError(f"{desc}: the evaluation loader yields no batch")
    return (gather_strided(accelerator, np.concatenate(scores), sharded),
            gather_strided(accelerator, np.concatenate(targets), sharded))


def mean_log_loss(scores: np.ndarray, targets: np.ndarray, multilabel: bool) -> float:
    """Cross-entropy (or binary cross-entropy per label) of probability ``scores``."""
    eps = 1e-7
    p = np.clip(scores.astype(np.float64), eps, 1 - eps)
    if multilabel:
        t = targets.astype(np.float64)
        return float(-(t * np.log(p) + (1 - t) * np.log(1 - p)).mean())
    return float(-np.log(p[np.arange(len(targets)), targets.astype(np.int64)]).mean())
