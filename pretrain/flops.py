"""Model FLOPs per training image (measured with torch's FLOP counter) and model-FLOPs utilisation."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, without sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "RTX 4090": 165.0,
    "V100": 125.0,
}


def train_flops_per_image(mae: nn.Module, input_size: int, in_chans: int, mask_ratio: float,
                          device: torch.device) -> float | None:
    """3 x the counted forward FLOPs of one image (backward ~ 2 x forward); None when counting fails.

    Custom kernels (e.g. the selective scan) are not seen by the counter, so Vim figures are lower bounds.
    """
    x = torch.zeros(1, in_chans, input_size, input_size, device=device)
    gen = torch.Generator().manual_seed(0)
    was_training = mae.training
    try:
        mae.eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            mae(x, mask_ratio=mask_ratio, generator=gen)
        return 3.0 * float(counter.get_total_flops())
    except Exception:  # e.g. sharded parameters under ZeRO-3: MFU is then simply not reported
        return None
    finally:
        mae.train(was_training)


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of the device (None when unknown, e.g. on CPU)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None
