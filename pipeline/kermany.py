"""Kermany pediatric chest X-ray as a CSV (path,label,split) with a deterministic patient-level val split.

The released set has only train/ and test/; linprobe / finetune need a validation split for model selection,
and images of one patient must not sit on both sides of it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from pathlib import Path

from common.io import atomic_write_text

KERMANY_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
# Patient id from the file names of the Kermany release: ``person<N>_<bacteria|virus>_<image>`` (all images of
# person N, bacterial or viral), ``IM-<patient>-<image>[-<part>]`` and ``NORMAL2-IM-<patient>-<image>[-<part>]``
# (a second batch with its own patient numbering, kept as a separate namespace).
KERMANY_PATIENT_PATTERNS = (re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+$"),
                            re.compile(r"^((?:NORMAL\d+-)?IM-\d+)-\d+(?:-\d+)?$"))


def kermany_patient_id(file_name: str) -> str:
    """``person1_bacteria_1.jpeg`` -> ``person1``; ``IM-0122-0001.jpeg`` -> ``IM-0122``."""
    stem = Path(file_name).stem
    for pattern in KERMANY_PATIENT_PATTERNS:
        match = pattern.match(stem)
        if match:
            return match.group(1)
    raise ValueError(f"{file_name}: no patient id in the file name (expected person<N>_bacteria|virus_<M> or "
                     f"[NORMAL<k>-]IM-<patient>-<image>)")


def _class_images(split_dir: Path) -> list[tuple[Path, str]]:
    if not split_dir.is_dir():
        raise ValueError(f"{split_dir}: missing (a Kermany folder holds train/<class>/ and test/<class>/)")
    items = [(f, class_dir.name) for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir())
             for f in sorted(class_dir.iterdir()) if f.suffix.lower() in KERMANY_IMAGE_SUFFIXES]
    if not items:
        raise ValueError(f"{split_dir}: no images in its class folders")
    return items


def patient_split(items: list[tuple[Path, str]], val_fraction: float, seed: int) -> dict[Path, str]:
    """``train`` / ``val`` per image, whole patients at a time, stratified by class.

    Within each class the patients are ordered by a hash of (seed, patient id), which depends on nothing else
    (no file order, no Python hash seed), and taken into val until val holds ``val_fraction`` of the class's
    images. A patient with images in several classes is one unit of its own stratum.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    patients: dict[str, list[tuple[Path, str]]] = {}
    for file, label in items:
        patients.setdefault(kermany_patient_id(file.name), []).append((file, label))
    strata: dict[str, list[str]] = {}
    for pid, images in patients.items():
        strata.setdefault(";".join(sorted({label for _, label in images})), []).append(pid)
    split = {}
    for _, pids in sorted(strata.items()):
        pids.sort(key=lambda pid: hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest())
        want = val_fraction * sum(len(patients[pid]) for pid in pids)
        taken = 0
        for pid in pids:
            part = "val" if taken < want and len(pids) > 1 else "train"
            taken += len(patients[pid]) if part == "val" else 0
            split.update((file, part) for file, _ in patients[pid])
    return split


def write_kermany_csv(src: Path, out_csv: Path, val_fraction: float, seed: int = 0) -> dict[str, int]:
    """``path,label,split`` rows for ``src/train`` (split by patient into train / val) and ``src/test`` (as is).

    Paths are written relative to the CSV's folder, which is how ``common.data`` resolves them. Returns the
    number of images per split.
    """
    out_csv = out_csv.resolve()
    train = _class_images(src / "train")
    test = _class_images(src / "test")
    split = patient_split(train, val_fraction, seed)
    rows = [(f, label, split[f]) for f, label in train] + [(f, label, "test") for f, label in test]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "split"])
    for file, label, part in rows:
        writer.writerow([os.path.relpath(file.resolve(), out_csv.parent), label, part])
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_csv, buffer.getvalue())
    return {part: sum(r[2] == part for r in rows) for part in ("train", "val", "test")}
