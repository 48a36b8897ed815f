"""The training augmentation's crop-and-resize in one Triton kernel (common/data/augment.py holds the torch path it
matches).

For each output pixel of each (image, channel) plane: the axis-aligned source point of its image's crop box
(``theta``, the per-image affine rows of ``F.affine_grid``: scale and offset per axis, a negative x scale for a
mirrored crop), bicubic (cubic convolution, A = -0.75) or bilinear interpolation of the uint8 source with every tap
clamped into the image (``grid_sample``'s ``padding_mode="border"``, ``align_corners=False``), scaled to [0, 1],
optionally clamped, then normalised by the channel's mean and std. One read of the uint8 image (each tap a cached
byte) and one float32 write per output value.

What it replaces on the GPU (one H100, a Vim-S batch-512 step profiled in the thirty-third session): the float32
copy and division of the uint8 batch, ``affine_grid``'s float32 matrix product (1.17 ms), ``grid_sample`` (1.68 ms),
the clamp and the normalisation, about 4 ms of the 145 ms step in seven kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.triton_launch import ceil_div, compiled_launcher

CUBIC_A = tl.constexpr(-0.75)  # grid_sample's (and PIL's) cubic convolution coefficient
BLOCK = 1024  # output values per program
WARPS = 4


@triton.jit
def _cubic_near(t):
    """Cubic convolution weight of a tap at distance t in [0, 1]."""
    return ((CUBIC_A + 2.0) * t - (CUBIC_A + 3.0)) * t * t + 1.0


@triton.jit
def _cubic_far(t):
    """Cubic convolution weight of a tap at distance t in [1, 2]."""
    return ((CUBIC_A * t - 5.0 * CUBIC_A) * t + 8.0 * CUBIC_A) * t - 4.0 * CUBIC_A


@triton.jit
def _source(pos, out_size, scale, shift, in_size):
    """Source coordinate (pixels, align_corners=False) of output index ``pos`` along one axis."""
    normalized = (2 * pos + 1).to(tl.float32) / out_size - 1.0
    return ((scale * normalized + shift + 1.0) * in_size - 1.0) * 0.5


@triton.jit
def _crop_resize_kernel(X, Y, THETA, MEAN, STD, channels, in_h, in_w, out_size,
                        CUBIC: tl.constexpr, CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(0)  # image * channels + channel
    image = plane // channels
    channel = plane % channels
    n_out = out_size * out_size
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_out
    row = offs // out_size
    col = offs % out_size
    # theta's rows: [sx, 0, tx, 0, sy, ty]
    ix = _source(col, out_size, tl.load(THETA + image * 6), tl.load(THETA + image * 6 + 2), in_w)
    iy = _source(row, out_size, tl.load(THETA + image * 6 + 4), tl.load(THETA + image * 6 + 5), in_h)
    src = X + plane.to(tl.int64) * in_h * in_w
    if CUBIC:
        x_floor = tl.floor(ix)
        y_floor = tl.floor(iy)
        fx = ix - x_floor
        fy = iy - y_floor
        wx = (_cubic_far(fx + 1.0), _cubic_near(fx), _cubic_near(1.0 - fx), _cubic_far(2.0 - fx))
        wy = (_cubic_far(fy + 1.0), _cubic_near(fy), _cubic_near(1.0 - fy), _cubic_far(2.0 - fy))
        x_first = x_floor.to(tl.int32) - 1
        y_first = y_floor.to(tl.int32) - 1
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for r in tl.static_range(4):
            y = tl.minimum(tl.maximum(y_first + r, 0), in_h - 1)
            line = tl.zeros((BLOCK,), dtype=tl.float32)
            for q in tl.static_range(4):
                x = tl.minimum(tl.maximum(x_first + q, 0), in_w - 1)
                line += wx[q] * tl.load(src + y * in_w + x, mask=mask, other=0).to(tl.float32)
            acc += wy[r] * line
    else:
        # Border padding clips the source point itself; the far corner then has weight 0 wherever it is clamped.
        ix = tl.minimum(tl.maximum(ix, 0.0), in_w - 1.0)
        iy = tl.minimum(tl.maximum(iy, 0.0), in_h - 1.0)
        x0 = tl.floor(ix).to(tl.int32)
        y0 = tl.floor(iy).to(tl.int32)
        fx = ix - x0.to(tl.float32)
        fy = iy - y0.to(tl.float32)
        x1 = tl.minimum(x0 + 1, in_w - 1)
        y1 = tl.minimum(y0 + 1, in_h - 1)
        top = ((1.0 - fx) * tl.load(src + y0 * in_w + x0, mask=mask, other=0).to(tl.float32)
               + fx * tl.load(src + y0 * in_w + x1, mask=mask, other=0).to(tl.float32))
        bottom = ((1.0 - fx) * tl.load(src + y1 * in_w + x0, mask=mask, other=0).to(tl.float32)
                  + fx * tl.load(src + y1 * in_w + x1, mask=mask, other=0).to(tl.float32))
        acc = (1.0 - fy) * top + fy * bottom
    value = acc / 255.0
    if CLAMP:
        value = tl.minimum(tl.maximum(value, 0.0), 1.0)
    value = (value - tl.load(MEAN + channel)) / tl.load(STD + channel)
    tl.store(Y + plane.to(tl.int64) * n_out + offs, value, mask=mask)


def crop_resize_normalize(images: torch.Tensor, theta: torch.Tensor, out_size: int, interpolation: str,
                          mean: torch.Tensor, std: torch.Tensor, clamp: bool) -> torch.Tensor:
    """uint8 (B, C, H, W) images, float32 (B, 6) affine rows (``theta``, no rotation or shear), float32 (C,) mean
    and std, all on one device -> float32 (B, C, out_size, out_size): crop, resize (``interpolation`` "bicubic" or
    "bilinear"), scale to [0, 1], clamp there when ``clamp``, normalise."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"crop_resize_normalize: expected uint8 (B, C, H, W) images, got {images.dtype} "
                         f"{tuple(images.shape)}")
    if interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"crop_resize_normalize: interpolation must be bicubic or bilinear, got {interpolation!r}")
    batch, channels, in_h, in_w = images.shape
    _check_vector("theta", theta, (batch, 6))
    _check_vector("mean", mean, (channels,))
    _check_vector("std", std, (channels,))
    images = images.contiguous()
    out = torch.empty((batch, channels, out_size, out_size), dtype=torch.float32, device=images.device)
    if out.numel() == 0:
        return out
    grid = (batch * channels, ceil_div(out_size * out_size, BLOCK))
    compiled_launcher(_crop_resize_kernel)[grid](
        images, out, theta.contiguous(), mean.contiguous(), std.contiguous(), channels, in_h, in_w, out_size,
        CUBIC=interpolation == "bicubic", CLAMP=clamp, BLOCK=BLOCK, num_warps=WARPS)
    return out


def _check_vector(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    if t.dtype != torch.float32 or tuple(t.shape) != tuple(shape):
        raise ValueError(f"crop_resize_normalize: {name} must be float32 {tuple(shape)}, got {t.dtype} "
                         f"{tuple(t.shape)}")
