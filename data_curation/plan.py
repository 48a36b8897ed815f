"""Planning: group DICOM series, count NIfTI volumes, chunk npz files, find ImageFolder labels."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path, PurePath

import numpy as np

from data_curation.config import CurateConfig
from data_curation.discover import InputFile, Rejected
from data_curation.readers import RejectError
from data_curation.readers.dicom import DicomHeader
from data_curation.readers.nifti import nifti_volumes
from data_curation.readers.npz import npz_items
from data_curation.tasks import NPZ_CHUNK, Task

GIVEN_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def series_indices(headers: dict[str, DicomHeader | None]) -> dict[str, int]:
    """Slice index of each single-frame file within its series, ordered along the slice normal."""
    groups: dict[tuple, list[tuple[float, str]]] = defaultdict(list)
    for path, hdr in headers.items():
        if hdr is None or hdr.frames != 1 or not hdr.series_uid or hdr.position is None or hdr.orientation is None:
            continue
        row, col = np.asarray(hdr.orientation[:3]), np.asarray(hdr.orientation[3:])
        normal = np.cross(row, col)
        groups[(hdr.series_uid, hdr.orientation, hdr.shape)].append((float(np.dot(normal, hdr.position)), path))
    index: dict[str, int] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        positions = sorted({round(p, 3) for p, _ in members})
        rank = {p: i for i, p in enumerate(positions)}
        for p, path in members:
            index[path] = rank[round(p, 3)]
    return index


def _image_label(f: InputFile, classes: dict[str, list[str]]) -> dict:
    parts = PurePath(f.rel).parts[:-1]
    split = GIVEN_SPLITS.get(parts[0].lower()) if parts else None
    class_parts = parts[1:] if split else parts
    args: dict = {"split": split}
    if class_parts:
        name = class_parts[-1]
        args.update(label=classes[f.source].index(name), label_name=name)
    return args


def plan_tasks(files: list[InputFile], cfg: CurateConfig, headers: dict[str, DicomHeader | None],
               image_modality: str) -> tuple[list[Task], list[Rejected]]:
    tasks: list[Task] = []
    rejects: list[Rejected] = []
    series = series_indices(headers)
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
                tasks.append(Task(f, 0, 1, {"series_index": series.get(f.path)}))
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
