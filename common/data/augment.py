"""Batched augmentation on the training device, from uint8 letterboxed batches.

``gpu_augment`` = RandomResizedCrop (torchvision's sampling rule: area scale, log-uniform aspect ratio,
10 tries then a centre crop) + horizontal flip + optional brightness/contrast jitter + normalisation,
done for the whole batch by one fused Triton kernel on CUDA (kernels/triton_resample.py), else by
``affine_grid``/``grid_sample``. Crop boxes stay inside each image's valid
region (``size``), so letterbox padding is never sampled. Random numbers come from a CPU generator passed
in by the caller: the result is then identical on any device and a resumed run can recreate it.

``eval_transform`` = resize the shorter side to ``out / crop_pct`` and centre-crop ``out`` (MAE's eval
transform), expressed as one centre box per image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = 0.449, 0.226  # channel average of the ImageNet statistics


def default_normalization(in_chans: int) -> tuple[list[float], list[float]]:
    """ImageNet mean/std for 3 channels, their channel average repeated for any other count."""
    if in_chans == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [GRAY_MEAN] * in_chans, [GRAY_STD] * in_chans


def _sample_boxes(sizes: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float],
                  generator: torch.Generator | None, tries: int = 10) -> torch.Tensor:
    """(B, 4) boxes (y0, x0, h, w) in pixels of each image's valid region, torchvision's RRC rule."""
    b = sizes.shape[0]
    h = sizes[:, 0:1].double()
    w = sizes[:, 1:2].double()
    area = h * w
    u = torch.rand((b, tries, 4), generator=generator, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    y0 = torch.floor(u[..., 2] * (h - ch + 1))
    x0 = torch.floor(u[..., 3] * (w - cw + 1))
    first = torch.argmax(ok.to(torch.int8), dim=1)  # first valid try (0 when none is valid)
    pick = lambda t: t.gather(1, first[:, None])[:, 0]  # noqa: E731
    boxes = torch.stack([pick(y0), pick(x0), pick(ch), pick(cw)], dim=1)
    # fallback: centre crop with the aspect ratio clamped into range
    none_ok = ~ok.any(dim=1)
    if none_ok.any():
        hh, ww = h[:, 0], w[:, 0]
        in_ratio = ww / hh
        fw = torch.where(in_ratio < ratio[0], ww, torch.where(in_ratio > ratio[1], torch.round(hh * ratio[1]), ww))
        fh = torch.where(in_ratio < ratio[0], torch.round(ww / ratio[0]), hh)
        fallback = torch.stack([torch.floor((hh - fh) / 2), torch.floor((ww - fw) / 2), fh, fw], dim=1)
        boxes = torch.where(none_ok[:, None], fallback, boxes)
    return boxes


def _theta(boxes: torch.Tensor, flip: torch.Tensor, canvas_hw: tuple[int, int]) -> torch.Tensor:
    """(B, 6) float32 affine rows mapping the output grid onto ``boxes`` (pixels) of the canvas, mirrored where ``flip``."""
    hc, wc = canvas_hw
    y0, x0, h, w = boxes.to(torch.float32).unbind(1)
    sx = torch.where(flip, -(w / wc), w / wc)
    sy = h / hc
    tx = (2 * x0 + w) / wc - 1
    ty = (2 * y0 + h) / hc - 1
    zeros = torch.zeros_like(sx)
    return torch.stack([sx, zeros, tx, zeros, sy, ty], dim=1)


def _to_device(parts: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Move small CPU tensors to ``device`` in ONE asynchronous copy.

    A plain ``.to(cuda)`` of pageable memory waits for the GPU stream to drain, which would stall the host once per
    tensor and step; a pinned staging buffer lets the copy queue behind the running kernels instead.
    """
    flat = torch.cat([p.reshape(-1).to(torch.float32) for p in parts])
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    return list(flat.split([p.numel() for p in parts]))


