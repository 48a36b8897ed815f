"""Shard writing: one tar stream per split, temp names renamed when a shard is complete.

The shards are plain WebDataset tars (members ``<key>.<ext>`` grouped per sample, extensions sorted), read
by ``webdataset.WebDataset`` and ``common.data``. They are written with the standard library's tarfile
rather than ``webdataset.ShardWriter`` because importing webdataset imports torch, which costs every
curate process ~2 CPU-seconds and ~500 MiB before the first file is read (more than half of a 500-slice
run). Members get a fixed mtime and owner, so the same samples always give byte-identical shards.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from common.io import file_sha256
from data_curation.state import Ledger, LedgerState
from data_curation.tasks import EncodedSample

_MTIME = 946684800  # 2000-01-01: fixed, so shard bytes depend on the samples only


def add_sample(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> int:
    """Append one sample (``{ext: bytes}``) as ``key.ext`` members; returns the bytes of payload."""
    total = 0
    for ext in sorted(members):
        data = members[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), _MTIME, 0o444
        tar.addfile(info, io.BytesIO(data))
        total += len(data)
    return total


class _OpenShard:
    def __init__(self, path: Path):
        self.path = path
        self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        self.count = 0
        self.size = 0
        self.entries: list[list[str]] = []


class ShardSink:
    """Writes samples to ``OUT/shards/{split}-{index:06d}.tar``; records each finished shard in the ledger."""

    def __init__(self, out: Path, state: LedgerState, ledger: Ledger, maxcount: int, maxsize: float):
        self.dir = out / "shards"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state, self.ledger = state, ledger
        self.maxcount, self.maxsize = maxcount, maxsize
        self._open: dict[str, _OpenShard] = {}
        self._next: dict[str, int] = {}

    def _finish(self, split: str) -> None:
        shard = self._open.pop(split)
        shard.tar.close()
        with open(shard.path, "rb") as fh:
            os.fsync(fh.fileno())
        final = self.dir / shard.path.name.removeprefix(".tmp-")
        os.replace(shard.path, final)
        rec = {"t": "shard", "name": final.name, "split": split, "samples": len(shard.entries),
               "bytes": final.stat().st_size, "sha256": file_sha256(final), "entries": shard.entries}
        self.ledger.append(rec)  # recorded only after the rename: an unrecorded shard is an orphan
        self.state.shards[final.name] = rec
        for entry in shard.entries:
            self.state.written[entry[1]] += 1

    def write(self, sample: EncodedSample, item_id: str) -> None:
        split = sample.split
        shard = self._open.get(split)
        if shard is not None and (shard.count >= self.maxcount or shard.size >= self.maxsize):
            self._finish(split)
            shard = None
        if shard is None:
            index = self._next.get(split, self.state.next_index(split))
            self._next[split] = index + 1
            shard = self._open[split] = _OpenShard(self.dir / f".tmp-{split}-{index:06d}.tar")
        shard.size += add_sample(shard.tar, sample.key, {sample.ext: sample.data, "json": sample.meta})
        shard.count += 1
        entry = [sample.pixel_hash, item_id]
        if sample.phash is not None:
            entry += [f"{sample.phash:x}", sample.subject]
            if self.state.near is not None:
                self.state.near.add(sample.phash, sample.subject)
        shard.entries.append(entry)
        self.state.hash_owner[sample.pixel_hash] = item_id

    def close(self) -> None:
        for split in list(self._open):
            self._finish(split)
