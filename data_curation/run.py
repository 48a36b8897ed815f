"""One curation run: walk, plan, process in worker processes, write shards, ledger and manifest."""

from __future__ import annotations

import multiprocessing
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from common.config import config_to_dict
from common.logging import get_logger, progress
from data_curation.config import CurateConfig
from data_curation.deid import load_salt, salt_fingerprint, source_label
from data_curation.discover import InputFile, Rejected, walk_inputs
from data_curation.manifest import write_outputs
from data_curation.plan import plan_tasks, series_groups, series_ranges
from data_curation.readers.dicom import read_header
from data_curation.reslice import PLANES
from data_curation.state import Ledger, LedgerState, load_ledger
from data_curation.tasks import SUBJECT_KEYS, TaskResult, run_task
from data_curation.writer import ShardSink


def _reject_record(r: Rejected, label: Callable[[str], str]) -> dict[str, Any]:
    return {"t": "item", "id": r.item_id, "path": r.path, "source": r.source, "source_id": label(r.source),
            "status": "rejected", "reason": r.reason, "modality": None, "samples": 0, "dup_samples": 0,
            "skipped": 0}


class _ItemAssembler:
    """Collects the task results of an item; commits the item once all its parts have arrived."""

    def __init__(self, state: LedgerState, ledger: Ledger, sink: ShardSink, files: dict[str, InputFile],
                 label: Callable[[str], str]):
        self.state, self.ledger, self.sink, self.files, self.label = state, ledger, sink, files, label
        self.pending: dict[str, list[TaskResult]] = {}
        self.per_subject: Counter = Counter()  # samples written by this run, per subject hash

    def add(self, res: TaskResult) -> None:
        parts = self.pending.setdefault(res.item_id, [])
        parts.append(res)
        if len(parts) == res.parts:
            self._commit(self.pending.pop(res.item_id))

    def _commit(self, parts: list[TaskResult]) -> None:
        f = self.files[parts[0].item_id]
        parts.sort(key=lambda r: r.part)
        skipped = sum(r.stats.get("slices_skipped_background", 0) for r in parts)
        rec = {"t": "item", "id": f.item_id, "path": f.path, "source": f.source, "source_id": self.label(f.source),
               "reason": None,
               "modality": next((r.modality for r in parts if r.modality), None), "skipped": skipped}
        resliced = sum(len(r.samples) for r in parts if f.kind == "dicom" and r.part > 0)
        note = next((r.note for r in parts if r.note), None)
        if resliced or note:  # the first file of a series carries the series' reslice
            rec.update(resliced=resliced, reslice_note=note)
            if note:
                get_logger("curate").warning("%s: series not resliced: %s", f.path, note)
        reject = next((r.reject for r in parts if r.reject), None)
        samples = dup = near = 0
        if reject is None:
            seen_here: set[str] = set()
            for r in parts:
                for s in r.samples:
                    owner = self.state.hash_owner.get(s.pixel_hash)
                    if s.pixel_hash in seen_here or (owner is not None and owner != f.item_id):
                        dup += 1
                        continue
                    if (owner is None and s.phash is not None and self.state.near is not None
                            and self.state.near.find(s.phash, s.subject)):
                        near += 1
                        continue
                    seen_here.add(s.pixel_hash)
                    samples += 1
                    if owner is None:  # owner == this item: already in a recorded shard from an earlier run
                        self.sink.write(s, f.item_id)
                        self.per_subject[s.subject] += 1
        if reject is not None:
            rec.update(status="rejected", reason=reject)
        elif samples:
            rec.update(status="used")
        elif dup or near:
            rec.update(status="duplicate", reason="exact duplicate of pixel content already written" if not near
                       else "near duplicate (perceptual hash) of images already written")
        else:
            rec.update(status="rejected", reason=f"no usable slices ({skipped} background slices skipped)")
        rec.update(samples=samples, dup_samples=dup)
        if near:
            rec["near_dup_samples"] = near
        self.ledger.append(rec)
        self.state.items[f.item_id] = rec


# A run whose samples are at least this many, this share of them from one subject, is worth a warning.
ONE_SUBJECT_MIN_SAMPLES, ONE_SUBJECT_SHARE = 200, 0.8


def _warn_if_one_subject(per_subject: Counter, subject_key: str) -> None:
    """Every sample of a subject goes to one split: if nearly all of a run's samples share a subject (a PatientID
    blanked to one value by an anonymiser, say), the split is not the one asked for. Says so, with the remedy."""
    total = sum(per_subject.values())
    if total < ONE_SUBJECT_MIN_SAMPLES or not per_subject:
        return
    largest = max(per_subject.values())
    if largest >= ONE_SUBJECT_SHARE * total:
        finer = {"patient": "study", "study": "series"}.get(subject_key)
        remedy = f"; if they are not one {subject_key}, rerun into a new output with --subject_key {finer}" \
            if finer else ""
        get_logger("curate").warning("%d of the %d samples written belong to one subject (--subject_key %s), so "
                                     "they all land in one split%s", largest, total, subject_key, remedy)


