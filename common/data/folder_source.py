"""ImageFolder: ``root/{train,val,test}/<class>/<image>`` or a flat ``root/<class>/<image>``.

The class index is the position of the class folder name in the sorted union of class folders over all
split folders, so train/val/test agree even when a split lacks a class. A flat root is the train split.
"""

from __future__ import annotations

from pathlib import Path

from common.data.images import read_image_file
from common.data.source import DataSourceError, Decoded, LabelInfo, RandomAccessSource

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
SPLITS = ("train", "val", "test")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


class ImageFolderSource(RandomAccessSource):
    def __init__(self, root: Path, split: str | None, num_classes: int | None = None):
        self.path = str(root)
        split_dirs = [root / s for s in SPLITS if (root / s).is_dir()]
        if split_dirs:
            self.split = split or "train"
            base = root / self.split
            if not base.is_dir():
                raise DataSourceError(f"{root}: split folder '{self.split}' missing (found "
                                      f"{[d.name for d in split_dirs]})")
            class_roots = split_dirs
        else:
            if split not in (None, "train"):
                raise DataSourceError(f"{root}: flat class folders (no train/val/test) only provide the train "
                                      f"split, '{split}' was requested")
            self.split = "train"
            base = root
            class_roots = [root]
        names = sorted({d.name for r in class_roots for d in r.iterdir() if d.is_dir() and not d.name.startswith(".")})
        if not names:
            raise DataSourceError(f"{base}: no class folders")
        self.samples: list[tuple[Path, int]] = []
        for idx, name in enumerate(names):
            folder = base / name
            if not folder.is_dir():
                continue
            files = sorted(p for p in folder.rglob("*") if is_image_file(p))
            if not files:
                raise DataSourceError(f"{folder}: class folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            self.samples.extend((p, idx) for p in files)
        if num_classes is not None and num_classes != len(names):
            raise DataSourceError(f"{root}: {len(names)} class folders {names} but num_classes={num_classes}")
        self.labels = LabelInfo(num_classes=len(names), class_names=names, derived="names")

    def num_samples(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Decoded:
        path, label = self.samples[index]
        return Decoded(pixels=read_image_file(path), label=label, key=str(path))
