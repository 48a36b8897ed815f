"""MedMNIST-style ``.npz``: ``{split}_images`` / ``{split}_labels`` arrays.

2D images are ``(N, H, W)`` gray or ``(N, H, W, C)`` with C in {1, 3, 4}. 3D volumes ``(N, D, H, W)``
(MedMNIST 3D) are refused unless ``volume_slices=True``, which turns every slice along the first volume axis
into its own 2D sample carrying the volume's label.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.data.source import DataSourceError, Decoded, LabelInfo, RandomAccessSource

SPLITS = ("train", "val", "test")


class NpzSource(RandomAccessSource):
    def __init__(self, path: Path, split: str | None, num_classes: int | None = None,
                 multilabel: bool | None = None, volume_slices: bool = False):
        self.path = str(path)
        self.split = split or "train"
        try:
            archive = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataSourceError(f"{path}: cannot read .npz ({exc})") from exc
        with archive:
            key = f"{self.split}_images"
            if key not in archive.files:
                raise DataSourceError(f"{path}: no '{key}' array (arrays present: {sorted(archive.files)})")
            images = archive[key]
            labels = archive[f"{self.split}_labels"] if f"{self.split}_labels" in archive.files else None
            all_labels = [archive[f"{s}_labels"] for s in SPLITS if f"{s}_labels" in archive.files]
        self.images, self.is_volume = self._check_images(images, volume_slices)
        self.slices = self.images.shape[1] if self.is_volume else 1
        self.raw_labels = None
        if labels is not None:
            labels = labels.reshape(len(labels), -1)
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
                raise DataSourceError(f"{where}: shape {images.shape} holds 3D volumes; 2D training needs "
                                      f"volume_slices=True (each slice becomes a sample) or curate the volumes")
            return images, True
        raise DataSourceError(f"{where}: unsupported image array shape {images.shape}")

    def _label_info(self, all_labels: list[np.ndarray], num_classes: int | None,
                    multilabel: bool | None) -> LabelInfo:
        if not all_labels:
            return LabelInfo(num_classes=num_classes)
        width = all_labels[0].reshape(len(all_labels[0]), -1).shape[1]
        is_multi = bool(multilabel) if multilabel is not None else width > 1
        if num_classes is None:
            num_classes = width if is_multi else int(max(int(a.max()) for a in all_labels if a.size)) + 1
        return LabelInfo(num_classes=num_classes, multilabel=is_multi)

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
