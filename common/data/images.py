"""Pixel-level helpers shared by every reader: file decoding, bit depth and channel count.

Policy (documented in docs/pretraining.md, Data):

* 16-bit images become uint8 by a per-image min-max stretch. Curated shards already hold windowed or
  percentile-normalised intensities, so the stretch only maps the stored range onto 0..255; dividing by 257
  instead would leave 10-12 bit modalities almost black.
* Channels follow ``in_chans``: gray is repeated, RGB becomes gray by ITU-R 601 luminance, any other count
  must match exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

LUMINANCE_WEIGHTS = (0.299, 0.587, 0.114)


class ImageDecodeError(ValueError):
    """An input image cannot be decoded or converted; the message names the file or sample."""


def to_uint8(arr: np.ndarray, where: str = "image") -> np.ndarray:
    """(H, W, C) uint8 from uint8 / uint16 / other integer or float pixels (per-image min-max stretch)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ImageDecodeError(f"{where}: unsupported pixel dtype {arr.dtype}")
    work = arr.astype(np.float32)
    if not np.isfinite(work).all():
        raise ImageDecodeError(f"{where}: image contains NaN or infinite values")
    lo, hi = float(work.min()), float(work.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.rint((work - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def as_hwc(arr: np.ndarray, where: str = "image") -> np.ndarray:
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim == 3:
        return arr
    raise ImageDecodeError(f"{where}: expected a 2D image (H, W) or (H, W, C), got shape {arr.shape}")


def convert_channels(arr: np.ndarray, in_chans: int, where: str = "image") -> np.ndarray:
    """(H, W, C) uint8 -> (H, W, in_chans) uint8: gray repeated, RGB to luminance, else must match."""
    channels = arr.shape[2]
    if channels == in_chans:
        return arr
    if channels == 1:
        return np.repeat(arr, in_chans, axis=2)
    if channels == 3 and in_chans == 1:
        weights = np.asarray(LUMINANCE_WEIGHTS, dtype=np.float32)
        gray = arr.astype(np.float32) @ weights
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8)[:, :, None]
    raise ImageDecodeError(
        f"{where}: image has {channels} channels but in_chans={in_chans}; only gray->k (repeat), "
        f"RGB->1 (luminance) and equal channel counts are converted"
    )


def read_image_file(path: str | Path) -> np.ndarray:
    """Decode a PNG/JPEG/TIFF/BMP file into (H, W, C) uint8 or uint16 (alpha and palettes dropped)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L"):
                return np.asarray(img, dtype=np.uint16)[:, :, None]
            if mode in ("I", "F"):
                return as_hwc(np.asarray(img), str(path))
            if mode == "1":
                return np.asarray(img.convert("L"))[:, :, None]
            if mode == "L":
                return np.asarray(img)[:, :, None]
            if mode == "LA":
                return np.asarray(img.convert("L"))[:, :, None]
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError as exc:
        raise ImageDecodeError(f"{path}: file not found") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{path}: cannot decode image ({exc})") from exc


def prepare_pixels(arr: np.ndarray, in_chans: int, where: str) -> np.ndarray:
    """Any decoded array -> (H, W, in_chans) uint8, the single conversion every reader goes through."""
    return convert_channels(to_uint8(as_hwc(np.asarray(arr), where), where), in_chans, where)
