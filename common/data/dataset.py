"""``build_dataset``: one entry point that recognises the data path and returns an ``ImageDataset``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.data.csv_source import CsvSource
from common.data.folder_source import ImageFolderSource
from common.data.images import prepare_pixels
from common.data.npz_source import NpzSource
from common.data.source import DataSourceError, LabelInfo, Source, normalize_label
from common.data.tar_source import MANIFEST, open_shard_dir, open_tar_pattern


class ImageDataset:
    """A split of a dataset with a fixed channel count.

    ``sample(raw)`` turns a raw sample into ``image`` (uint8 tensor C x H x W) or ``(image, label)`` in
    labeled mode; ``label`` is an int or a float32 multi-hot tensor. Iterating yields every sample once in
    storage order (single process); training uses ``common.data.build_loader``.
    """

    def __init__(self, source: Source, in_chans: int, labeled: bool):
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        self.source = source
        self.in_chans = in_chans
        self.labeled = labeled

    @property
    def labels(self) -> LabelInfo:
        return self.source.labels

    @property
    def num_classes(self) -> int | None:
        return self.source.labels.num_classes

    @property
    def class_names(self) -> list[str] | None:
        return self.source.labels.class_names

    @property
    def multilabel(self) -> bool:
        return self.source.labels.multilabel

    def __len__(self) -> int:
        return len(self.source)

    def decode_for_batch(self, raw: Any) -> tuple[torch.Tensor, Any, str]:
        """(image uint8 C x H x W, label or None when unlabeled, sample key)."""
        decoded = self.source.decode(raw)
        chw = prepare_pixels(decoded.pixels, self.in_chans, decoded.key).transpose(2, 0, 1)
        image = torch.from_numpy(np.array(chw, dtype=np.uint8, order="C", copy=True))
        if not self.labeled:
            return image, None, decoded.key
        label = normalize_label(decoded.label, self.source.labels, decoded.key)
        return image, (torch.from_numpy(label) if isinstance(label, np.ndarray) else label), decoded.key

    def sample(self, raw: Any) -> Any:
        image, label, _ = self.decode_for_batch(raw)
        return (image, label) if self.labeled else image

    def __iter__(self) -> Iterator[Any]:
        for shard in range(len(self.source.shard_counts)):
            for raw in self.source.iter_raw(shard):
                yield self.sample(raw)

    def __repr__(self) -> str:
        return (f"ImageDataset({type(self.source).__name__} {self.source.path!r}, split={self.source.split!r}, "
                f"samples={len(self)}, in_chans={self.in_chans}, labeled={self.labeled}, "
                f"num_classes={self.num_classes}, multilabel={self.multilabel})")


def detect_kind(path: str) -> str:
    """'shards' | 'tar_pattern' | 'npz' | 'csv' | 'folder' for a data path (raises when unrecognised)."""
    p = Path(path)
    if "{" in path or path.endswith(".tar"):
        return "tar_pattern"
    if p.is_dir():
        if (p / MANIFEST).is_file() or (p / "shards").is_dir() or any(p.glob("*.tar")):
            return "shards"
        return "folder"
    if not p.exists():
        raise DataSourceError(f"{path}: data path does not exist")
    if p.suffix == ".npz":
        return "npz"
    if p.suffix == ".csv":
        return "csv"
    raise DataSourceError(f"{path}: not a shard directory, tar pattern, ImageFolder, .npz or .csv")


def build_dataset(path: str | Path, split: str | None = "train", labeled: bool = False, in_chans: int = 3,
                  num_classes: int | None = None, multilabel: bool | None = None,
                  volume_slices: bool = False) -> ImageDataset:
    """Open ``path`` (curated shard dir, tar brace pattern, ImageFolder, ``.npz`` or CSV) for one split.

    ``num_classes`` / ``multilabel`` override what the source declares; ``volume_slices`` lets 3D ``.npz``
    volumes be read slice by slice. Tar patterns ignore ``split`` (the pattern selects the files).
    """
    path = str(path)
    kind = detect_kind(path)
    source: Source
    if kind == "shards":
        source = open_shard_dir(Path(path), split, num_classes, multilabel)
    elif kind == "tar_pattern":
        source = open_tar_pattern(path, num_classes, multilabel)
    elif kind == "npz":
        source = NpzSource(Path(path), split, num_classes, multilabel, volume_slices)
    elif kind == "csv":
        source = CsvSource(Path(path), split, num_classes, multilabel)
    else:
        source = ImageFolderSource(Path(path), split, num_classes)
    if len(source) == 0:
        raise DataSourceError(f"{path}: split '{split}' has no samples")
    if labeled and isinstance(source, CsvSource) and source.label_problem:
        raise DataSourceError(source.label_problem)
    if labeled and isinstance(source, NpzSource) and source.raw_labels is None:
        raise DataSourceError(f"{path}: no '{source.split}_labels' array for the {source.split}_images (labeled "
                              f"use needs one label row per image)")
    if labeled and source.labels.num_classes is None and source.labels.multilabel:
        raise DataSourceError(f"{path}: multi-label data needs num_classes")
    return ImageDataset(source, in_chans=in_chans, labeled=labeled)
