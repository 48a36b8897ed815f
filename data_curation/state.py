"""The run ledger ``OUT/.curate_state.jsonl``: what is safely on disk, so re-runs write only what is missing.

Two kinds of lines, appended and flushed one at a time:
* ``{"t": "shard", name, split, samples, bytes, sha256, entries: [[pixel_hash, item_id], ...]}`` after a
  shard has been renamed to its final name (with ``--near_duplicates`` each entry also holds the sample's
  perceptual hash in hex and its subject hash);
* ``{"t": "item", id, source, status, reason, modality, samples, dup_samples, skipped}`` when an input is
  finished. An item counts as done only when every sample it wrote is in a recorded shard.
The ledger holds input paths (item ids) and is meant for the operator, not for distribution.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_curation.phash import NearDuplicateIndex

LEDGER_NAME = ".curate_state.jsonl"
SHARD_RE = re.compile(r"^(train|val|test)-(\d{6})\.tar$")


@dataclass
class LedgerState:
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> shard record
    items: dict[str, dict[str, Any]] = field(default_factory=dict)  # item id -> last item record
    hash_owner: dict[str, str] = field(default_factory=dict)  # pixel hash -> item id that wrote it
    written: Counter = field(default_factory=Counter)  # item id -> samples in recorded shards
    near: NearDuplicateIndex | None = None  # perceptual hashes of written samples (--near_duplicates)

    def record_entry(self, entry: list[str]) -> None:
        """Account for one written sample ``[pixel_hash, item_id(, phash_hex, subject)]``."""
        self.hash_owner[entry[0]] = entry[1]
        self.written[entry[1]] += 1
        if self.near is not None and len(entry) > 3:
            self.near.add(int(entry[2], 16), entry[3])

    def item_done(self, item_id: str) -> bool:
        rec = self.items.get(item_id)
        if rec is None:
            return False
        return rec["status"] != "used" or self.written[item_id] >= rec["samples"]

    def next_index(self, split: str) -> int:
        idx = [int(m.group(2)) for n in self.shards if (m := SHARD_RE.match(n)) and m.group(1) == split]
        return max(idx) + 1 if idx else 0


def replay_ledger(out: Path, near_distance: int | None = None) -> LedgerState:
    """The state recorded in ``out``'s ledger (read only: nothing on disk is touched); with
    ``near_distance`` the perceptual hashes of written samples are indexed too."""
    state = LedgerState(near=NearDuplicateIndex(near_distance) if near_distance is not None else None)
    path = out / LEDGER_NAME
    if path.exists():
        with open(path) as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash; its shard is then an orphan and removed below
                if rec.get("t") == "shard":
                    state.shards[rec["name"]] = rec
                    for entry in rec["entries"]:
                        state.record_entry(entry)
                elif rec.get("t") == "item":
                    state.items[rec["id"]] = rec
    return state


def load_ledger(out: Path, near_distance: int | None = None) -> LedgerState:
    """Replay the ledger and clean the shard folder: temp shards and unrecorded (orphan) shards are removed."""
    state = replay_ledger(out, near_distance)
    shard_dir = out / "shards"
    if shard_dir.is_dir():
        for p in shard_dir.iterdir():
            if p.name.startswith(".tmp-") or (SHARD_RE.match(p.name) and p.name not in state.shards):
                p.unlink()
    missing = [n for n in state.shards if not (shard_dir / n).is_file()]
    if missing:
        raise RuntimeError(f"{out}: shards recorded in {LEDGER_NAME} are missing: {missing[:5]}; "
                           f"the output folder was modified, curate into a fresh folder")
    return state


class Ledger:
    """Append-only writer for the ledger file."""

    def __init__(self, out: Path):
        self.path = out / LEDGER_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a")  # noqa: SIM115 - kept open for the run, closed in close()

    def append(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
