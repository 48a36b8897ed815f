"""MedMNIST-style ``.npz`` reader: ``{split}_images`` / ``{split}_labels``, 2D or 3D, splits kept."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_curation.config import CurateConfig
from data_curation.intensity import percentile_range, scale_range
from data_curation.readers import RejectError, Slice, skip_background

# MedMNIST dataset name -> modality, for the metadata (unknown names give "OT").
MEDMNIST_MODALITY = {
    "pneumonia": "XR", "chest": "XR", "breast": "US", "organ": "CT", "adrenal": "CT", "nodule": "CT",
    "fracture": "CT", "vessel": "MR", "synapse": "EM", "derma": "photo", "retina": "photo",
    "path": "histology", "blood": "microscopy", "tissue": "microscopy",
}
SPLIT_KEYS = {"train": "train", "val": "val", "test": "test"}


def npz_modality(path: Path) -> str:
    name = path.name.lower()
    for prefix, modality in MEDMNIST_MODALITY.items():
        if name.startswith(prefix):
            return modality
    return "OT"


def npz_items(path: Path) -> list[tuple[str, int]]:
    """[(split, number of items)] from the archive's member list (arrays are not loaded)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            items = []
            for split in SPLIT_KEYS:
                if f"{split}_images" in keys:
                    items.append((split, int(z[f"{split}_labels"].shape[0]) if f"{split}_labels" in keys
                                  else len(z[f"{split}_images"])))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise RejectError(f"unreadable npz: {type(exc).__name__}: {str(exc)[:160]}") from exc
    if not items:
        raise RejectError("npz has no train_images / val_images / test_images arrays")
    return items


def _label(row: np.ndarray) -> int | list[int]:
    row = np.asarray(row).reshape(-1)
    return int(row[0]) if row.size == 1 else [int(v) for v in row]


def read_npz(path: Path, cfg: CurateConfig, split: str, start: int, stop: int,
             stats: dict[str, int]) -> Iterator[tuple[str, Slice]]:
    """Yields ``(subject, slice)`` for items ``start:stop`` of ``split``."""
    with np.load(path, allow_pickle=False) as z:
        images = z[f"{split}_images"]
        labels = z[f"{split}_labels"] if f"{split}_labels" in z.files else None
    modality = npz_modality(path)
    is_3d = images.ndim == 4 and images.shape[-1] not in (1, 3)
    for i in range(start, min(stop, len(images))):
        item = images[i]
        label = _label(labels[i]) if labels is not None else None
        planes = [(k, item[k]) for k in range(item.shape[0])] if is_3d else [(None, item)]
        for k, plane in planes:
            if plane.ndim == 2:
                plane = plane[:, :, None]
            names = ["gray"] if plane.shape[2] == 1 else ["R", "G", "B"]
            if plane.dtype in (np.uint8, np.uint16):
                out, norm = plane, {"kind": "none"}
            else:
                lo, hi = percentile_range(plane, cfg.percentile_low, cfg.percentile_high)
                out, norm = scale_range(plane, lo, hi, cfg.output_bits), {"kind": "percentile"}
            if is_3d and skip_background(out, cfg, stats):
                continue
            meta = {"modality": modality, "source_format": "npz", "orig_shape": list(item.shape),
                    "orig_dtype": str(item.dtype), "channels": names, "normalization": norm, "spacing": None,
                    "slice_axis": "axial" if is_3d else None, "slice_index": k, "label": label}
            key = f"{split}{i}" + (f"-axial{k}" if is_3d else "")
            yield f"{path}:{split}:{i}", Slice(image=np.ascontiguousarray(out), key=key, meta=meta, split=split)
