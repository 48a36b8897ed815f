"""``manifest.json`` and ``rejects.jsonl`` built from the ledger, plus the console summary table."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from common.io import atomic_write, atomic_write_json
from data_curation.format import SPLITS
from data_curation.state import LedgerState

_PACKAGES = ("numpy", "pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle",
             "nibabel", "pillow", "webdataset")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# Settings that name places on the operator's machine (input folders, often named after patients, the output and
# salt files, merged parts): the ledger keeps them, the manifest, which is distributed with the shards, does not.
PATH_KEYS = frozenset({"inputs", "output", "salt_file", "merge", "config"})


def source_key(rec: dict[str, Any]) -> str:
    """A ledger record's source as shards and the manifest name it (``deid.source_label``); ledgers written
    before labels existed have only the readable name."""
    return rec.get("source_id", rec["source"])


def build_manifest(state: LedgerState, config: dict[str, Any], extra: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """Counts over every input ever curated into OUT; each file is exactly one of used/rejected/duplicate.
    ``extra`` adds top-level keys (``salt_id``, ``merged_from``). ``config`` is recorded without PATH_KEYS."""
    status = Counter(rec["status"] for rec in state.items.values())
    per_source: dict[str, Counter] = defaultdict(Counter)
    per_modality: Counter = Counter()
    skipped = 0
    for item_id, rec in state.items.items():
        src = per_source[source_key(rec)]
        src["files_seen"] += 1
        src[f"files_{rec['status']}"] += 1
        src["samples_written"] += state.written[item_id]
        if rec.get("modality") and state.written[item_id]:
            per_modality[rec["modality"]] += state.written[item_id]
        skipped += rec.get("skipped", 0)
    shards = sorted(state.shards.values(), key=lambda r: r["name"])
    return {
        "files_seen": len(state.items),
        "files_used": status["used"],
        "files_rejected": status["rejected"],
        "files_duplicate": status["duplicate"],
        "samples_written": sum(r["samples"] for r in shards),
        "samples_duplicate": sum(rec.get("dup_samples", 0) for rec in state.items.values()),
        "samples_near_duplicate": sum(rec.get("near_dup_samples", 0) for rec in state.items.values()),
        "files_near_duplicate": sum(1 for rec in state.items.values()
                                    if rec["status"] == "duplicate" and rec.get("near_dup_samples")),
        "slices_skipped_background": skipped,
        "series_resliced": sum(1 for rec in state.items.values() if rec.get("resliced")),
        "series_not_resliced": sum(1 for rec in state.items.values() if rec.get("reslice_note")),
        "samples_per_split": {s: sum(r["samples"] for r in shards if r["split"] == s) for s in SPLITS},
        "per_source": {k: dict(v) for k, v in sorted(per_source.items())},
        "samples_per_modality": dict(sorted(per_modality.items())),
        "shards": [{k: r[k] for k in ("name", "split", "samples", "bytes", "sha256")} for r in shards],
        "config": {k: v for k, v in config.items() if k not in PATH_KEYS},
        "versions": library_versions(),
        **(extra or {}),
    }


def write_outputs(out: Path, state: LedgerState, config: dict[str, Any], extra: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    manifest = build_manifest(state, config, extra)
    atomic_write_json(out / "manifest.json", manifest)
    rejects = [{"path": rec["path"], "reason": rec["reason"]} for rec in state.items.values()
               if rec["status"] == "rejected"]

    def _write(p: Path) -> None:
        p.write_text("".join(json.dumps(r) + "\n" for r in rejects))

    atomic_write(out / "rejects.jsonl", _write)
    return manifest


def source_names(state: LedgerState) -> dict[str, str]:
    """Each source label of the ledger -> the readable name of its input root (for the operator's console)."""
    return {source_key(rec): rec["source"] for rec in state.items.values()}


def summary_table(manifest: dict[str, Any], names: dict[str, str] | None = None) -> str:
    """The console summary; ``names`` (``source_names``) shows each source's readable name beside its label."""
    names = names or {}
    rows = [("source", "seen", "used", "rejected", "duplicate", "samples")]
    for label, c in manifest["per_source"].items():
        name = names.get(label, label)
        rows.append((name if name == label else f"{name} ({label})", c.get("files_seen", 0), c.get("files_used", 0),
                     c.get("files_rejected", 0),
                     c.get("files_duplicate", 0), c.get("samples_written", 0)))
    rows.append(("TOTAL", manifest["files_seen"], manifest["files_used"], manifest["files_rejected"],
                 manifest["files_duplicate"], manifest["samples_written"]))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    extra = (f"splits: {manifest['samples_per_split']}  modalities: {manifest['samples_per_modality']}  "
             f"background slices skipped: {manifest['slices_skipped_background']}  "
             f"duplicate samples: {manifest['samples_duplicate']}  shards: {len(manifest['shards'])}")
    return "\n".join(lines + [extra])
