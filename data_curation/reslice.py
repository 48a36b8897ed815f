"""Reslicing a stack of parallel 2D slices along its other two axes, with bounded memory.

Slices are appended one at a time, in stack order, to a float32 file on disk (``VolumeFile``), so the
volume never sits in memory. Planes along another axis are read back in slabs of at most a given number
of bytes: a slab of coronal-like planes (fixed row) is one contiguous run of rows per slice; a slab of
sagittal-like planes (fixed column) reads each slice whole and keeps the slab's columns. Peak memory is
therefore one slab plus one slice, whatever the number of slices.

Geometry: volume axis 0 runs along the stack normal (positions increasing), axis 1 along the image
column direction (row index), axis 2 along the image row direction (column index); ``plane_layout`` maps
a named anatomical plane onto these axes with the usual display orientation.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Display convention of each plane in patient (LPS) coordinates: (normal, direction of increasing column,
# direction of increasing row). Axial: patient left to the image right, anterior up; coronal and sagittal:
# superior up, patient left resp. posterior to the image right (the DICOM standard orientations).
PLANES: dict[str, tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]] = {
    "axial": ((0, 0, 1), (1, 0, 0), (0, 1, 0)),
    "coronal": ((0, 1, 0), (1, 0, 0), (0, 0, -1)),
    "sagittal": ((1, 0, 0), (0, 1, 0), (0, 0, -1)),
}


@dataclass(frozen=True)
class PlaneLayout:
    """How to cut planes of one anatomical orientation out of a (slice, row, column) volume."""

    axis: int  # volume axis held fixed (1 or 2; 0 would be the native slices)
    rows_axis: int  # volume axis that becomes the image rows
    flip_rows: bool
    flip_cols: bool
    flip_index: bool  # iterate the fixed axis backwards so that slice_index grows along the plane normal


def plane_layout(plane: str, axes: np.ndarray) -> PlaneLayout | None:
    """Layout for ``plane`` given the patient directions (3x3, one row per volume axis); None when the
    plane is the native slice plane (nothing to reslice)."""
    normal, col_dir, row_dir = (np.asarray(v, dtype=float) for v in PLANES[plane])
    fixed = int(np.argmax(np.abs(axes @ normal)))
    if fixed == 0:
        return None
    rest = [a for a in (0, 1, 2) if a != fixed]
    rows_axis = max(rest, key=lambda a: abs(float(axes[a] @ row_dir)))
    cols_axis = rest[0] if rows_axis == rest[1] else rest[1]
    return PlaneLayout(fixed, rows_axis, bool(axes[rows_axis] @ row_dir < 0), bool(axes[cols_axis] @ col_dir < 0),
                       bool(axes[fixed] @ normal < 0))


class VolumeFile:
    """A (slices, rows, cols) float32 volume written slice by slice to a temporary file."""

    def __init__(self, rows: int, cols: int, directory: str | None = None):
        self.rows, self.cols, self.slices = rows, cols, 0
        fd, name = tempfile.mkstemp(prefix="scanmae-reslice-", suffix=".f32", dir=directory)
        self.path = Path(name)
        self._fh = os.fdopen(fd, "w+b")
        self.max_read_bytes = 0  # largest slab read so far (the memory bound is checked by tests)

    def append(self, plane: np.ndarray) -> None:
        if plane.shape != (self.rows, self.cols):
            raise ValueError(f"slice shape {plane.shape} differs from {(self.rows, self.cols)}")
        self._fh.write(np.ascontiguousarray(plane, dtype=np.float32).data)
        self.slices += 1

    def _read(self, offset: int, count: int) -> np.ndarray:
        self._fh.seek(offset * 4)
        out = np.fromfile(self._fh, dtype=np.float32, count=count)
        if out.size != count:
            raise OSError(f"{self.path}: short read ({out.size} of {count} values)")
        return out

    def slabs(self, axis: int, max_bytes: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, slab)`` with slab = volume[:, start:stop, :] (axis 1) or volume[:, :, start:stop]
        (axis 2), each slab at most ``max_bytes`` (at least one plane)."""
        self._fh.flush()
        per_plane = self.slices * (self.cols if axis == 1 else self.rows) * 4
        length = self.rows if axis == 1 else self.cols
        step = max(1, min(length, max_bytes // per_plane))
        for start in range(0, length, step):
            stop = min(length, start + step)
            shape = (self.slices, stop - start, self.cols) if axis == 1 else (self.slices, self.rows, stop - start)
            slab = np.empty(shape, np.float32)
            self.max_read_bytes = max(self.max_read_bytes, slab.nbytes)
            for s in range(self.slices):
                base = s * self.rows * self.cols
                if axis == 1:  # rows start:stop of slice s are contiguous
                    slab[s] = self._read(base + start * self.cols, (stop - start) * self.cols).reshape(
                        stop - start, self.cols)
                else:  # columns: read the slice, keep the slab's columns
                    slab[s] = self._read(base, self.rows * self.cols).reshape(self.rows, self.cols)[:, start:stop]
            yield start, slab
            del slab  # so that the next slab is not allocated while this one is still referenced here

    def close(self) -> None:
        self._fh.close()
        self.path.unlink(missing_ok=True)


def cut_plane(slab: np.ndarray, index: int, layout: PlaneLayout) -> np.ndarray:
    """Plane ``index`` (within the slab) in display orientation: rows and columns as ``layout`` says."""
    plane = np.take(slab, index, axis=layout.axis)  # remaining axes in increasing order
    rest = [a for a in (0, 1, 2) if a != layout.axis]
    if layout.rows_axis != rest[0]:
        plane = plane.T
    if layout.flip_rows:
        plane = plane[::-1]
    if layout.flip_cols:
        plane = plane[:, ::-1]
    return np.ascontiguousarray(plane)


def isotropic_shape(shape: tuple[int, int], spacing: tuple[float, float]) -> tuple[tuple[int, int], float]:
    """``((rows, cols), pixel)``: the shape with square pixels of the finer of the two spacings (the finer
    axis keeps its samples, the coarser one is resampled)."""
    target = min(spacing)
    rows = max(1, round(shape[0] * spacing[0] / target))
    cols = max(1, round(shape[1] * spacing[1] / target))
    return (rows, cols), target


def regular_stack(positions: np.ndarray, normal: np.ndarray, pixel: float, tolerance: float = 0.1
                  ) -> tuple[float | None, str | None]:
    """``(slice spacing, None)`` for positions (sorted along ``normal``) that form a regular stack, else
    ``(None, reason)``: repeated positions, uneven spacing or a sheared (tilted) stack."""
    along = positions @ normal
    gaps = np.diff(along)
    if gaps.size == 0:
        return None, "a single slice"
    if np.any(gaps < 1e-3):
        return None, f"{int(np.sum(gaps < 1e-3)) + 1} slices share a position (several copies of one slice?)"
    spacing = float(np.median(gaps))
    if np.max(np.abs(gaps - spacing)) > tolerance * spacing:
        return None, f"uneven slice spacing ({gaps.min():.3g}-{gaps.max():.3g} mm): missing slices?"
    offsets = positions - positions[0]
    shear = offsets - np.outer(offsets @ normal, normal)
    if np.max(np.linalg.norm(shear, axis=1)) > 0.5 * pixel:  # the stack would be sheared by half a pixel
        return None, "slice positions drift in-plane (gantry tilt or a non-parallel stack)"
    if not math.isfinite(spacing):
        return None, "non-finite slice positions"
    return spacing, None
