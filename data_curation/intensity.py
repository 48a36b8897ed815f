"""Intensity mapping (CT windows, robust percentiles, RGB) and the canonical size policy."""

from __future__ import annotations

import numpy as np
from PIL import Image

# (level, width) in HU. Common radiology reading presets.
CT_WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "bone": (400.0, 1800.0),
    "lung": (-600.0, 1500.0),
    "soft_tissue": (40.0, 400.0),
    "abdomen": (60.0, 400.0),
    "liver": (60.0, 160.0),
}
HU16_OFFSET = 1024  # 'hu16' stores clip(HU + 1024, 0, 65535) as uint16, lossless for CT


class IntensityError(ValueError):
    """An intensity setting or input cannot be handled."""


def parse_window(name: str) -> tuple[float, float] | None:
    """Return (level, width) for a preset or 'L:W'; None for the pseudo-windows 'dicom' and 'hu16'."""
    if name in ("dicom", "hu16"):
        return None
    if name in CT_WINDOW_PRESETS:
        return CT_WINDOW_PRESETS[name]
    try:
        level, width = (float(v) for v in name.split(":"))
    except ValueError as exc:
        raise IntensityError(f"unknown CT window '{name}' (presets: {sorted(CT_WINDOW_PRESETS)}, "
                             f"'dicom', 'hu16' or 'L:W')") from exc
    if width <= 0:
        raise IntensityError(f"CT window '{name}': width must be positive")
    return level, width


def apply_window(values: np.ndarray, level: float, width: float, bits: int = 8) -> np.ndarray:
    """Linear window: level - width/2 -> 0, level + width/2 -> 2**bits - 1, clipped and rounded."""
    top = float(2**bits - 1)
    lo = level - width / 2.0
    scaled = (values.astype(np.float32) - np.float32(lo)) * np.float32(top / width)
    return np.clip(np.rint(scaled), 0, top).astype(np.uint8 if bits == 8 else np.uint16)


def ct_channels(hu: np.ndarray, windows: list[str], dicom_window: tuple[float, float] | None,
                bits: int = 8) -> tuple[np.ndarray, list[str], dict]:
    """Stack one channel per window; returns ``(H, W, C) array, channel names, normalization record)``."""
    if "hu16" in windows:
        if len(windows) != 1:
            raise IntensityError("'hu16' cannot be stacked with other windows")
        arr = np.clip(np.rint(hu) + HU16_OFFSET, 0, 65535).astype(np.uint16)
        return arr[:, :, None], ["hu16"], {"kind": "hu16", "offset": HU16_OFFSET}
    chans, used = [], []
    for name in windows:
        lw = parse_window(name)
        if lw is None:  # 'dicom': the file's own window, falling back to soft tissue
            lw = dicom_window or CT_WINDOW_PRESETS["soft_tissue"]
        chans.append(apply_window(hu, lw[0], lw[1], bits))
        used.append({"name": name, "level": lw[0], "width": lw[1]})
    return np.stack(chans, axis=-1), list(windows), {"kind": "ct_window", "bits": bits, "windows": used}


def percentile_range(values: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """Robust (lo, hi) from percentiles, using a strided subsample of at most ~1M values for speed."""
    flat = values.reshape(-1)
    step = max(1, flat.size // 1_000_000)
    lo, hi = np.percentile(flat[::step].astype(np.float32), [low, high])
    return float(lo), float(hi)


def scale_range(values: np.ndarray, lo: float, hi: float, bits: int = 8) -> np.ndarray:
    """Map [lo, hi] linearly onto the full unsigned range of ``bits`` (constant input maps to 0)."""
    top = float(2**bits - 1)
    dtype = np.uint8 if bits == 8 else np.uint16
    if not hi > lo:
        return np.zeros(values.shape, dtype)
    scaled = (values.astype(np.float32) - np.float32(lo)) * np.float32(top / (hi - lo))
    return np.clip(np.rint(scaled), 0, top).astype(dtype)


def rgb_to_uint8(arr: np.ndarray, bits_stored: int) -> np.ndarray:
    """Photographic RGB: keep colours; only reduce >8-bit samples to 8 bits by a shift."""
    if arr.dtype == np.uint8:
        return arr
    shift = max(0, int(bits_stored) - 8)
    return np.clip(arr.astype(np.int64) >> shift, 0, 255).astype(np.uint8)


def foreground_fraction(img: np.ndarray, threshold: float) -> float:
    """Fraction of pixels above ``threshold`` x the dtype's maximum (any channel)."""
    top = 255.0 if img.dtype == np.uint8 else 65535.0
    mask = img > threshold * top
    if mask.ndim == 3:
        mask = mask.any(axis=-1)
    return float(mask.mean())


def target_size(height: int, width: int, policy: str) -> tuple[int, int]:
    """Stored (H, W) for a source of (height, width) under ``policy``; images are only shrunk."""
    if policy == "keep":
        return height, width
    try:
        kind, value = policy.split(":")
        n = int(value)
    except ValueError as exc:
        raise IntensityError(f"size_policy '{policy}': expected keep, max:N or shorter:N") from exc
    if kind == "max":
        scale = min(1.0, n / max(height, width))
    elif kind == "shorter":
        scale = min(1.0, n / min(height, width))
    else:
        raise IntensityError(f"size_policy '{policy}': expected keep, max:N or shorter:N")
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Antialiased resize of an (H, W, C) uint8/uint16 image to ``size`` = (H, W), dtype preserved."""
    if img.shape[:2] == tuple(size):
        return img
    h, w = size
    top = 255 if img.dtype == np.uint8 else 65535
    if img.dtype == np.uint8 and img.shape[2] in (1, 3):
        mode = "L" if img.shape[2] == 1 else "RGB"
        src = img[:, :, 0] if img.shape[2] == 1 else img
        out = np.asarray(Image.fromarray(np.ascontiguousarray(src), mode).resize((w, h), Image.Resampling.BOX
                                                                                   if h < img.shape[0]
                                                                                   else Image.Resampling.BILINEAR))
        return out.reshape(h, w, img.shape[2])
    chans = []
    for c in range(img.shape[2]):
        f = Image.fromarray(img[:, :, c].astype(np.float32), "F")
        chans.append(np.asarray(f.resize((w, h), Image.Resampling.BOX if h < img.shape[0]
                                         else Image.Resampling.BILINEAR)))
    out = np.stack(chans, axis=-1)
    return np.clip(np.rint(out), 0, top).astype(img.dtype)
