"""A fast lossless PNG encoder for the shard images (gray 8/16-bit, RGB 8-bit).

Why not PIL: PIL's PNG writer chooses a filter per row by trying all five, which costs more than the
compression itself (2.1 ms for a 512x512 8-bit CT slice at zlib level 1). Medical images compress just as
well with the "Up" filter on every row, computed in one numpy subtraction, and zlib's run-length strategy
(Z_RLE), which suits the large flat regions of windowed CT and X-ray: 0.9 ms for the same slice with an
equal or smaller file (numbers in docs/curation.md). 16-bit images use zlib's default strategy
(Z_RLE would grow them by ~40 %). The output is a standard PNG that any reader (PIL, libpng) decodes.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FILTER_UP = 2


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def encode_png(arr: np.ndarray, level: int = 1) -> bytes:
    """PNG bytes of an (H, W) / (H, W, 1) uint8 or uint16 array, or an (H, W, 3) uint8 array."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2 and arr.dtype in (np.uint8, np.uint16):
        color_type = 0
    elif arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8:
        color_type = 2
    else:
        raise ValueError(f"encode_png: unsupported array {arr.shape} {arr.dtype}")
    height, width = arr.shape[:2]
    bits = 16 if arr.dtype == np.uint16 else 8
    # PNG stores 16-bit samples big-endian; rows are filtered byte by byte
    rows = (arr.astype(">u2", copy=False) if bits == 16 else arr).reshape(height, -1)
    rows = np.ascontiguousarray(rows).view(np.uint8)
    raw = np.empty((height, rows.shape[1] + 1), np.uint8)
    raw[:, 0] = _FILTER_UP
    raw[0, 1:] = rows[0]  # the row above the first row counts as zeros
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])  # uint8 arithmetic wraps modulo 256, as PNG wants
    strategy = zlib.Z_RLE if bits == 8 else zlib.Z_DEFAULT_STRATEGY
    comp = zlib.compressobj(level, zlib.DEFLATED, 15, 9, strategy)
    idat = comp.compress(raw.data) + comp.flush()
    header = struct.pack(">IIBBBBB", width, height, bits, color_type, 0, 0, 0)
    return b"".join((_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", idat), _chunk(b"IEND", b"")))