def _mapper(workers: int) -> tuple[Any, Any]:
    if workers <= 1:
        return None, map
    # fork on Linux: workers start with the readers already imported (spawn costs each worker ~0.5 CPU-s
    # of imports); curate imports no threaded library (no torch) before the pool starts
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    pool = multiprocessing.get_context(method).Pool(workers)
    return pool, partial(pool.imap, chunksize=4)


def curate(cfg: CurateConfig) -> dict[str, Any]:
    """Run (or resume) curation into ``cfg.output``; returns the manifest."""
    log = get_logger("curate")
    if not cfg.inputs or not cfg.output:
        raise ValueError("curate needs at least one input and --output")
    if cfg.subject_key not in SUBJECT_KEYS:
        raise ValueError(f"--subject_key must be one of {', '.join(SUBJECT_KEYS)}, got {cfg.subject_key!r}")
    unknown = [p for p in cfg.dicom_reslice if p not in PLANES]
    if unknown:
        raise ValueError(f"--dicom_reslice: unknown plane(s) {unknown} (use {sorted(PLANES)})")
    out = Path(cfg.output).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    salt, salt_where = load_salt(cfg.salt_file, out)
    log.info("identity hashes keyed with the salt from %s (never written to %s)", salt_where, out)
    state = load_ledger(out, cfg.near_duplicate_bits if cfg.near_duplicates else None)
    ledger = Ledger(out)
    sink = ShardSink(out, state, ledger, cfg.shard_maxcount, cfg.shard_maxsize)
    todo: list[InputFile] = []
    # Every DICOM file of the inputs, curated before or not: a resumed run plans each series whole, so its
    # remaining slices get the slice indices and percentile range that an uninterrupted run gives them.
    dicoms: list[str] = []
    already = 0
    # The ledger keeps both names (operator-only); shards and the manifest get the label (deid.source_label).
    label = partial(source_label, salt, public=cfg.public_source_names)
    roots = {Path(i).expanduser() for i in cfg.inputs}
    for entry in walk_inputs(list(cfg.inputs), out):
        if isinstance(entry, InputFile) and entry.kind == "dicom":
            dicoms.append(entry.path)
        if state.item_done(entry.item_id):
            already += 1
            continue
        if isinstance(entry, Rejected):
            if Path(entry.path) in roots and not Path(entry.path).exists():  # a whole input, not one of its files
                log.warning("input %s does not exist (recorded in rejects.jsonl)", entry.path)
            ledger.append(rec := _reject_record(entry, label))
            state.items[entry.item_id] = rec
        else:
            todo.append(entry)
    pool, imap = _mapper(cfg.workers)
    try:
        pending = {f.path for f in todo if f.kind == "dicom"}
        if not pending:  # nothing of the DICOM files left to plan
            dicoms = []
        headers = dict(zip(dicoms, imap(read_header, dicoms)))
        groups = series_groups(headers)
        ranges = series_ranges(groups, cfg, imap, pending)
        tasks, plan_rejects = plan_tasks(todo, cfg, headers, groups, ranges, cfg.image_modality)
        for r in plan_rejects:
            ledger.append(rec := _reject_record(r, label))
            state.items[r.item_id] = rec
        log.info("%d new or unfinished inputs -> %d tasks (%d already curated)", len(todo), len(tasks),
                 already)
        assembler = _ItemAssembler(state, ledger, sink, {f.item_id: f for f in todo}, label)
        results: Iterable[TaskResult] = imap(partial(run_task, cfg=cfg, salt=salt), tasks)
        for res in _bar(results, len(tasks), cfg.progress):
            assembler.add(res)
        _warn_if_one_subject(assembler.per_subject, cfg.subject_key)
    finally:
        if pool is not None:
            pool.terminate()
        sink.close()
        ledger.close()
    return write_outputs(out, state, config_to_dict(cfg), {"salt_id": salt_fingerprint(salt)})


def _bar(results: Iterable[TaskResult], total: int, enabled: bool) -> Iterator[TaskResult]:
    bar = progress(total=total, desc="curate", unit="task", disable=not enabled)
    samples = 0
    for res in results:
        samples += len(res.samples)
        bar.update(1)
        bar.set_postfix(samples=samples, refresh=False)
        yield res
    bar.close()
