"""Labeled train / val / test splits for transfer, on top of ``common.data.build_dataset``.

The data layer decodes every format (ImageFolder, MedMNIST ``.npz``, curated shards, CSV) into uint8
tensors of the encoder's channel count; this module adds what transfer needs on top: the split checks and
label-space checks that must fail before training, random access by index (our samplers decide the order),
and per-split transforms.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from common.data.dataset import ImageDataset, build_dataset, detect_kind
from common.data.images import ImageDecodeError
from common.data.labels import UnseenClassError, check_classes_seen_in_train
from common.data.loader import usable_workers
from common.data.npz_source import open_npz
from common.data.source import DataSourceError, RandomAccessSource
from common.data.tar_source import MANIFEST
from common.logging import progress
from common.seed import seed_worker
from common.transfer.errors import TransferDataError

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LabelSpace:
    num_classes: int
    class_names: list[str]
    multilabel: bool


def split_exists(path: str, split: str) -> bool:
    """Whether ``path`` provides ``split`` (checked without decoding any image)."""
    kind = detect_kind(path)
    p = Path(path)
    if kind == "folder":
        return (p / split).is_dir()
    if kind == "npz":
        with open_npz(p) as archive:
            return f"{split}_images" in archive.files
    if kind == "csv":
        with open(p, newline="") as fh:
            reader = csv.DictReader(fh)
            if "split" not in (reader.fieldnames or []):
                raise TransferDataError(f"{path}: a CSV for linprobe/finetune needs a 'split' column "
                                        f"(train / val / test) so that the splits are disjoint")
            rows = list(reader)
        unknown = next(((i, r["split"]) for i, r in enumerate(rows) if r["split"] not in ("train", "val", "test")),
                       None)
        if unknown is not None:
            raise TransferDataError(f"{path}: line {unknown[0] + 2} has split {unknown[1]!r}; linprobe/finetune "
                                    f"read the splits train / val / test, and other rows would be left out")
        return any(row["split"] == split for row in rows)
    if kind == "shards":
        manifest = p / MANIFEST
        if manifest.is_file():
            shards = json.loads(manifest.read_text()).get("shards", [])
            return any(s.get("split") == split for s in shards)
        root = p / "shards" if (p / "shards").is_dir() else p
        return any(root.glob(f"{split}-*.tar"))
    raise TransferDataError(f"{path}: a brace pattern of tar files holds one split only; pass the curated "
                            f"shard directory (with {MANIFEST}) instead")


def open_splits(path: str, in_chans: int, nb_classes: int | None, multilabel: bool,
                require_val: bool = True) -> tuple[dict[str, ImageDataset], LabelSpace]:
    """Open train / val / (test if present) and check them against ``--nb_classes`` / ``--multilabel``.

    Raises :class:`TransferDataError` or ``DataSourceError`` naming the path for: no data path, a missing
    train or val split, an empty class folder, a class count different from ``nb_classes``, multi-label
    data without ``--multilabel`` (or the reverse), a val/test label that no train sample has.
    """
    if not path:
        raise TransferDataError("no --data_path given")
    if not Path(path).exists():
        raise TransferDataError(f"{path}: data path does not exist")
    wanted = ["train", "val", "test"]
    for split in ("train", "val") if require_val else ("train",):
        if not split_exists(path, split):
            raise TransferDataError(f"{path}: the '{split}' split is missing (linprobe/finetune need train and "
                                    f"val; test is optional)")
    splits: dict[str, ImageDataset] = {}
    for split in wanted:
        if split != "train" and not split_exists(path, split):
            continue
        # Declared label space first (no override), so that a wrong --nb_classes is reported, not absorbed.
        splits[split] = build_dataset(path, split=split, labeled=True, in_chans=in_chans,
                                      multilabel=True if multilabel else None)
    declared = splits["train"].labels
    # Before the count checks: a typo'd class makes --nb_classes look wrong when the label is.
    try:
        check_classes_seen_in_train(path, splits, nb_classes)
    except UnseenClassError as exc:
        raise TransferDataError(str(exc)) from exc
    k = declared.num_classes
    if k is None:
        if nb_classes is None:
            raise TransferDataError(f"{path}: the data does not declare its classes; pass --nb_classes")
        k = nb_classes
        for split in list(splits):
            splits[split] = build_dataset(path, split=split, labeled=True, in_chans=in_chans,
                                          num_classes=k, multilabel=multilabel)
    elif nb_classes is not None and nb_classes != k:
        names = f" {declared.class_names}" if declared.class_names else ""
        raise TransferDataError(f"{path}: --nb_classes {nb_classes} but the data has {k} "
                                f"{'labels' if declared.multilabel else 'classes'}{names}")
    if declared.multilabel and not multilabel:
        raise TransferDataError(f"{path}: the labels are multi-label ({k} labels); pass --multilabel")
    for split, ds in splits.items():
        if ds.num_classes is not None and ds.num_classes != k:
            raise TransferDataError(f"{path}: split '{split}' declares {ds.num_classes} classes, train {k}")
    names = list(declared.class_names) if declared.class_names else [str(i) for i in range(k)]
    return splits, LabelSpace(num_classes=k, class_names=names, multilabel=multilabel)


class IndexedSplit(Dataset):
    """Random access to one split with a transform: ``ds[i] -> (image float tensor, target)``.

    Streaming shard splits are held as their raw (still encoded) samples in memory so that our samplers can
    address them by index; transfer datasets are small enough for that.
    """

    def __init__(self, dataset: ImageDataset, transform: Transform, num_classes: int):
        self.dataset = dataset
        self.transform = transform
        self.num_classes = num_classes
        if isinstance(dataset.source, RandomAccessSource):
            self.raw: list[Any] | None = None
        else:
            self.raw = [r for shard in range(len(dataset.source.shard_counts))
                        for r in dataset.source.iter_raw(shard)]

    def __len__(self) -> int:
        return len(self.raw) if self.raw is not None else len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, label = self.decoded(index)
        return self.transform(image), label

    def decoded(self, index: int) -> tuple[torch.Tensor, Any]:
        """Sample ``index`` decoded (uint8, before the transform) with its checked target."""
        raw = self.raw[index] if self.raw is not None else index
        image, label = self.dataset.sample(raw)
        if isinstance(label, torch.Tensor):
            label = label.float()
        elif not 0 <= int(label) < self.num_classes:
            raise DataSourceError(f"{self.dataset.source.path} sample {index}: label {label} outside "
                                  f"0..{self.num_classes - 1}")
        return image, label


class _DecodeCheck(Dataset):
    """``(target, "")`` for each sample of a split that decodes, ``(placeholder, the reason)`` for one that does
    not: the check before training then names every bad file of a split at once instead of stopping at the first
    (fixing a folder one rerun per file). The image itself does not travel back from the workers."""

    def __init__(self, split: IndexedSplit):
        self.split = split
        multilabel = split.dataset.multilabel
        self.placeholder = torch.zeros(split.num_classes) if multilabel else 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[Any, str]:
        try:
            return self.split.decoded(index)[1], ""
        except (DataSourceError, ImageDecodeError) as exc:
            return self.placeholder, str(exc)


def make_loader(dataset: Dataset, batch_size: int, sampler: Sampler[int], num_workers: int, pin_memory: bool,
                drop_last: bool = False, persistent: bool = False) -> DataLoader:
    num_workers = usable_workers(num_workers)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory and torch.cuda.is_available(), drop_last=drop_last,
                      worker_init_fn=seed_worker, persistent_workers=persistent and num_workers > 0)


# Bad samples named in the one error of the check before training (all of them are counted).
MAX_REPORTED_ERRORS = 10


def scan_labels(dataset: IndexedSplit, sampler: Sampler[int], batch_size: int, num_workers: int,
                desc: str) -> np.ndarray:
    """Decode the samples ``sampler`` yields (a corrupt image fails here, naming itself) and return their
    targets."""
    loader = DataLoader(_DecodeCheck(dataset), batch_size=batch_size, sampler=sampler,
                        num_workers=usable_workers(num_workers))
    targets, errors = [], []
    for batch_targets, messages in progress(loader, desc=f"checking {desc}", leave=False):
        targets.append(batch_targets.numpy())
        errors += [m for m in messages if m]
    if errors:
        shown = "; ".join(errors[:MAX_REPORTED_ERRORS])
        more = f" (and {len(errors) - MAX_REPORTED_ERRORS} more)" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise DataSourceError(f"{len(errors)} unreadable sample(s) in the {desc} split: {shown}{more}")
    if not targets:  # this process's share is empty (tiny split, many processes)
        multilabel = dataset.dataset.multilabel
        return np.zeros((0, dataset.num_classes) if multilabel else (0,), np.float32 if multilabel else np.int64)
    return np.concatenate(targets)
