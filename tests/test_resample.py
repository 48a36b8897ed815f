"""kernels/triton_resample.py: the augmentation's fused crop-resize-normalise kernel against the torch path
(``affine_grid`` + ``grid_sample``, common/data/augment.py) and an independent float64 separable interpolation.

Under the Triton interpreter on a machine without CUDA (tests/conftest.py sets it), compiled with CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

from common.data.augment import eval_transform, gpu_augment

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cubic_weight(d: float) -> float:
    """Cubic convolution kernel, A = -0.75 (Keys), at distance d."""
    a, d = -0.75, abs(d)
    if d <= 1:
        return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
    if d < 2:
        return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
    return 0.0


def _axis_matrix(out_size: int, in_size: int, scale: float, shift: float, cubic: bool) -> torch.Tensor:
    """(out_size, in_size) float64 weights of one axis: output i samples the source at the affine point of its
    pixel centre; taps outside the image count on the nearest edge pixel (border padding)."""
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        src = ((scale * ((2 * i + 1) / out_size - 1) + shift + 1) * in_size - 1) / 2
        if cubic:
            first = math.floor(src) - 1
            for k in range(first, first + 4):
                m[i, min(max(k, 0), in_size - 1)] += _cubic_weight(src - k)
        else:
            src = min(max(src, 0.0), in_size - 1.0)
            lo = math.floor(src)
            m[i, lo] += 1 - (src - lo)
            m[i, min(lo + 1, in_size - 1)] += src - lo
    return m


def _separable_reference(images: torch.Tensor, theta: torch.Tensor, out_size: int, cubic: bool,
                         mean: torch.Tensor, std: torch.Tensor, clamp: bool) -> torch.Tensor:
    """The same crop-resize as two float64 matrix products per image (rows, then columns)."""
    outs = []
    for img, (sx, _, tx, _, sy, ty) in zip(images.double().cpu() / 255, theta.double().cpu().tolist()):
        rows = _axis_matrix(out_size, img.shape[1], sy, ty, cubic)
        cols = _axis_matrix(out_size, img.shape[2], sx, tx, cubic)
        out = rows @ img @ cols.T
        outs.append(out.clamp(0, 1) if clamp else out)
    out = torch.stack(outs)
    return (out - mean.double().cpu().view(1, -1, 1, 1)) / std.double().cpu().view(1, -1, 1, 1)


def _random_case(batch: int, channels: int, height: int, width: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, channels, height, width), generator=g, dtype=torch.uint8)
    # Crop boxes partly outside the image too (border taps), mirrored for odd images.
    h = torch.rand(batch, generator=g) * height + 1
    w = torch.rand(batch, generator=g) * width + 1
    y0 = torch.rand(batch, generator=g) * height - h / 2
    x0 = torch.rand(batch, generator=g) * width - w / 2
    sx = torch.where(torch.arange(batch) % 2 == 1, -(w / width), w / width)
    zeros = torch.zeros(batch)
    theta = torch.stack([sx, zeros, (2 * x0 + w) / width - 1, zeros, h / height, (2 * y0 + h) / height - 1], dim=1)
    mean = torch.rand(channels, generator=g)
    std = torch.rand(channels, generator=g) + 0.2
    return images, theta.float(), mean, std


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("shape,out_size", [((3, 1, 9, 13), 7), ((2, 3, 16, 16), 24), ((1, 2, 1, 5), 4)])
def test_kernel_matches_float64_separable_interpolation(interpolation, shape, out_size):
    from kernels.triton_resample import crop_resize_normalize

    images, theta, mean, std = _random_case(*shape, seed=out_size)
    clamp = interpolation == "bicubic"
    out = crop_resize_normalize(images.to(DEVICE), theta.to(DEVICE), out_size, interpolation, mean.to(DEVICE),
                                std.to(DEVICE), clamp)
    expected = _separable_reference(images, theta, out_size, interpolation == "bicubic", mean, std, clamp)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    torch.testing.assert_close(out.cpu().double(), expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("intensity", [0.0, 0.3])
def test_gpu_augment_triton_equals_torch(interpolation, intensity):
    """The whole augmentation, the same random draws: the fused kernel and affine_grid + grid_sample agree."""
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (4, 3, 40, 40), generator=g, dtype=torch.uint8).to(DEVICE)
    sizes = torch.tensor([[40, 40], [31, 40], [40, 17], [12, 12]], dtype=torch.int32)
    outs = {backend: gpu_augment(images, sizes, 32, [0.4, 0.5, 0.6], [0.2, 0.3, 0.25],
                                 generator=torch.Generator().manual_seed(5), interpolation=interpolation,
                                 intensity=intensity, backend=backend)
            for backend in ("triton", "torch")}
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=0, atol=5e-5)


def test_eval_transform_triton_equals_torch():
    images = torch.randint(0, 256, (3, 1, 37, 37), generator=torch.Generator().manual_seed(1),
                           dtype=torch.uint8).to(DEVICE)
    sizes = torch.tensor([[37, 37], [20, 37], [37, 9]], dtype=torch.int32)
    fused = eval_transform(images, sizes, 16, [0.45], [0.23], backend="triton")
    plain = eval_transform(images, sizes, 16, [0.45], [0.23], backend="torch")
    torch.testing.assert_close(fused, plain, rtol=0, atol=5e-5)


def test_bad_arguments_name_the_problem():
    from kernels.triton_resample import crop_resize_normalize

    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    theta, mean, std = torch.zeros(2, 6), torch.zeros(1), torch.ones(1)
    with pytest.raises(ValueError, match="uint8"):
        crop_resize_normalize(images.float(), theta, 4, "bicubic", mean, std, True)
    with pytest.raises(ValueError, match="interpolation"):
        crop_resize_normalize(images, theta, 4, "nearest", mean, std, True)
    with pytest.raises(ValueError, match="theta"):
        crop_resize_normalize(images, theta[:1], 4, "bicubic", mean, std, True)
    with pytest.raises(ValueError, match="triton backend"):
        gpu_augment(images, torch.full((2, 2), 4), 4, [0.0], [1.0], interpolation="nearest", backend="triton")
    with pytest.raises(ValueError, match="backend"):
        gpu_augment(images, torch.full((2, 2), 4), 4, [0.0], [1.0], backend="cuda")
