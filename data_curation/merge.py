"""``curate --merge PART... --output OUT``: combine the outputs of a curation job array into one dataset.

Each part is a finished ``curate`` output made with the same salt and settings. The merge

* checks every part (manifest present and matching its ledger, no unfinished input, same salt id and
  same settings apart from the per-run ones in ``RUN_KEYS``) and names the part that fails;
* counts every input file once: a path curated by two parts (overlapping input lists) is kept from the
  first part only; a sample whose pixel hash an earlier part already wrote is removed (counted in
  ``samples_duplicate``), and a file left with no sample becomes ``duplicate``;
* moves the shards into ``OUT/shards/`` renumbered per split in part order (a shard that lost samples
  is rewritten without them, byte for byte otherwise);
* writes a ledger, ``manifest.json`` and ``rejects.jsonl`` for OUT, so OUT is an ordinary curate output
  (``curate MORE_INPUTS --output OUT`` extends it).

The plan is a pure function of the parts' ledgers, which the merge never modifies; only their shard files
move. A crashed merge is therefore resumed by running it again (a planned shard already in OUT counts as
done), and a finished merge recognises its own manifest and does nothing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.io import atomic_write, file_sha256
from common.logging import get_logger, progress
from data_curation.manifest import write_outputs
from data_curation.phash import NearDuplicateIndex
from data_curation.state import LEDGER_NAME, LedgerState, replay_ledger

RUN_KEYS = frozenset({"inputs", "output", "workers", "progress", "salt_file", "merge", "config"})
"""Config keys that may differ between the parts (they do not change what a sample looks like)."""
MARKER = ".merge_in_progress"


class MergeError(ValueError):
    """The parts cannot be merged (the message names the part and the reason)."""


@dataclass
class _Part:
    path: Path
    manifest: dict[str, Any]
    state: LedgerState


@dataclass
class ShardStep:
    """Move (``keep`` None) or rewrite (keeping the samples at ``keep``) one part shard into OUT."""

    src: Path
    name: str
    split: str
    entries: list[list[str]]
    keep: list[int] | None
    src_entries: int
    src_bytes: int
    src_sha256: str


@dataclass
class MergePlan:
    steps: list[ShardStep] = field(default_factory=list)
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    salt_id: str = ""


def merge_fingerprint(parts: list[Path]) -> str:
    """Identity of a merge: the parts in order and their manifests (which the merge never changes)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(str(part).encode() + b"\x00")
        h.update((part / "manifest.json").read_bytes() + b"\x00")
    return h.hexdigest()


def _load_part(path: Path) -> _Part:
    if not (path / "manifest.json").is_file():
        raise MergeError(f"part {path}: no manifest.json: not a curate output, or its curate run has not "
                         f"finished (rerun that part's curate command)")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MergeError(f"part {path}: manifest.json is unreadable: {exc}") from exc
    if not (path / LEDGER_NAME).is_file():
        raise MergeError(f"part {path}: no {LEDGER_NAME}: not a curate output")
    state = replay_ledger(path)
    unfinished = [i for i in state.items if not state.item_done(i)]
    if unfinished:
        raise MergeError(f"part {path}: {len(unfinished)} inputs are not completely written (e.g. "
                         f"{unfinished[0]}): rerun that part's curate command to finish it")
    recorded = sorted(state.shards)
    listed = sorted(s["name"] for s in manifest.get("shards", []))
    if recorded != listed or manifest.get("files_seen") != len(state.items):
        raise MergeError(f"part {path}: manifest.json does not match {LEDGER_NAME} (a later curate run into "
                         f"it stopped early): rerun that part's curate command to finish it")
    temps = [p.name for p in (path / "shards").glob(".tmp-*")] if (path / "shards").is_dir() else []
    if temps:
        raise MergeError(f"part {path}: unfinished shard {temps[0]}: rerun that part's curate command")
    for name, rec in state.shards.items():
        src = path / "shards" / name
        if src.is_file() and src.stat().st_size != rec["bytes"]:
            raise MergeError(f"part {path}: shard {name} has {src.stat().st_size} bytes, the ledger recorded "
                             f"{rec['bytes']}: the part was modified")
    if "salt_id" not in manifest:
        raise MergeError(f"part {path}: manifest.json has no salt_id (made by an older curate): recurate it")
    return _Part(path, manifest, state)


