"""The shard sample format shared by ``curate`` (writer) and the training readers.

A sample in a WebDataset tar is ``{"__key__": str, IMAGE_EXT: bytes, "json": bytes}`` with exactly one
image entry. Images are stored losslessly:

* ``png``: 1-channel uint8 / uint16 or 3-channel uint8 (``data_curation.png``: "Up" filter, zlib level 1,
  run-length strategy for 8-bit; standard PNG, decoded here with PIL). Chosen by measurement (see
  ``bench/curate.py --part format`` and docs/curation.md): 5-25x smaller than ``.npy`` and
  decoded in ~1 ms (8-bit 512x512) to ~3-4 ms (16-bit 512x512), while WebP-lossless is only 15-30%
  smaller, 10-20x slower to encode, slower to decode and has no 16-bit mode.
* ``npy``: everything PNG cannot hold losslessly (16-bit multi-channel, 2 or more than 3 channels).

``decode_image`` always returns ``(H, W, C)`` uint8 or uint16; ``decode_meta`` returns the metadata dict.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image

from data_curation.png import encode_png

IMAGE_EXTS: tuple[str, ...] = ("png", "npy")
"""Sample keys that may hold the image, in the order readers should look for them."""

META_EXT = "json"

# Metadata keys. The first four are the contract in docs/architecture.md; the rest are always written by
# ``curate`` (value null when unknown).
KEY_MODALITY = "modality"  # "CT", "MR", "XR", "US", "PT", "photo", ... (DICOM Modality code when known)
KEY_SPLIT = "split"  # "train" | "val" | "test"
KEY_LABEL = "label"  # int, list of ints (multi-label) or None
KEY_CHANNELS = "channels"  # list of channel names, e.g. ["gray"], ["R", "G", "B"], ["brain", "subdural", "bone"]
OPTIONAL_KEYS: tuple[str, ...] = (
    "label_name",  # class name (ImageFolder) or None
    "source",  # name of the input root the file came from
    "source_format",  # "dicom" | "nifti" | "image" | "npz"
    "orig_shape",  # shape of the source array (volume or image) before slicing / resizing
    "orig_dtype",  # numpy dtype name of the source pixels
    "spacing",  # pixel spacing of the stored image in mm [row, col] (None when unknown)
    "normalization",  # how intensities were mapped, e.g. {"kind": "window", "windows": [...]}
    "slice_axis",  # axis of the source volume that was sliced (None for 2D sources)
    "slice_index",  # index along slice_axis (file frame index when slice_axis is "frame")
    "subject",  # salted hash of the subject / patient id
    "study",  # salted hash of the study id
    "series",  # salted hash of the series id
    "size",  # [H, W] stored
)
SPLITS: tuple[str, ...] = ("train", "val", "test")


class SampleFormatError(ValueError):
    """A sample does not follow the shard format."""


def _as_hwc(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise SampleFormatError(f"image must be (H, W) or (H, W, C), got shape {arr.shape}")
    if arr.dtype not in (np.uint8, np.uint16):
        raise SampleFormatError(f"image dtype must be uint8 or uint16, got {arr.dtype}")
    return arr


def encode_image(arr: np.ndarray, compress_level: int = 1) -> tuple[str, bytes]:
    """Encode an (H, W) or (H, W, C) uint8/uint16 array losslessly; returns ``(ext, bytes)``."""
    arr = _as_hwc(np.asarray(arr))
    channels = arr.shape[2]
    if channels == 1 or (channels == 3 and arr.dtype == np.uint8):
        return "png", encode_png(arr, compress_level)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return "npy", buf.getvalue()


def _decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        if img.mode in ("I;16", "I;16B", "I;16L"):
            return np.asarray(img, dtype=np.uint16)
        if img.mode == "I":  # some PIL versions open 16-bit gray PNGs as 32-bit "I"
            return np.asarray(img).astype(np.uint16)
        if img.mode not in ("L", "RGB"):
            raise SampleFormatError(f"unsupported PNG mode {img.mode}")
        return np.asarray(img)


def decode_image(sample: dict[str, Any]) -> np.ndarray:
    """Return the sample's image as an (H, W, C) uint8 or uint16 numpy array."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            value = sample[ext]
            break
    else:
        key = sample.get("__key__", "?")
        raise SampleFormatError(f"sample {key}: no image entry (expected one of {IMAGE_EXTS})")
    if isinstance(value, np.ndarray):
        return _as_hwc(value)
    data = bytes(value)
    arr = _decode_png(data) if ext == "png" else np.load(io.BytesIO(data), allow_pickle=False)
    return _as_hwc(arr)


def decode_meta(sample: dict[str, Any]) -> dict[str, Any]:
    """Return the sample's metadata dict (``json`` entry, raw bytes or already decoded)."""
    if META_EXT not in sample:
        raise SampleFormatError(f"sample {sample.get('__key__', '?')}: no json metadata")
    value = sample[META_EXT]
    meta = value if isinstance(value, dict) else json.loads(bytes(value).decode("utf-8"))
    for key in (KEY_MODALITY, KEY_SPLIT, KEY_LABEL, KEY_CHANNELS):
        if key not in meta:
            raise SampleFormatError(f"sample {sample.get('__key__', '?')}: metadata lacks '{key}'")
    return meta


def encode_meta(meta: dict[str, Any]) -> bytes:
    """Serialize metadata (compact, sorted keys so identical samples give identical bytes)."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
