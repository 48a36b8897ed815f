"""Planning: group DICOM series, count NIfTI volumes, chunk npz files, find ImageFolder labels."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from data_curation.config import CurateConfig
from data_curation.discover import InputFile, Rejected
from data_curation.readers import RejectError
from data_curation.readers.dicom import DicomHeader, series_value_range
from data_curation.readers.nifti import nifti_volumes
from data_curation.readers.npz import npz_items
from data_curation.reslice import regular_stack
from data_curation.tasks import NPZ_CHUNK, Task

GIVEN_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class SeriesGroup:
    """Single-frame files of one series with one orientation and size, sorted along the slice normal."""

    paths: list[str]
    headers: list[DicomHeader]
    normal: np.ndarray
    positions: np.ndarray  # (n, 3) ImagePositionPatient, in the order of ``paths``


def series_groups(headers: dict[str, DicomHeader | None]) -> list[SeriesGroup]:
    groups: dict[tuple, list[tuple[float, str]]] = defaultdict(list)
    for path, hdr in headers.items():
        if (hdr is None or hdr.frames != 1 or hdr.mosaic or not hdr.series_uid or hdr.position is None
                or hdr.orientation is None):
            continue
        row, col = np.asarray(hdr.orientation[:3]), np.asarray(hdr.orientation[3:])
        normal = np.cross(row, col)
        groups[(hdr.series_uid, hdr.orientation, hdr.shape)].append((float(np.dot(normal, hdr.position)), path))
    out = []
    for (_, orientation, _), members in groups.items():
        members.sort()
        paths = [path for _, path in members]
        normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
        out.append(SeriesGroup(paths, [headers[p] for p in paths], normal / np.linalg.norm(normal),
                               np.asarray([headers[p].position for p in paths], dtype=float)))
    return out


def series_indices(groups: list[SeriesGroup]) -> dict[str, int]:
    """Slice index of each single-frame file within its series, ordered along the slice normal."""
    index: dict[str, int] = {}
    for g in groups:
        if len(g.paths) < 2:
            continue
        along = [round(float(v), 3) for v in g.positions @ g.normal]
        rank = {p: i for i, p in enumerate(sorted(set(along)))}
        for path, p in zip(g.paths, along):
            index[path] = rank[p]
    return index


def _reslice_refusal(headers: list[DicomHeader], cfg: CurateConfig) -> str | None:
    """Why files with these headers cannot be resliced, as far as their headers tell; None when they can."""
    first = headers[0]
    if first.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return f"not grayscale ({first.photometric or 'no PhotometricInterpretation'})"
    if cfg.reject_burned_in and any(h.burned_in for h in headers):
        return "a slice is flagged BurnedInAnnotation=YES"
    return None


def reslice_plan(g: SeriesGroup, cfg: CurateConfig) -> tuple[dict | None, str | None]:
    """``(reslice task args, None)`` for a series that can be resliced, else ``(None, reason)``."""
    first = g.headers[0]
    if any(h.spacing != first.spacing for h in g.headers) or first.spacing is None:
        return None, "PixelSpacing missing or not the same for all slices"
    if (reason := _reslice_refusal(g.headers, cfg)) is not None:
        return None, reason
    spacing, reason = regular_stack(g.positions, g.normal, min(first.spacing))
    if spacing is None:
        return None, reason
    return {"reslice": {"paths": g.paths, "slice_spacing": spacing}}, None


def _image_label(f: InputFile, classes: dict[str, list[str]]) -> dict:
    parts = PurePath(f.rel).parts[:-1]
    split = GIVEN_SPLITS.get(parts[0].lower()) if parts else None
    class_parts = parts[1:] if split else parts
    args: dict = {"split": split}
    if class_parts:
        name = class_parts[-1]
        args.update(label=classes[f.source].index(name), label_name=name)
    return args


def series_ranges(groups: list[SeriesGroup], cfg: CurateConfig, imap: Callable[..., Iterable[Any]],
                  pending: set[str]) -> dict[str, tuple[float, float]]:
    """With ``--percentile_scope volume``: the percentile range of each percentile-scaled series of two or more
    slices with a file in ``pending`` (``series_value_range`` over the whole series, one series per task of
    ``imap``), for every file of the series."""
    if cfg.percentile_scope != "volume":
        return {}
    multi = [g for g in groups if len(g.paths) >= 2 and not pending.isdisjoint(g.paths)]
    ranges: dict[str, tuple[float, float]] = {}
    for g, value_range in zip(multi, imap(partial(series_value_range, cfg=cfg), [g.paths for g in multi])):
        if value_range is not None:
            ranges.update(dict.fromkeys(g.paths, value_range))
    return ranges


def plan_tasks(files: list[InputFile], cfg: CurateConfig, headers: dict[str, DicomHeader | None],
               groups: list[SeriesGroup], ranges: dict[str, tuple[float, float]], image_modality: str
               ) -> tuple[list[Task], list[Rejected]]:
    """The tasks of ``files``; ``headers`` are the DICOM headers (``read_header``), ``groups`` the series
    (``series_groups``) and ``ranges`` their percentile ranges (``series_ranges``)."""
    tasks: list[Task] = []
    rejects: list[Rejected] = []
    series = series_indices(groups)
    reslices: dict[str, dict] = {}  # first file of a series -> reslice task args, or the reason it is skipped
    if cfg.dicom_reslice:
        for g in groups:
            if len(g.paths) >= 2:
                args, reason = reslice_plan(g, cfg)
                reslices[g.paths[0]] = args if args is not None else {"reslice_skipped": reason}
        for path, h in headers.items():  # an enhanced file is a stack of its own; its frames tell the geometry
            if h is not None and h.enhanced:
                reason = _reslice_refusal([h], cfg)
                reslices[path] = {"reslice": {"frames_of": path}} if reason is None else {"reslice_skipped": reason}
    classes: dict[str, set[str]] = defaultdict(set)
    for f in files:
        if f.kind == "image":
            parts = PurePath(f.rel).parts[:-1]
            class_parts = parts[1:] if parts and parts[0].lower() in GIVEN_SPLITS else parts
            if class_parts:
                classes[f.source].add(class_parts[-1])
    sorted_classes = {k: sorted(v) for k, v in classes.items()}
    for f in files:
        try:
            if f.kind == "dicom":
                extra = reslices.get(f.path, {})
                value_range = {"series_range": ranges[f.path]} if f.path in ranges else {}
                if "reslice" in extra:  # the series' resliced planes are a second task of its first file
                    tasks.append(Task(f, 0, 2, {"series_index": series.get(f.path), **value_range}))
                    tasks.append(Task(f, 1, 2, {**extra, **value_range}))
                else:
                    tasks.append(Task(f, 0, 1, {"series_index": series.get(f.path), **value_range, **extra}))
            elif f.kind == "image":
                tasks.append(Task(f, 0, 1, {"modality": image_modality, **_image_label(f, sorted_classes)}))
            elif f.kind == "nifti":
                n = nifti_volumes(Path(f.path))
                tasks.extend(Task(f, v, n, {"volume": v}) for v in range(n))
            elif f.kind == "npz":
                chunks = [(s, a, min(a + NPZ_CHUNK, n)) for s, n in npz_items(Path(f.path))
                          for a in range(0, n, NPZ_CHUNK)]
                tasks.extend(Task(f, i, len(chunks), {"split": s, "start": a, "stop": b})
                             for i, (s, a, b) in enumerate(chunks))
        except RejectError as exc:
            rejects.append(Rejected(f.item_id, f.path, f.source, exc.reason))
    return tasks, rejects