def _check_compatible(parts: list[_Part]) -> None:
    first = parts[0]
    ref = {k: v for k, v in first.manifest.get("config", {}).items() if k not in RUN_KEYS}
    for part in parts[1:]:
        if part.manifest["salt_id"] != first.manifest["salt_id"]:
            raise MergeError(f"part {part.path} was made with a different salt than {first.path} "
                             f"(salt_id {part.manifest['salt_id']} vs {first.manifest['salt_id']}): identity "
                             f"hashes, keys and splits would not agree; recurate it with the same --salt_file")
        cfg = {k: v for k, v in part.manifest.get("config", {}).items() if k not in RUN_KEYS}
        diff = sorted(k for k in set(ref) | set(cfg) if ref.get(k) != cfg.get(k))
        if diff:
            shown = "; ".join(f"{k}: {cfg.get(k)!r} vs {ref.get(k)!r}" for k in diff[:4])
            raise MergeError(f"part {part.path} was curated with other settings than {first.path}: {shown}")


def plan_merge(parts: list[_Part]) -> MergePlan:
    """Which shards go where, which samples are dropped, and the item records of the merged dataset."""
    plan = MergePlan(salt_id=parts[0].manifest["salt_id"])
    owner_part: dict[str, Path] = {}  # item id -> part that contributes it
    seen_paths: set[str] = set()
    seen_hashes: set[str] = set()
    config = parts[0].manifest.get("config", {})
    near = NearDuplicateIndex(int(config.get("near_duplicate_bits", 16))) if config.get("near_duplicates") else None
    next_index: Counter = Counter()
    for part in parts:
        skipped_items: set[str] = set()  # inputs already counted from an earlier part (same path)
        for item_id, rec in part.state.items.items():
            if rec["path"] in seen_paths:
                skipped_items.add(item_id)
                continue
            if item_id in owner_part:
                raise MergeError(f"part {part.path} and part {owner_part[item_id]} both hold an input named "
                                 f"{item_id!r} from different files ({rec['path']} vs "
                                 f"{plan.items[item_id]['path']}): their sample keys would collide; give "
                                 f"the input folders distinct names")
            seen_paths.add(rec["path"])
            owner_part[item_id] = part.path
            plan.items[item_id] = dict(rec, samples=0)
        for name in sorted(part.state.shards):
            rec = part.state.shards[name]
            keep = []
            for i, entry in enumerate(rec["entries"]):
                pixel_hash, item_id = entry[0], entry[1]
                if item_id in skipped_items:
                    continue
                if pixel_hash in seen_hashes:
                    plan.items[item_id]["dup_samples"] = plan.items[item_id].get("dup_samples", 0) + 1
                    continue
                if near is not None and len(entry) > 3:
                    phash, subject = int(entry[2], 16), entry[3]
                    if near.find(phash, subject):  # near duplicate of an earlier part's sample
                        item = plan.items[item_id]
                        item["near_dup_samples"] = item.get("near_dup_samples", 0) + 1
                        continue
                    near.add(phash, subject)
                seen_hashes.add(pixel_hash)
                plan.items[item_id]["samples"] += 1
                keep.append(i)
            if not keep:
                step_name = ""  # nothing left: the part shard is not carried over
            else:
                step_name = f"{rec['split']}-{next_index[rec['split']]:06d}.tar"
                next_index[rec["split"]] += 1
            plan.steps.append(ShardStep(part.path / "shards" / name, step_name, rec["split"],
                                        [rec["entries"][i] for i in keep],
                                        None if len(keep) == len(rec["entries"]) else keep,
                                        len(rec["entries"]), rec["bytes"], rec["sha256"]))
    for rec in plan.items.values():
        if rec["status"] == "used" and rec["samples"] == 0:
            rec.update(status="duplicate", reason="exact duplicate of pixel content written by an earlier part"
                       if not rec.get("near_dup_samples") else
                       "near duplicate (perceptual hash) of images written by an earlier part")
    # The parts' shared settings; their inputs and folders stay in their ledgers (the manifest names no paths).
    plan.config = dict(parts[0].manifest.get("config", {}))
    return plan


def _rewrite(src: Path, dst: Path, keep: list[int], n_entries: int) -> None:
    """Copy the samples at indices ``keep`` of tar ``src`` to ``dst`` (members unchanged)."""
    wanted = set(keep)
    index, current = -1, None
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin:
            key = member.name.split(".", 1)[0]
            if key != current:
                index, current = index + 1, key
            if index in wanted:
                tout.addfile(member, tin.extractfile(member) if member.isfile() else None)
    if index + 1 != n_entries:
        dst.unlink(missing_ok=True)
        raise MergeError(f"shard {src} holds {index + 1} samples, its ledger {n_entries}: the part was modified")


