"""Autocast for forward passes when DeepSpeed keeps the model weights in 16 bits.

For single-process and DDP runs accelerate wraps the model's ``forward`` in ``torch.autocast``. Under DeepSpeed
it does not: the engine casts the weights to bf16/fp16 (the float32 master copies live in the ZeRO optimizer)
and leaves the inputs alone, so the float32 batch from ``gpu_augment`` would meet bf16 weights in the patch
embedding convolution ("Input type (float) and bias type (BFloat16) should be the same"). Running the forward
under autocast casts inputs per operation and keeps LayerNorm, softmax and the loss in float32, as on the DDP path.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator


def deepspeed_half_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """bf16 / fp16 when a DeepSpeed config with that precision enabled drives the run, else None."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return None
    config = plugin.deepspeed_config
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if str(config.get(key, {}).get("enabled", False)).lower() == "true":
            return dtype
    return None


def deepspeed_autocast(accelerator: Accelerator) -> contextlib.AbstractContextManager:
    """Autocast for a forward pass of the prepared model: needed under DeepSpeed only (accelerate already wraps
    the forward of single-process and DDP models), a no-op otherwise."""
    dtype = deepspeed_half_dtype(accelerator)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=accelerator.device.type, dtype=dtype)


def forward_autocast(accelerator: Accelerator) -> contextlib.AbstractContextManager:
    """Autocast for a forward pass of the unwrapped model (e.g. the reconstruction grid)."""
    if deepspeed_half_dtype(accelerator) is not None:
        return deepspeed_autocast(accelerator)
    return accelerator.autocast()
