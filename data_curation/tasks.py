"""Work units: planning inputs into picklable tasks, and running one task in a worker process."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_curation.config import CurateConfig
from data_curation.deid import allowlisted, salted_hash, source_label, split_for_subject
from data_curation.discover import InputFile
from data_curation.format import encode_image, encode_meta
from data_curation.intensity import resize, target_size
from data_curation.phash import perceptual_hash
from data_curation.readers import Identity, RejectError, Slice
from data_curation.readers.dicom import read_dicom
from data_curation.readers.dicom_series import read_frames_resliced, read_series_resliced
from data_curation.readers.image import read_image
from data_curation.readers.nifti import read_nifti
from data_curation.readers.npz import read_npz

NPZ_CHUNK = 2000  # npz items per task


@dataclass
class Task:
    file: InputFile
    part: int  # index of this task among the item's tasks
    parts: int  # number of tasks for the item (results are combined before anything is written)
    args: dict[str, Any] = field(default_factory=dict)  # reader-specific: volume, split range, label, ...


@dataclass
class EncodedSample:
    key: str
    ext: str
    data: bytes
    meta: bytes
    split: str
    pixel_hash: str
    phash: int | None = None  # perceptual hash (--near_duplicates)
    subject: str = ""  # salted subject hash: near duplicates are looked for across subjects only


@dataclass
class TaskResult:
    item_id: str
    part: int
    parts: int
    modality: str | None = None
    samples: list[EncodedSample] = field(default_factory=list)
    reject: str | None = None
    stats: dict[str, int] = field(default_factory=dict)
    note: str | None = None  # why an optional extra (a series reslice) was not produced; the file is fine


def _pixel_hash(img: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.shape}{img.dtype}".encode())
    h.update(np.ascontiguousarray(img).data)  # the buffer itself: no bytes copy
    return h.hexdigest()


SUBJECT_KEYS = ("patient", "study", "series")


def subject_of(ident: Identity, key: str) -> str:
    """The identity value that defines a subject under ``--subject_key`` (the finer keys fall back to the coarser
    ones where a file lacks them; non-DICOM inputs have only ``subject``, their file or given subject)."""
    if key == "series":
        return ident.series or ident.study or ident.subject
    if key == "study":
        return ident.study or ident.subject
    return ident.subject


def _finish(slice_: Slice, ident: Identity, task: Task, cfg: CurateConfig, salt: bytes) -> EncodedSample:
    """Size policy, identity hashes, split, label -> an encoded, allowlisted sample."""
    img = slice_.image
    h, w = img.shape[:2]
    if min(h, w) < cfg.min_size:
        raise RejectError(f"image too small ({h}x{w}, minimum side {cfg.min_size})")
    size = target_size(h, w, cfg.size_policy)
    img = resize(img, size)
    meta = dict(slice_.meta)
    if meta.get("spacing") and size != (h, w):
        meta["spacing"] = [meta["spacing"][0] * h / size[0], meta["spacing"][1] * w / size[1]]
    subject = salted_hash(salt, "subject", subject_of(ident, cfg.subject_key))
    split = slice_.split or task.args.get("split") or split_for_subject(salt, subject, list(cfg.split_fractions))
    meta.update(
        split=split, subject=subject,
        study=salted_hash(salt, "study", ident.study) if ident.study else None,
        series=salted_hash(salt, "series", ident.series) if ident.series else None,
        source=source_label(salt, task.file.source, cfg.public_source_names), size=list(img.shape[:2]),
    )
    meta.setdefault("label", task.args.get("label"))
    meta.setdefault("label_name", task.args.get("label_name"))
    ext, data = encode_image(img, cfg.png_compress_level)
    key = salted_hash(salt, "key", task.file.item_id, slice_.key, digest_size=16)
    phash = perceptual_hash(img) if cfg.near_duplicates else None
    return EncodedSample(key, ext, data, encode_meta(allowlisted(meta)), split, _pixel_hash(img), phash, subject)


def _slices(task: Task, cfg: CurateConfig, stats: dict[str, int]) -> Iterator[tuple[Identity, Slice]]:
    path = Path(task.file.path)
    kind = task.file.kind
    if kind == "npz":
        a = task.args
        for subject, sl in read_npz(path, cfg, a["split"], a["start"], a["stop"], stats):
            yield Identity(subject=subject), sl
        return
    if kind == "dicom" and "reslice" in task.args:
        r = task.args["reslice"]
        if "frames_of" in r:
            ident, it = read_frames_resliced(Path(r["frames_of"]), cfg, stats)
        else:
            ident, it = read_series_resliced(r["paths"], r["slice_spacing"], cfg, stats, task.args.get("series_range"))
    elif kind == "dicom":
        ident, it = read_dicom(path, cfg, stats, task.args.get("series_index"), task.args.get("series_range"))
    elif kind == "nifti":
        ident, it = read_nifti(path, cfg, task.args.get("volume", 0), stats)
    elif kind == "image":
        ident, it = read_image(path, cfg, task.args.get("modality", "OT"))
    else:
        raise RejectError(f"no reader for kind '{kind}'")
    for sl in it:
        yield ident, sl


def run_task(task: Task, cfg: CurateConfig, salt: bytes) -> TaskResult:
    """Read, map and encode one task's slices. Never raises for bad input: the reason is returned."""
    result = TaskResult(task.file.item_id, task.part, task.parts, note=task.args.get("reslice_skipped"))
    try:
        for ident, sl in _slices(task, cfg, result.stats):
            result.modality = sl.meta.get("modality")
            result.samples.append(_finish(sl, ident, task, cfg, salt))
    except RejectError as exc:
        result.samples, result.reject = [], exc.reason
    except MemoryError:
        result.samples, result.reject = [], "out of memory while reading"
    except Exception as exc:  # noqa: BLE001 - one broken input must not stop the run; the reason is logged
        result.samples, result.reject = [], f"unexpected error: {type(exc).__name__}: {str(exc)[:200]}"
    if result.reject is not None and "reslice" in task.args:
        # the series' own files are curated by their own tasks; a failed reslice only loses the extra planes
        result.note, result.reject = f"reslice failed: {result.reject}", None
    return result
