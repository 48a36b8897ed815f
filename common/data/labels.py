"""Labels of a split without decoding its images (class counts, class-weighted losses, stratification).

Each reader keeps its labels apart from the pixels: ``.npz`` in the ``{split}_labels`` array, an ImageFolder in
the class folder names, a CSV in its label columns, curated shards in each sample's small ``json`` entry (the
tar is read, the image bytes are skipped undecoded). Labels are normalised exactly as
``ImageDataset.sample`` does, so ``dataset_labels(ds)[i]`` is the label of sample ``i`` in storage order.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

import numpy as np

from common.data.csv_source import CsvSource
from common.data.dataset import ImageDataset
from common.data.folder_source import ImageFolderSource
from common.data.npz_source import NpzSource
from common.data.source import DataSourceError, Source, normalize_label
from common.data.tar_source import TarShardSource


def _raw_labels(source: Source) -> Iterator[tuple[Any, str]]:
    """(raw label, sample name for errors) per sample, in storage order."""
    if isinstance(source, NpzSource):
        if source.raw_labels is None:
            raise DataSourceError(f"{source.path}: no '{source.split}_labels' array")
        for item, row in enumerate(source.raw_labels):
            label = row.astype(np.int64) if source.labels.multilabel else int(row[0])
            for _ in range(source.slices):  # every slice of a volume carries the volume's label
                yield label, f"{source.path}:{source.split}[{item}]"
    elif isinstance(source, ImageFolderSource):
        for path, label in source.samples:
            yield label, str(path)
    elif isinstance(source, CsvSource):
        for path, target in zip(source.files, source.targets):
            if isinstance(target, list):  # positive class indices -> multi-hot, as CsvSource.load does
                vec = np.zeros(source.labels.num_classes or 0, dtype=np.float32)
                vec[target] = 1.0
                target = vec
            yield target, str(path)
    elif isinstance(source, TarShardSource):
        from data_curation.format import decode_meta

        for shard in range(len(source.files)):
            for raw in source.iter_raw(shard):
                where = f"{raw.get('__url__', source.path)}:{raw.get('__key__', '?')}"
                try:
                    yield decode_meta(raw).get("label"), where
                except Exception as exc:  # a damaged json entry
                    raise DataSourceError(f"{where}: cannot read the sample's metadata ({exc})") from exc
    else:  # a reader without a separate label store: decode each sample (slow, but correct)
        for shard in range(len(source.shard_counts)):
            for raw in source.iter_raw(shard):
                decoded = source.decode(raw)
                yield decoded.label, decoded.key


def dataset_labels(dataset: ImageDataset) -> np.ndarray:
    """Every label of ``dataset`` in storage order: int64 ``(N,)`` class indices, or float32 ``(N, K)``
    multi-hot rows for multi-label data. Raises ``DataSourceError`` naming the sample for a bad label."""
    source = dataset.source
    labels = [normalize_label(raw, source.labels, where) for raw, where in _raw_labels(source)]
    if dataset.multilabel:
        k = source.labels.num_classes or 0
        return np.stack(labels).astype(np.float32) if labels else np.zeros((0, k), np.float32)
    return np.asarray(labels, dtype=np.int64)


def label_counts(dataset: ImageDataset) -> np.ndarray:
    """Samples carrying each class (int64, length ``num_classes``), read from the labels alone."""
    labels = dataset_labels(dataset)
    k = dataset.num_classes or 0
    if dataset.multilabel:
        return (labels > 0).sum(axis=0).astype(np.int64)
    return np.bincount(labels, minlength=k).astype(np.int64)


class UnseenClassError(DataSourceError):
    """A val / test label that no train sample carries, where the class list was gathered from the data."""


def check_classes_seen_in_train(path: str, splits: dict[str, ImageDataset], nb_classes: int | None) -> None:
    """Refuse val/test labels that no train sample carries when the classes were gathered from the data.

    CSV label names, class folders and (without ``--nb_classes``) integer labels define the class list over
    every split, so a typo in val ("pnemonia") silently became a class the head never sees in training.
    """
    labels = splits["train"].labels
    if labels.derived is None or (labels.derived == "indices" and nb_classes is not None):
        return  # declared classes: a class absent from train is the user's stated choice
    counts = {split: label_counts(ds) for split, ds in splits.items()}
    seen = counts["train"] > 0
    names = labels.class_names if labels.derived == "names" else None
    shown = (lambda i: repr(names[i])) if names else str
    train = [names[i] for i in np.flatnonzero(seen)] if names else []
    problems = []
    for split, count in counts.items():
        items = []
        for i in np.flatnonzero((count > 0) & ~seen) if split != "train" else []:
            close = _closest(names[i], train) if names else None
            hint = f", closest train class {close!r}" if close else ""
            items.append(f"{shown(i)} ({count[i]} sample{'s' if count[i] != 1 else ''}{hint})")
        if items:
            problems.append(f"the {split} split has label{'s' if len(items) > 1 else ''} {', '.join(items)}")
    if problems:
        fix = "" if names else f", or pass --nb_classes {len(seen)} if every index 0..{len(seen) - 1} is a class"
        raise UnseenClassError(f"{path}: {'; '.join(problems)} that no train sample has (train classes: "
                                f"{', '.join(shown(i) for i in np.flatnonzero(seen))}); a class without training "
                                f"samples cannot be learned: correct the label{fix}")


def _closest(name: str, candidates: list[str]) -> str | None:
    """The candidate ``name`` most likely misspells, ignoring case and surrounding spaces."""
    folded = {c.strip().casefold(): c for c in candidates}
    match = difflib.get_close_matches(name.strip().casefold(), list(folded), n=1, cutoff=0.6)
    return folded[match[0]] if match else None