def _move(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copyfile(src, dst)  # another file system: copy, sync, then remove the source
        with open(dst, "rb") as fh:
            os.fsync(fh.fileno())
        src.unlink()


def _execute(step: ShardStep, shard_dir: Path) -> dict[str, Any] | None:
    """Carry one shard over (or find it already carried over); returns its OUT ledger record."""
    if not step.name:
        step.src.unlink(missing_ok=True)
        return None
    final = shard_dir / step.name
    if not final.is_file():
        if not step.src.is_file():
            raise MergeError(f"shard {step.src} is missing and {final} does not exist: a part was modified "
                             f"after a merge began")
        tmp = shard_dir / f".tmp-{step.name}"
        if step.keep is None:
            _move(step.src, tmp)
        else:
            _rewrite(step.src, tmp, step.keep, step.src_entries)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
    step.src.unlink(missing_ok=True)
    size = final.stat().st_size
    if step.keep is None:
        if size != step.src_bytes:
            raise MergeError(f"{final} has {size} bytes, the part's ledger recorded {step.src_bytes}")
        sha = step.src_sha256
    else:
        sha = file_sha256(final)
    return {"t": "shard", "name": step.name, "split": step.split, "samples": len(step.entries), "bytes": size,
            "sha256": sha, "entries": step.entries}


def _finished_merge(out: Path, fingerprint: str) -> dict[str, Any] | None:
    path = out / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("merged_from", {}).get("fingerprint") != fingerprint:
        return None
    missing = [s["name"] for s in manifest["shards"] if not (out / "shards" / s["name"]).is_file()]
    if missing:
        raise MergeError(f"{out} was merged from these parts but its shards {missing[:3]} are missing")
    return manifest


def merge(part_dirs: list[str], output: str, show_progress: bool = True) -> dict[str, Any]:
    """Merge curate outputs ``part_dirs`` into ``output``; returns the merged manifest."""
    log = get_logger("curate")
    if not part_dirs or not output:
        raise MergeError("--merge needs at least one part folder and --output")
    out = Path(output).expanduser().resolve()
    parts = [Path(p).expanduser().resolve() for p in part_dirs]
    for p in parts:
        if p == out or out in p.parents or p in out.parents:
            raise MergeError(f"part {p} and the output {out} must not contain each other")
        if not p.is_dir():
            raise MergeError(f"part {p} does not exist or is not a folder")
    if len(set(parts)) != len(parts):
        raise MergeError(f"a part is given twice: {[str(p) for p, n in Counter(parts).items() if n > 1]}")
    for p in parts:  # before the fingerprint, which reads every manifest
        if not (p / "manifest.json").is_file():
            raise MergeError(f"part {p}: no manifest.json: not a curate output, or its curate run has not "
                             f"finished (rerun that part's curate command)")
    fingerprint = merge_fingerprint(parts)
    done = _finished_merge(out, fingerprint)
    if done is not None:
        (out / MARKER).unlink(missing_ok=True)
        log.info("%s already holds the merge of these %d parts: nothing to do", out, len(parts))
        return done
    marker = out / MARKER
    busy = marker.is_file() and marker.read_text().strip() == fingerprint
    shard_dir = out / "shards"
    if not busy and ((out / "manifest.json").exists() or (out / LEDGER_NAME).exists()
                     or (shard_dir.is_dir() and any(shard_dir.iterdir())) or marker.exists()):
        raise MergeError(f"{out} already holds another curated dataset or an unfinished merge of other parts: "
                         f"merge into a new folder")
    loaded = [_load_part(p) for p in parts]
    _check_compatible(loaded)
    plan = plan_merge(loaded)
    out.mkdir(parents=True, exist_ok=True)
    shard_dir.mkdir(exist_ok=True)
    for tmp in shard_dir.glob(".tmp-*"):
        tmp.unlink()
    atomic_write(marker, lambda p: p.write_text(fingerprint + "\n"))
    state = LedgerState(items=plan.items)
    bar = progress(total=len(plan.steps), desc="merge", unit="shard", disable=not show_progress)
    for step in plan.steps:
        rec = _execute(step, shard_dir)
        bar.update(1)
        if rec is not None:
            state.shards[rec["name"]] = rec
            for entry in rec["entries"]:
                state.record_entry(entry)
    bar.close()
    lines = [*state.shards.values(), *state.items.values()]
    atomic_write(out / LEDGER_NAME, lambda p: p.write_text(
        "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in lines)))
    manifest = write_outputs(out, state, plan.config, {
        "salt_id": plan.salt_id, "merged_from": {"parts": [p.name for p in parts], "fingerprint": fingerprint}})
    marker.unlink()
    log.info("merged %d parts into %s: %d shards, %d samples", len(parts), out, len(state.shards),
             manifest["samples_written"])
    return manifest
