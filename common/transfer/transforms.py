"""Per-split image transforms for transfer: uint8 (C, H, W) tensors in, normalised float tensors out.

* eval: resize the shorter side to ``input_size`` (bicubic) and centre-crop a square - the crop only trims
  non-square images, so a lesion near the border of a square scan is never cut away;
* linear-probe training (``crop_flip``): random resized crop + horizontal flip, as MAE's linear probe;
* fine-tuning: timm's ImageNet recipe (RandAugment / AutoAugment, colour jitter, random erasing), run on
  an RGB view of the image and converted back to the encoder's channel count afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_normalization(in_chans: int) -> tuple[list[float], list[float]]:
    """ImageNet statistics (what MAE / timm weights expect); their channel average for gray encoders."""
    if in_chans == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [float(np.mean(IMAGENET_MEAN))] * in_chans, [float(np.mean(IMAGENET_STD))] * in_chans


def _per_channel(values: Sequence[float], in_chans: int, what: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    if in_chans == 1 and len(values) == 3:
        return [float(np.mean(values))]
    raise ValueError(f"normalization {what} has {len(values)} values for {in_chans} input channels")


class Normalize:
    """uint8 (C, H, W) -> float32 (x / 255 - mean) / std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], in_chans: int):
        self.mean = torch.tensor(_per_channel(mean, in_chans, "mean")).view(-1, 1, 1)
        self.std = torch.tensor(_per_channel(std, in_chans, "std")).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        return (x - self.mean) / self.std


def eval_transform(input_size: int, mean: Sequence[float], std: Sequence[float], in_chans: int) -> v2.Compose:
    return v2.Compose([
        v2.Resize(input_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(input_size),
        Normalize(mean, std, in_chans),
    ])


def crop_flip_transform(input_size: int, mean: Sequence[float], std: Sequence[float], in_chans: int,
                        scale: tuple[float, float] = (0.08, 1.0)) -> v2.Compose:
    return v2.Compose([
        v2.RandomResizedCrop(input_size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(),
        Normalize(mean, std, in_chans),
    ])


def _posterize_zero_safe(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize, but keeping 0 bits gives a black image (what Pillow < 11 did) instead of the
    ValueError newer Pillow raises; RandAugment's "increasing" posterize reaches 0 bits at magnitude 10."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform: object) -> None:
    from timm.data import auto_augment

    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize_zero_safe


class TimmTrainTransform:
    """timm ``create_transform(is_training=True)`` for any channel count.

    timm's augmentations expect RGB PIL images: a gray image is expanded to RGB (its three channels stay
    equal through the colour operations) and the first channel is kept afterwards.
    """

    def __init__(self, input_size: int, mean: Sequence[float], std: Sequence[float], in_chans: int,
                 auto_augment: str | None, color_jitter: float | None, re_prob: float, re_mode: str,
                 re_count: int):
        from timm.data import create_transform

        if in_chans not in (1, 3):
            raise ValueError(f"timm training augmentation supports 1 or 3 channels, not {in_chans}")
        self.in_chans = in_chans
        mean3 = _per_channel(mean, in_chans, "mean") * (3 if in_chans == 1 else 1)
        std3 = _per_channel(std, in_chans, "std") * (3 if in_chans == 1 else 1)
        aa = None if auto_augment in (None, "", "none") else auto_augment
        self.inner = create_transform(input_size=input_size, is_training=True, color_jitter=color_jitter,
                                      auto_augment=aa, interpolation="bicubic", re_prob=re_prob,
                                      re_mode=re_mode, re_count=re_count, mean=tuple(mean3), std=tuple(std3))
        _patch_posterize(self.inner)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        array = image.permute(1, 2, 0).numpy()
        pil = Image.fromarray(np.ascontiguousarray(array[:, :, 0])).convert("RGB") if self.in_chans == 1 \
            else Image.fromarray(np.ascontiguousarray(array))
        out = self.inner(pil)
        return out[:1] if self.in_chans == 1 else out
