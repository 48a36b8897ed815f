"""2D image reader (PNG 8/16-bit, JPEG, TIFF incl. 16-bit, BMP): gray or RGB."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_curation.config import CurateConfig
from data_curation.intensity import percentile_range, scale_range
from data_curation.readers import Identity, RejectError, Slice

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _pixels(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                return np.asarray(img)
            if mode in ("1", "L", "LA"):
                return np.asarray(img.convert("L"))
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise RejectError(f"unreadable image: {type(exc).__name__}: {str(exc)[:160]}") from exc


def read_image(path: Path, cfg: CurateConfig, modality: str) -> tuple[Identity, Iterator[Slice]]:
    arr = _pixels(path)
    orig_dtype, orig_shape = str(arr.dtype), list(arr.shape)
    if arr.ndim == 3 and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
        arr = arr[..., 0]  # gray content saved as RGB (common for X-ray JPEGs): store one channel
    if arr.ndim == 3:
        out, names, norm = arr, ["R", "G", "B"], {"kind": "rgb"}
    elif arr.dtype == np.uint8:
        out, names, norm = arr[:, :, None], ["gray"], {"kind": "none"}
    elif arr.dtype == np.uint16 or (arr.dtype.kind in "iu" and arr.size and arr.min() >= 0 and arr.max() <= 65535):
        if cfg.output_bits == 16:
            out, norm = arr.astype(np.uint16)[:, :, None], {"kind": "none"}
        else:
            lo, hi = percentile_range(arr, cfg.percentile_low, cfg.percentile_high)
            out = scale_range(arr, lo, hi, 8)[:, :, None]
            norm = {"kind": "percentile", "low": cfg.percentile_low, "high": cfg.percentile_high, "bits": 8}
        names = ["gray"]
    else:
        if not np.isfinite(arr).all():
            raise RejectError("image has NaN/Inf pixels")
        lo, hi = percentile_range(arr, cfg.percentile_low, cfg.percentile_high)
        out = scale_range(arr, lo, hi, cfg.output_bits)[:, :, None]
        names = ["gray"]
        norm = {"kind": "percentile", "low": cfg.percentile_low, "high": cfg.percentile_high,
                "bits": cfg.output_bits}
    meta = {"modality": modality, "source_format": "image", "orig_shape": orig_shape, "orig_dtype": orig_dtype,
            "channels": names, "normalization": norm, "spacing": None, "slice_axis": None, "slice_index": None}

    def slices() -> Iterator[Slice]:
        yield Slice(image=np.ascontiguousarray(out), key="i", meta=meta)

    return Identity(subject=str(path)), slices()
