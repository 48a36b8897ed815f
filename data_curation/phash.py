"""Perceptual hashes for optional near-duplicate detection (``--near_duplicates``).

The hash is a DCT hash: the image (channels averaged) is shrunk to 32x32 by area averaging, its 2D DCT-II
taken, and each of the 255 lowest-frequency AC coefficients (the 16x16 corner without the DC term) gives
one bit: above or below their median. Why 255 bits and not the common 63 (8x8): chest X-rays are so alike
that distinct Kermany images lie only 2-4 bits apart in 63 bits, while in 255 bits distinct images are at
least 36 bits apart and re-encoded / resized / re-scaled copies at most 8-10 (measured on all 2624 Kermany
images; docs/curation.md), so a threshold of 16 separates them with margin on both sides.

``NearDuplicateIndex`` answers "is there a hash within Hamming distance d?" without comparing against
every stored hash: the bits are cut into d + 1 bands, and two hashes within distance d agree exactly on
at least one band (pigeonhole), so only hashes sharing a band value are compared.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import numpy as np
from PIL import Image

HASH_BITS = 255
_SIDE = 32
_LOW = 16


@functools.lru_cache(maxsize=1)
def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def perceptual_hash(img: np.ndarray) -> int:
    """255-bit DCT hash (as an int) of an (H, W) or (H, W, C) image of any numeric dtype."""
    gray = img.astype(np.float32)
    if gray.ndim == 3:
        gray = gray.mean(axis=2)
    small = np.asarray(Image.fromarray(np.ascontiguousarray(gray), "F").resize((_SIDE, _SIDE), Image.Resampling.BOX),
                       dtype=np.float64)
    m = _dct_matrix(_SIDE)
    coeffs = (m @ small @ m.T)[:_LOW, :_LOW].reshape(-1)[1:]  # drop the DC term (mean brightness)
    bits = np.zeros(HASH_BITS + 1, bool)
    bits[:HASH_BITS] = coeffs > np.median(coeffs)
    return int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class NearDuplicateIndex:
    """Hashes of written samples with their group (subject); finds one within ``max_distance`` bits."""

    def __init__(self, max_distance: int):
        if not 0 <= max_distance < 64:
            raise ValueError(f"near-duplicate distance must be in 0..63 bits, got {max_distance}")
        self.max_distance = max_distance
        bands = max_distance + 1
        edges = np.linspace(0, HASH_BITS, bands + 1).round().astype(int)
        self._masks = [((1 << int(hi)) - 1) ^ ((1 << int(lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:])]
        self._buckets: list[dict[int, list[tuple[int, str]]]] = [defaultdict(list) for _ in self._masks]
        self.size = 0

    def find(self, h: int, group: str) -> bool:
        """True when a hash of another group lies within ``max_distance`` of ``h``."""
        for mask, bucket in zip(self._masks, self._buckets):
            for other, other_group in bucket.get(h & mask, ()):
                if other_group != group and hamming(h, other) <= self.max_distance:
                    return True
        return False

    def add(self, h: int, group: str) -> None:
        for mask, bucket in zip(self._masks, self._buckets):
            bucket[h & mask].append((h, group))
        self.size += 1
