"""Reconstruction grid: one row per image, columns original | masked | reconstruction | recon + visible."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from common.io import atomic_write

GAP = 2
MIN_TILE = 96


def _denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


@torch.no_grad()
def reconstruction_panels(mae: nn.Module, images: torch.Tensor, mask_ratio: float,
                          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(original, reconstruction) in normalised units and the pixel mask (1 = masked)."""
    was_training = mae.training
    mae.eval()
    try:
        _, pred, mask = mae(images, mask_ratio=mask_ratio, generator=generator)
    finally:
        mae.train(was_training)
    pred = pred.float()
    if getattr(mae, "norm_pix_loss", False):  # predictions are per-patch standardised: undo with the targets'
        target = mae.patchify(images.float())
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    recon = mae.unpatchify(pred)
    patch_area = mae.patch_size ** 2 * images.shape[1]
    mask_img = mae.unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, patch_area))
    return images.float(), recon, mask_img


def save_reconstruction_grid(mae: nn.Module, images: torch.Tensor, mask_ratio: float, mean: Sequence[float],
                             std: Sequence[float], path: str | Path, seed: int = 0) -> Path:
    """Write the grid PNG (gray for 1 channel, RGB for 3, first channel otherwise) atomically."""
    original, recon, mask_img = reconstruction_panels(mae, images, mask_ratio, torch.Generator().manual_seed(seed))
    original, recon = _denormalize(original, mean, std), _denormalize(recon, mean, std)
    masked = original * (1 - mask_img) + 0.5 * mask_img  # removed patches shown mid-gray
    pasted = original * (1 - mask_img) + recon * mask_img
    n, c, h, w = original.shape
    scale = max(1, -(-MIN_TILE // max(h, w)))
    cols = [original, masked, recon, pasted]
    th, tw = h * scale, w * scale
    channels = 3 if c == 3 else 1
    grid = np.full((n * (th + GAP) + GAP, len(cols) * (tw + GAP) + GAP, channels), 255, dtype=np.uint8)
    for i in range(n):
        for j, col in enumerate(cols):
            tile = col[i, :channels] if c in (1, 3) else col[i, :1]
            tile = tile.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
            arr = (tile.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)  # bf16 under autocast
            y, x = GAP + i * (th + GAP), GAP + j * (tw + GAP)
            grid[y:y + th, x:x + tw] = arr
    img = Image.fromarray(grid[:, :, 0] if channels == 1 else grid)
    return atomic_write(path, lambda p: img.save(p, format="PNG"))
