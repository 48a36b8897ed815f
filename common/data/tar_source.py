"""WebDataset tar shards: a curated shard directory (counts from ``manifest.json``) or a brace pattern."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np

from common.data.source import DataSourceError, Decoded, LabelInfo, Source
from common.data.tar_reader import TarFormatError, iter_tar_files
from data_curation.format import decode_image, decode_meta

MANIFEST = "manifest.json"


def _split_key(member_name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the file name."""
    dirname, fname = os.path.split(member_name)
    key, _, ext = fname.partition(".")
    return (f"{dirname}/{key}" if dirname else key), ext


def iter_tar_samples(path: Path) -> Iterator[dict[str, Any]]:
    """Group consecutive tar members with the same key into ``{"__key__", ext: bytes, ...}``."""
    sample: dict[str, Any] = {}
    try:
        for name, data in iter_tar_files(path):
            key, ext = _split_key(name)
            if not ext:
                continue
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            if not sample:
                sample = {"__key__": key, "__url__": str(path)}
            sample[ext] = data
    except (TarFormatError, OSError) as exc:
        raise DataSourceError(f"{path}: cannot read tar shard ({exc})") from exc
    if sample:
        yield sample


def count_tar_samples(path: Path) -> int:
    """Number of distinct keys in a tar (headers only; used when there is no manifest)."""
    try:
        keys = {_split_key(name)[0] for name, _ in iter_tar_files(path, read_data=False)
                if "." in os.path.basename(name)}
    except (TarFormatError, OSError) as exc:
        raise DataSourceError(f"{path}: cannot read tar shard ({exc})") from exc
    return len(keys)


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataSourceError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise DataSourceError(f"{path}: no 'shards' list (is this a curated shard directory?)")
    return manifest


def _shard_path(root: Path, name: str) -> Path:
    for candidate in (root / name, root / "shards" / name):
        if candidate.is_file():
            return candidate
    raise DataSourceError(f"{root / MANIFEST}: listed shard '{name}' not found under {root} or {root / 'shards'}")


class TarShardSource(Source):
    """Shards of one split; each raw sample is the dict of a tar key's entries."""

    def __init__(self, files: list[Path], counts: list[int], path: str, split: str | None,
                 labels: LabelInfo):
        if not files:
            raise DataSourceError(f"{path}: no shards for split '{split}'")
        self.files = files
        self._counts = counts
        self.path = path
        self.split = split
        self.labels = labels

    @property
    def shard_counts(self) -> list[int]:
        return list(self._counts)

    def iter_raw(self, shard: int, order: np.ndarray | None = None) -> Iterator[Any]:
        return iter_tar_samples(self.files[shard])

    def decode(self, raw: Any) -> Decoded:
        where = f"{raw.get('__url__', self.path)}:{raw.get('__key__', '?')}"
        try:
            meta = decode_meta(raw)
            pixels = decode_image(raw)
        except Exception as exc:  # format errors and PIL/numpy decoding errors alike
            raise DataSourceError(f"{where}: cannot decode sample ({exc})") from exc
        return Decoded(pixels=pixels, label=meta.get("label"), key=where, meta=meta)


def _label_info_from_manifest(manifest: dict[str, Any], num_classes: int | None,
                              multilabel: bool | None) -> LabelInfo:
    names = manifest.get("class_names") or manifest.get("classes")
    k = num_classes if num_classes is not None else manifest.get("num_classes")
    if k is None and isinstance(names, list):
        k = len(names)
    return LabelInfo(num_classes=k, class_names=names if isinstance(names, list) else None,
                     multilabel=bool(multilabel if multilabel is not None else manifest.get("multilabel", False)))


def open_shard_dir(root: Path, split: str | None, num_classes: int | None = None,
                   multilabel: bool | None = None) -> TarShardSource:
    """A curated output directory: shards of ``split`` (default train) with counts from the manifest."""
    split = split or "train"
    if (root / MANIFEST).is_file():
        manifest = _read_manifest(root)
        entries = [s for s in manifest["shards"] if s.get("split") == split]
        files = [_shard_path(root, str(s["name"])) for s in entries]
        counts = [int(s["samples"]) for s in entries]
        labels = _label_info_from_manifest(manifest, num_classes, multilabel)
        if not files:
            splits = sorted({str(s.get("split")) for s in manifest["shards"]})
            raise DataSourceError(f"{root / MANIFEST}: no shards for split '{split}' (splits present: {splits})")
    else:
        shard_dir = root / "shards" if (root / "shards").is_dir() else root
        files = sorted(shard_dir.glob(f"{split}-*.tar"))
        if not files:
            raise DataSourceError(f"{root}: no {MANIFEST} and no '{split}-*.tar' shards")
        counts = [count_tar_samples(f) for f in files]
        labels = LabelInfo(num_classes=num_classes, multilabel=bool(multilabel))
    return TarShardSource(files, counts, str(root), split, labels)


def open_tar_pattern(pattern: str, num_classes: int | None = None,
                     multilabel: bool | None = None) -> TarShardSource:
    """A brace pattern such as ``/data/train-{000000..000099}.tar`` (counts read from the tar headers)."""
    files = [Path(p) for p in braceexpand.braceexpand(pattern)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataSourceError(f"{pattern}: {len(missing)} of {len(files)} shard files missing, e.g. {missing[0]}")
    counts = [count_tar_samples(f) for f in files]
    return TarShardSource(files, counts, pattern, None, LabelInfo(num_classes=num_classes,
                                                                 multilabel=bool(multilabel)))
