"""Per-format readers. Each turns one input into ``Slice`` objects or raises ``RejectError``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from data_curation.intensity import foreground_fraction

if TYPE_CHECKING:
    from data_curation.config import CurateConfig


class RejectError(Exception):
    """The input cannot be curated; ``reason`` is written to rejects.jsonl."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Identity:
    """Raw identity values of one input (hashed with the salt before anything is stored)."""

    subject: str
    study: str = ""
    series: str = ""


@dataclass
class Slice:
    """One 2D image after intensity mapping, before the size policy."""

    image: np.ndarray  # (H, W, C) uint8 / uint16
    key: str  # identifies the slice within its input, e.g. "f3" or "axial-12"
    meta: dict[str, Any] = field(default_factory=dict)  # allowlisted keys only
    split: str | None = None  # a split given by the source (npz, ImageFolder), else None


def skip_background(image: np.ndarray, cfg: CurateConfig, stats: dict[str, int]) -> bool:
    """Whether a slice of a volume is (nearly) empty and left out (``--min_foreground``); counts it in ``stats``."""
    if foreground_fraction(image, cfg.background_threshold) >= cfg.min_foreground:
        return False
    stats["slices_skipped_background"] = stats.get("slices_skipped_background", 0) + 1
    return True
