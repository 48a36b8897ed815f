"""MedMNIST-style ``.npz``: ``{split}_images`` / ``{split}_labels`` arrays.

2D images are ``(N, H, W)`` gray or ``(N, H, W, C)`` with C in {1, 3, 4}. 3D volumes ``(N, D, H, W)``
(MedMNIST 3D) are refused unless ``volume_slices=True``, which turns every slice along the first volume axis
into its own 2D sample carrying the volume's label.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from common.data.source import DataSourceError, Decoded, LabelInfo, RandomAccessSource

SPLITS = ("train", "val", "test")


def open_npz(path: Path) -> np.lib.npyio.NpzFile:
    """``np.load`` of a ``.npz`` archive; a file that is not one (empty, truncated, another format) is a
    ``DataSourceError`` naming it and saying what it is instead of numpy's or zipfile's traceback."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataSourceError(f"{path}: cannot read .npz ({exc.strerror or exc})") from exc
    if size == 0:
        raise DataSourceError(f"{path}: empty file (0 bytes), not a .npz archive")
    if not zipfile.is_zipfile(path):
        raise DataSourceError(f"{path}: not a .npz archive (a .npz is a zip of .npy arrays as numpy.savez writes; "
                              f"this file is {size} bytes of something else, or a truncated copy)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataSourceError(f"{path}: cannot read .npz ({exc})") from exc


def read_array(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    """One array of an open archive; a damaged member or an object (pickled) array names the file and key."""
    try:
        return archive[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataSourceError(f"{path}: array '{key}' holds Python objects (dtype=object); store numeric "
                                  f"arrays (numpy.savez of uint8 / uint16 / float images, int labels)") from exc
        raise DataSourceError(f"{path}: cannot read array '{key}' ({exc})") from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataSourceError(f"{path}: cannot read array '{key}' (damaged or truncated archive: {exc})") from exc


def _rows(labels: np.ndarray) -> np.ndarray:
    """Labels as ``(N, K)`` rows, also for an empty split (``reshape(0, -1)`` is ambiguous to numpy)."""
    if labels.ndim == 0:
        return labels.reshape(1, 1)
    return labels.reshape(labels.shape[0], int(np.prod(labels.shape[1:], dtype=np.int64)))


def _integral_labels(labels: np.ndarray, where: str) -> np.ndarray:
    """``(N, K)`` labels; float labels must hold whole numbers (a fraction would be truncated silently)."""
    labels = _rows(labels)
    if labels.dtype == np.bool_ or np.issubdtype(labels.dtype, np.integer):
        return labels
    if not np.issubdtype(labels.dtype, np.floating):
        raise DataSourceError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    bad = ~np.isfinite(labels) | (labels != np.round(labels))
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise DataSourceError(f"{where}: labels must be whole numbers (class indices or 0/1), sample {row} has "
                              f"{labels[row].tolist()}")
    return labels


class NpzSource(RandomAccessSource):
    def __init__(self, path: Path, split: str | None, num_classes: int | None = None,
                 multilabel: bool | None = None, volume_slices: bool = False):
        self.path = str(path)
        self.split = split or "train"
        with open_npz(path) as archive:
            key = f"{self.split}_images"
            if key not in archive.files:
                raise DataSourceError(f"{path}: no '{key}' array (arrays present: {sorted(archive.files)})")
            images = read_array(archive, key, path)
            labels = (read_array(archive, f"{self.split}_labels", path) if f"{self.split}_labels" in archive.files
                      else None)
            all_labels = [read_array(archive, f"{s}_labels", path) for s in SPLITS if f"{s}_labels" in archive.files]
        self.images, self.is_volume = self._check_images(images, volume_slices)
        self.slices = self.images.shape[1] if self.is_volume else 1
        self.raw_labels = None
        if labels is not None:
            labels = _integral_labels(labels, f"{path}:{self.split}_labels")
            if len(labels) != len(self.images):
                raise DataSourceError(f"{path}: {len(self.images)} images but {len(labels)} labels in split "
                                      f"'{self.split}'")
            self.raw_labels = labels
        self.labels = self._label_info(all_labels, num_classes, multilabel)

    def _check_images(self, images: np.ndarray, volume_slices: bool) -> tuple[np.ndarray, bool]:
        where = f"{self.path}:{self.split}_images"
        if images.ndim == 3:
            return images, False
        if images.ndim == 4 and images.shape[-1] in (1, 3, 4):
            return images, False
        if images.ndim in (4, 5):
            if not volume_slices:
                raise DataSourceError(f"{where}: shape {images.shape} holds 3D volumes; 2D models read them as "
                                      f"slices: pretrain --volume_slices (volume_slices=True in common.data), or "
                                      f"curate the file first (curate slices volumes, keeping each one's split)")
            return images, True
        raise DataSourceError(f"{where}: unsupported image array shape {images.shape}")

    def _label_info(self, all_labels: list[np.ndarray], num_classes: int | None,
                    multilabel: bool | None) -> LabelInfo:
        if not all_labels:
            return LabelInfo(num_classes=num_classes)
        width = _rows(all_labels[0]).shape[1]
        is_multi = bool(multilabel) if multilabel is not None else width > 1
        derived = None
        if num_classes is None:
            num_classes = width if is_multi else int(max(int(a.max()) for a in all_labels if a.size)) + 1
            derived = None if is_multi else "indices"
        return LabelInfo(num_classes=num_classes, multilabel=is_multi, derived=derived)

    def num_samples(self) -> int:
        return len(self.images) * self.slices

    def load(self, index: int) -> Decoded:
        item, sl = divmod(index, self.slices)
        pixels = self.images[item][sl] if self.is_volume else self.images[item]
        if pixels.ndim == 3 and self.is_volume:  # (H, W, C) slice of a channels-last volume
            pixels = np.asarray(pixels)
        if pixels.ndim == 3 and pixels.shape[-1] == 4:
            pixels = pixels[..., :3]
        label = None
        if self.raw_labels is not None:
            row = self.raw_labels[item]
            label = row.astype(np.int64) if self.labels.multilabel else int(row[0])
        key = f"{self.path}:{self.split}[{item}]" + (f"[slice {sl}]" if self.is_volume else "")
        return Decoded(pixels=np.asarray(pixels), label=label, key=key)
