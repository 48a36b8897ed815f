"""Walk the inputs: every regular file becomes an ``InputFile`` or an immediate rejection."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_curation.readers.dicom import looks_like_dicom
from data_curation.readers.image import IMAGE_SUFFIXES
from data_curation.readers.nifti import is_nifti


@dataclass(frozen=True)
class InputFile:
    path: str  # absolute path as walked (may go through symlinks)
    source: str  # name of the input root
    rel: str  # path relative to the input root
    kind: str  # "dicom" | "nifti" | "image" | "npz"

    @property
    def item_id(self) -> str:
        return f"{self.source}/{self.rel}"


@dataclass(frozen=True)
class Rejected:
    item_id: str
    path: str
    source: str
    reason: str


def classify(path: Path) -> str | None:
    name = path.name.lower()
    if is_nifti(path):
        return "nifti"
    if name.endswith(".npz"):
        return "npz"
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "image"
    if looks_like_dicom(path):
        return "dicom"
    return None


def _check_file(path: Path, source: str, rel: str) -> InputFile | Rejected:
    item = f"{source}/{rel}"
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return Rejected(item, str(path), source, f"symlink loop -> {os.readlink(path)}")
            return Rejected(item, str(path), source, f"broken symlink -> {os.readlink(path)}")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as exc:
        return Rejected(item, str(path), source, f"unreadable file: {exc.strerror or exc}")
    if size == 0:
        return Rejected(item, str(path), source, "empty file (0 bytes)")
    kind = classify(path)
    if kind is None:
        return Rejected(item, str(path), source, f"unsupported file type '{path.suffix or path.name}'")
    return InputFile(str(path), source, rel, kind)


def walk_inputs(inputs: list[str], exclude: Path) -> Iterator[InputFile | Rejected]:
    """Recursively list ``inputs`` in sorted order, following symlinks but never looping."""
    exclude = exclude.resolve()
    for root in inputs:
        root_path = Path(root).expanduser()
        source = root_path.resolve().name or "root"
        if root_path.is_file():
            yield _check_file(root_path, source, root_path.name)
            continue
        if not root_path.is_dir():
            yield Rejected(f"{source}/", str(root_path), source, "input does not exist or is not readable")
            continue
        seen: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(root_path, followlinks=True):
            real = os.path.realpath(dirpath)
            rel_dir = os.path.relpath(dirpath, root_path)
            if real in seen or Path(real) == exclude:
                if real in seen:
                    yield Rejected(f"{source}/{rel_dir}", dirpath, source,
                                   f"symlink loop: directory resolves to an already visited {real}")
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames.sort()
            for name in sorted(filenames):
                full = Path(dirpath) / name
                rel = os.path.normpath(os.path.join(rel_dir, name))
                if os.path.islink(full) and os.path.isdir(full):
                    continue  # os.walk lists a looping directory symlink under filenames on some systems
                yield _check_file(full, source, rel)
