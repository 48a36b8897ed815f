"""Shard writing: one webdataset ShardWriter per split, temp names renamed when a shard is complete."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import webdataset as wds

from data_curation.state import Ledger, LedgerState
from data_curation.tasks import EncodedSample


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardSink:
    """Writes samples to ``OUT/shards/{split}-{index:06d}.tar``; records each finished shard in the ledger."""

    def __init__(self, out: Path, state: LedgerState, ledger: Ledger, maxcount: int, maxsize: float):
        self.dir = out / "shards"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state, self.ledger = state, ledger
        self.maxcount, self.maxsize = maxcount, maxsize
        self._writers: dict[str, wds.ShardWriter] = {}
        self._entries: dict[str, list[list[str]]] = {}

    def _finished(self, split: str, tmp_name: str) -> None:
        tmp = Path(tmp_name)
        final = self.dir / tmp.name.removeprefix(".tmp-")
        entries = self._entries.pop(split, [])
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        rec = {"t": "shard", "name": final.name, "split": split, "samples": len(entries),
               "bytes": final.stat().st_size, "sha256": _sha256(final), "entries": entries}
        self.ledger.append(rec)  # recorded only after the rename: an unrecorded shard is an orphan
        self.state.shards[final.name] = rec
        for _, item in entries:
            self.state.written[item] += 1

    def write(self, sample: EncodedSample, item_id: str) -> None:
        split = sample.split
        writer = self._writers.get(split)
        if writer is None:
            pattern = str(self.dir / f".tmp-{split}-%06d.tar")
            writer = wds.ShardWriter(pattern, maxcount=self.maxcount, maxsize=self.maxsize, verbose=0,
                                     start_shard=self.state.next_index(split),
                                     post=lambda name, s=split: self._finished(s, name))
            self._writers[split] = writer
        if writer.count >= writer.maxcount or writer.size >= writer.maxsize:
            writer.next_stream()  # roll over now so the entries below belong to the new shard
        writer.write({"__key__": sample.key, sample.ext: sample.data, "json": sample.meta})
        self._entries.setdefault(split, []).append([sample.pixel_hash, item_id])
        self.state.hash_owner[sample.pixel_hash] = item_id

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
