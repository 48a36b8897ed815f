"""AdamW as pretraining and fine-tuning build it: fused on CUDA where nothing else owns the optimizer step."""

from __future__ import annotations

from typing import Any

import torch


def use_fused_adamw(accelerator: Any) -> bool:
    """Fused AdamW (each parameter group in one kernel instead of a dozen foreach kernels; a small model's step is
    bound by its launches) on CUDA, unless DeepSpeed, which wraps the optimizer in its own engine, is in use."""
    return accelerator.device.type == "cuda" and accelerator.state.deepspeed_plugin is None


def adamw(param_groups: list[dict[str, Any]], lr: float, fused: bool,
          betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``, fused when asked (CUDA only)."""
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, **({"fused": True} if fused else {}))
