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


def _tail(path: Path, parts: int) -> str:
    """The last ``parts`` components of ``path`` joined by "/" (the whole path when it has fewer)."""
    names = [p for p in path.parts if p != path.anchor]
    return "/".join(names[-parts:]) if len(names) >= parts else str(path)


def _overlap(a: str, b: str) -> bool:
    # Item ids are "<source>/<rel>": two sources can produce the same id only when one equals the other or is a
    # path prefix of it ("siteA" and "siteA/scans").
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def source_names(roots: list[Path]) -> list[str | None]:
    """A distinct source name per input root (None for a root given again): its directory or file name, as
    always, unless another root shares that name; then the shortest tail of each such root's resolved path that
    tells them apart ("siteA/scans", "siteB/scans"). The name prefixes every item id, and item ids key the
    samples, the resume ledger and the manifest's per-source counts: two roots under one name would give two
    files one id, whose samples then share a key in the shards (the reader keeps only one of them)."""
    resolved = [r.resolve() for r in roots]
    names: list[str | None] = []
    depth: list[int] = []
    for i, path in enumerate(resolved):
        if path in resolved[:i]:
            names.append(None)
            depth.append(0)
        else:
            names.append(path.name or "root")
            depth.append(1)
    live = [i for i, n in enumerate(names) if n is not None]
    while True:
        # Every root of a clash grows by one component at once, so that each ends up named alike.
        clashing = [i for i in live if any(_overlap(names[i], names[j]) for j in live if j != i)]
        grown = False
        for i in clashing:
            longer = _tail(resolved[i], depth[i] + 1)
            if longer != names[i]:
                names[i], depth[i], grown = longer, depth[i] + 1, True
        if not grown:  # none left, or only whole paths, which clash only when one root holds the other
            return names


def walk_inputs(inputs: list[str], exclude: Path) -> Iterator[InputFile | Rejected]:
    """Recursively list ``inputs`` in sorted order, following symlinks but never looping; a root given twice
    is walked once."""
    exclude = exclude.resolve()
    roots = [Path(root).expanduser() for root in inputs]
    for root_path, source in zip(roots, source_names(roots)):
        if source is None:
            continue
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
