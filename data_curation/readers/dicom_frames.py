"""Enhanced multi-frame DICOM (Enhanced CT / MR / PET...): per-frame values and geometry from functional groups.

Such files keep what single-frame files hold at the top level (rescale, window, position, orientation, pixel
spacing) in a shared functional group, overridden frame by frame in the per-frame groups. ``frame_dataset`` gives
the values of one frame; ``frame_stack`` orders the frames along the slice normal, as single-frame series are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom

# Elements an enhanced multi-frame file keeps in its functional groups instead of at the top level, by macro.
_FRAME_MACROS = {
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction"),
}
_IMAGE_PIXEL_KEYWORDS = ("Modality", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
                         "PixelRepresentation", "SOPClassUID")


def _groups(ds: pydicom.Dataset, index: int) -> list[pydicom.Dataset]:
    """Frame ``index``'s functional groups, the shared one first and its own last (the later wins)."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    groups = [shared[0]] if shared else []
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    return groups


def _macro(ds: pydicom.Dataset, index: int, macro: str) -> pydicom.Dataset | None:
    """The item of functional group ``macro`` that applies to frame ``index`` (its own over the shared one)."""
    for group in reversed(_groups(ds, index)):
        if group.get(macro):
            return group[macro][0]
    return None


def frame_dataset(ds: pydicom.Dataset, index: int) -> pydicom.Dataset:
    """The elements that map frame ``index``'s stored values (rescale, window) at the top level, where
    pydicom's modality LUT and our gray mapping read them: ``ds`` itself for a file without functional groups;
    for an enhanced multi-frame file the shared functional groups overridden by the frame's own. Without this an
    Enhanced CT was scaled from raw stored values by percentiles, not in HU."""
    if "SharedFunctionalGroupsSequence" not in ds and "PerFrameFunctionalGroupsSequence" not in ds:
        return ds
    out = pydicom.Dataset()
    for keyword in _IMAGE_PIXEL_KEYWORDS:
        if keyword in ds:
            setattr(out, keyword, ds[keyword].value)
    for macro, keywords in _FRAME_MACROS.items():
        item = _macro(ds, index, macro)
        for keyword in keywords:
            if item is not None and keyword in item:
                setattr(out, keyword, item[keyword].value)
    return out


@dataclass(frozen=True)
class FrameStack:
    """The frames of an enhanced multi-frame file in one orientation, sorted along the slice normal."""

    order: list[int]  # frame indices, sorted along the normal (frames at one position keep their file order)
    slice_index: list[int]  # rank of each ordered frame's distinct position: its index along the normal
    positions: np.ndarray  # (frames, 3) ImagePositionPatient of the ordered frames
    axes: np.ndarray  # (3, 3) patient directions of the slice normal, the row index and the column index
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) in mm, when every frame has one


def _floats(item: pydicom.Dataset | None, keyword: str, count: int) -> tuple[float, ...] | None:
    value = item.get(keyword) if item is not None else None
    if value is None or len(value) != count:
        return None
    return tuple(float(v) for v in value)


def frame_pixel_spacing(ds: pydicom.Dataset, index: int) -> tuple[float, float] | None:
    """PixelSpacing of frame ``index`` from the pixel-measures functional group, None without one."""
    return _floats(_macro(ds, index, "PixelMeasuresSequence"), "PixelSpacing", 2)


def frame_stack(ds: pydicom.Dataset) -> FrameStack | None:
    """The geometric order of an enhanced multi-frame file's frames, or None when the file does not give every
    frame a position and one common orientation (classic multi-frame files, several stacks in one file): such
    frames keep their file order."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames < 2 or "PerFrameFunctionalGroupsSequence" not in ds:
        return None
    positions, orientations, spacings = [], set(), set()
    for i in range(frames):
        position = _floats(_macro(ds, i, "PlanePositionSequence"), "ImagePositionPatient", 3)
        orientation = _floats(_macro(ds, i, "PlaneOrientationSequence"), "ImageOrientationPatient", 6)
        if position is None or orientation is None:
            return None
        positions.append(position)
        orientations.add(orientation)
        spacings.add(frame_pixel_spacing(ds, i))
    if len(orientations) != 1:
        return None
    orientation = np.asarray(orientations.pop())
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if not np.linalg.norm(normal) > 1e-6:
        return None
    normal /= np.linalg.norm(normal)
    along = np.round(np.asarray(positions) @ normal, 3)
    order = sorted(range(frames), key=lambda i: along[i])  # stable: frames at one position keep file order
    rank = {v: k for k, v in enumerate(sorted(set(along.tolist())))}
    spacing = spacings.pop() if len(spacings) == 1 else None
    return FrameStack(order, [rank[float(along[i])] for i in order], np.asarray(positions)[order],
                      np.stack([normal, col_dir, row_dir]), spacing)
