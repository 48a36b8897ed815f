"""Input precision when DeepSpeed keeps the model weights in 16 bits.

For single-process and DDP runs accelerate wraps the model's ``forward`` in ``torch.autocast``. Under DeepSpeed
it does not: with ``bf16``/``fp16`` enabled the engine casts the weights to 16 bits (the float32 master copies live
in the ZeRO optimizer) and leaves the inputs alone, so the float32 batch from ``gpu_augment`` would meet bf16
weights in the patch embedding ("Input type (float) and bias type (BFloat16) should be the same"). An outer
``torch.autocast`` does not help: the engine switches CUDA autocast off around the module unless its own
``torch_autocast`` section is enabled. So the MAE wrapper (models/mae.py) casts the encoder's input to the
weights' dtype and the model runs in 16 bits, which is DeepSpeed's bf16/fp16 mode; the reconstruction target and
the loss stay in float32, computed from the float32 batch.
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


def forward_autocast(accelerator: Accelerator) -> contextlib.AbstractContextManager:
    """Autocast for a forward pass of the unwrapped model outside the engine (e.g. the reconstruction grid)."""
    dtype = deepspeed_half_dtype(accelerator)
    if dtype is not None:
        return torch.autocast(device_type=accelerator.device.type, dtype=dtype)
    return accelerator.autocast()


BF16_WEIGHTS = "bf16_weights"  # the model in bf16, float32 masters in the optimizer (pretrain/master_weights.py)
PRECISIONS = ("auto", "bf16", "fp16", "no", BF16_WEIGHTS)
