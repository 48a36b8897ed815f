"""Deferred step checks: the loss stays on the device and is read back only at check steps.

Reading the loss every micro-batch (``.item()``) and asking every rank about the preemption flag every step
made the host wait for the GPU (and for an all-reduce) twice per step. Here each step only adds its loss to
device tensors, recording the first non-finite step; ``check`` then answers, for all ranks, in ONE collective and
one host sync: the window's mean loss, the first non-finite step (with its loss) and whether any rank was asked
to stop. The loop calls it every ``log_every`` steps and before anything is saved or drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator

_FIELDS = 4  # loss sum, first bad step, its loss, preemption flag


@dataclass(frozen=True)
class CheckResult:
    loss: float  # mean step loss of the window, averaged over ranks (nan for an empty window)
    first_bad_step: int  # 1-based optimizer step of the first non-finite loss on any rank; 0 when none
    first_bad_loss: float  # that loss (nan or +-inf)
    preempt: bool  # some rank received a stop signal


class StepHealth:
    """Device-side loss bookkeeping for one run; ``add`` never synchronises, ``check`` does once."""

    def __init__(self, device: torch.device):
        self.device = device
        self.first_bad = torch.zeros((), dtype=torch.float64, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.reset_window()

    def reset_window(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.steps = 0

    def add(self, step: int, loss: torch.Tensor) -> None:
        """Record the loss of optimizer step ``step`` (1-based), a 0-dim device tensor."""
        loss = loss.detach().to(torch.float64)
        self.loss_sum += loss
        self.steps += 1
        new_bad = (self.first_bad == 0) & ~torch.isfinite(loss)
        self.first_bad = torch.where(new_bad, float(step), self.first_bad)
        self.bad_loss = torch.where(new_bad, loss, self.bad_loss)

    def check(self, accelerator: Accelerator, preempt: bool) -> CheckResult:
        """The state of all ranks; every rank must call it at the same steps (it is a collective)."""
        flag = torch.full((), 1.0 if preempt else 0.0, dtype=torch.float64, device=self.device)
        local = torch.stack([self.loss_sum, self.first_bad, self.bad_loss, flag])[None]
        rows = accelerator.gather(local) if accelerator.num_processes > 1 else local
        rows = rows.reshape(-1, _FIELDS).cpu().tolist()  # the host waits here, once per check
        bad = [(r[1], r[2]) for r in rows if r[1] > 0]
        first_step, first_loss = min(bad) if bad else (0.0, math.nan)
        loss = sum(r[0] for r in rows) / (len(rows) * self.steps) if self.steps else math.nan
        return CheckResult(loss=loss, first_bad_step=int(first_step), first_bad_loss=first_loss,
                           preempt=any(r[3] > 0 for r in rows))