def _resample_normalize(images: torch.Tensor, theta: torch.Tensor, out_size: int, interpolation: str,
                        backend: str, mean: torch.Tensor | None = None, std: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """uint8 images -> float32 crops resized to ``out_size``, in [0, 1] (clamped after bicubic overshoot), then
    normalised by ``mean`` / ``std`` when given; ``theta`` (B * 6,), mean and std on the images' device.

    ``backend``: "torch" (``affine_grid`` + ``grid_sample``, any device), "triton" (one fused kernel,
    kernels/triton_resample.py: CUDA, or CPU under ``TRITON_INTERPRET=1``; bicubic and bilinear), "auto" (triton for
    CUDA images where it applies, else torch). Both give the same values up to float32 rounding."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"augment: backend must be auto, torch or triton, got {backend!r}")
    fused = interpolation in ("bicubic", "bilinear")
    if backend == "triton" and not fused:
        raise ValueError(f"augment: the triton backend interpolates bicubic or bilinear, not {interpolation!r}")
    b, channels = images.shape[:2]
    if backend == "triton" or (backend == "auto" and fused and images.is_cuda):
        from kernels.triton_resample import crop_resize_normalize

        if mean is None or std is None:  # the kernel always normalises: by 0 and 1
            mean = torch.zeros(channels, device=images.device)
            std = torch.ones(channels, device=images.device)
        return crop_resize_normalize(images, theta.view(b, 6), out_size, interpolation, mean, std,
                                     clamp=interpolation == "bicubic")
    grid = F.affine_grid(theta.view(b, 2, 3), [b, channels, out_size, out_size], align_corners=False)
    out = F.grid_sample(images.float().div_(255.0), grid, mode=interpolation, padding_mode="border",
                        align_corners=False)
    if interpolation == "bicubic":
        out = out.clamp_(0.0, 1.0)
    if mean is None or std is None:
        return out
    return (out - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def _check_channels(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> None:
    if len(mean) != images.shape[1] or len(std) != images.shape[1]:
        raise ValueError(f"normalization has {len(mean)} channels, images have {images.shape[1]}")


def gpu_augment(images: torch.Tensor, sizes: torch.Tensor, out_size: int, mean: Sequence[float],
                std: Sequence[float], generator: torch.Generator | None = None,
                scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                hflip: float = 0.5, interpolation: str = "bicubic", intensity: float = 0.0,
                backend: str = "auto") -> torch.Tensor:
    """uint8 (B, C, S, S) + valid sizes (B, 2) -> normalised float32 (B, C, out_size, out_size).

    ``sizes`` should be the CPU tensor of the loader batch (the boxes are drawn on the CPU; a device tensor would
    force a host sync). Nothing here waits for the GPU: all per-image numbers travel in one pinned, asynchronous copy.
    ``intensity`` > 0 multiplies contrast by U(1-i, 1+i) around each image's mean and adds a brightness
    shift U(-i, i) * 0.5 before normalisation (useful for modalities with arbitrary windowing). ``backend``: see
    ``_resample_normalize`` (the default runs one fused Triton kernel on CUDA).
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"gpu_augment expects uint8 images, got {images.dtype}")
    _check_channels(images, mean, std)
    b = images.shape[0]
    boxes = _sample_boxes(sizes.to("cpu"), scale, ratio, generator)
    flip = torch.rand(b, generator=generator) < hflip
    parts = [_theta(boxes, flip, images.shape[-2:]), torch.tensor(mean), torch.tensor(std)]
    if intensity > 0:
        u = torch.rand((b, 2), generator=generator)
        parts += [1 - intensity + 2 * intensity * u[:, 0], (2 * u[:, 1] - 1) * intensity * 0.5]
    dev = _to_device(parts, images.device)
    if intensity <= 0:
        return _resample_normalize(images, dev[0], out_size, interpolation, backend, dev[1], dev[2])
    # The jitter needs each crop's mean: resample, jitter, then normalise.
    out = _resample_normalize(images, dev[0], out_size, interpolation, backend)
    contrast, brightness = dev[3].view(b, 1, 1, 1), dev[4].view(b, 1, 1, 1)
    mean_px = out.mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean_px) * contrast + mean_px + brightness).clamp_(0.0, 1.0)
    return (out - dev[1].view(1, -1, 1, 1)) / dev[2].view(1, -1, 1, 1)


def eval_transform(images: torch.Tensor, sizes: torch.Tensor, out_size: int, mean: Sequence[float],
                   std: Sequence[float], crop_pct: float = 0.875, interpolation: str = "bicubic",
                   backend: str = "auto") -> torch.Tensor:
    """Resize shorter side to ``out_size / crop_pct``, centre crop ``out_size``, normalise (deterministic).

    For little aliasing, load eval batches with ``canvas_size = eval_canvas_size(out_size, crop_pct)``.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"eval_transform expects uint8 images, got {images.dtype}")
    _check_channels(images, mean, std)
    sizes = sizes.to("cpu").double()
    side = crop_pct * torch.minimum(sizes[:, 0], sizes[:, 1])
    boxes = torch.stack([(sizes[:, 0] - side) / 2, (sizes[:, 1] - side) / 2, side, side], dim=1)
    flip = torch.zeros(images.shape[0], dtype=torch.bool)
    dev = _to_device([_theta(boxes, flip, images.shape[-2:]), torch.tensor(mean), torch.tensor(std)], images.device)
    return _resample_normalize(images, dev[0], out_size, interpolation, backend, dev[1], dev[2])


def eval_canvas_size(out_size: int, crop_pct: float = 0.875) -> int:
    return int(math.ceil(out_size / crop_pct))
