"""A DICOM series, or an enhanced multi-frame file, resliced along other planes (``--dicom_reslice coronal
sagittal``).

The files arrive sorted along the slice normal (planned from their headers, which also proved that they
form a regular, unsheared stack). Each slice is decoded, converted to modality values (HU for CT; each
file's own rescale) and appended to a float32 volume file on disk; then the requested planes are cut out
in slabs of at most ``--reslice_memory_mb`` and mapped exactly as native slices are (same CT windows, the
first file's window / VOI LUT; with ``--percentile_scope volume`` percentile scaling by the range planned for
the series' native slices, so that both agree). With ``--dicom_reslice_isotropic`` the slice axis is resampled
to the in-plane pixel spacing. An enhanced multi-frame file is the same with frames for files: they are
ordered along the normal from their functional groups (``frame_stack``), which must form a regular stack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

from data_curation.config import CurateConfig
from data_curation.intensity import resize, target_size
from data_curation.readers import Identity, RejectError, Slice, skip_background
from data_curation.readers.dicom import (
    decode_frame,
    frames_value_range,
    identity_of,
    open_dataset,
    series_value_range,
)
from data_curation.readers.dicom_frames import frame_dataset, frame_stack
from data_curation.readers.dicom_gray import GrayMapping, apply_mapping, gray_mapping, with_range
from data_curation.reslice import PLANES, VolumeFile, cut_plane, isotropic_shape, plane_layout, regular_stack


def _geometry(ds: pydicom.Dataset) -> tuple[np.ndarray, tuple[float, float]]:
    """Patient directions of the volume axes (slice normal, row index, column index) and PixelSpacing."""
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    axes = np.stack([normal / np.linalg.norm(normal), col_dir, row_dir])
    return axes, (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))


def _stream_volume(paths: list[str]) -> tuple[pydicom.Dataset, VolumeFile, str]:
    """Decode every slice into a volume file; returns the first dataset, the volume and the stored dtype. The
    volume file is removed again if anything fails."""
    first, vol = None, None
    dtype = ""
    try:
        for path in paths:
            ds = open_dataset(Path(path))
            raw = decode_frame(ds, None)
            if raw.ndim != 2:
                raise RejectError(f"{Path(path).name}: not a grayscale slice (shape {raw.shape})")
            if first is None:
                first, dtype = ds, str(raw.dtype)
                vol = VolumeFile(*raw.shape)
            elif str(ds.get("SeriesInstanceUID", "")) != str(first.get("SeriesInstanceUID", "")):
                raise RejectError(f"{Path(path).name} changed since planning (another series)")
            vol.append(apply_modality_lut(raw, ds).astype(np.float32))  # raises for a slice of another size
    except BaseException:
        if vol is not None:
            vol.close()
        raise
    return first, vol, dtype


def _mapper(m: GrayMapping, ds: pydicom.Dataset, paths: list[str], cfg: CurateConfig,
            series_range: tuple[float, float] | None):  # noqa: ANN202
    """values plane -> (image, channel names, normalization), as for native slices of this series: with
    ``--percentile_scope volume`` the series' range, the planned ``series_range`` (the native slices' own) or,
    when none was planned, the same computed here."""
    if m.kind == "percentile" and cfg.percentile_scope == "volume":
        m = with_range(m, series_range or series_value_range(paths, cfg), "series")
    return lambda values: apply_mapping(values, m, ds, None)


def _check_planes(cfg: CurateConfig) -> None:
    for plane in cfg.dicom_reslice:
        if plane not in PLANES:
            raise RejectError(f"unknown reslice plane '{plane}' (use {sorted(PLANES)})")


def read_series_resliced(paths: list[str], slice_spacing: float, cfg: CurateConfig, stats: dict[str, int],
                         series_range: tuple[float, float] | None = None) -> tuple[Identity, Iterator[Slice]]:
    """Identity of the series plus a lazy iterator over its resliced planes (the volume file is removed
    when the iterator finishes or is closed)."""
    _check_planes(cfg)
    ds0, vol, dtype = _stream_volume(paths)
    axes, pixel = _geometry(ds0)
    to_image = _mapper(gray_mapping(ds0, cfg), ds0, paths, cfg, series_range)
    base = {"modality": str(ds0.get("Modality", "") or "OT"), "source_format": "dicom", "orig_dtype": dtype}
    planes = _resliced_planes(vol, axes, (slice_spacing, pixel[0], pixel[1]), to_image, cfg, stats, base)
    return identity_of(ds0, Path(paths[0])), planes


def read_frames_resliced(path: Path, cfg: CurateConfig, stats: dict[str, int]) -> tuple[Identity, Iterator[Slice]]:
    """An enhanced multi-frame file (its frames one regular stack, ``frame_stack``) resliced like a series:
    identity plus a lazy iterator over the planes. Each frame is converted with its own rescale; the planes are
    mapped with the first frame's window (along the normal) and, for percentile scaling with
    ``--percentile_scope volume``, the range over the frames that the native frames use."""
    _check_planes(cfg)
    ds = open_dataset(path)
    stack = frame_stack(ds)
    if stack is None:
        raise RejectError("the frames do not all carry a position and one common orientation")
    if stack.pixel_spacing is None:
        raise RejectError("PixelSpacing missing or not the same for all frames")
    slice_spacing, reason = regular_stack(stack.positions, stack.axes[0], min(stack.pixel_spacing))
    if slice_spacing is None:
        raise RejectError(f"the frames do not form a regular stack: {reason}")
    first = decode_frame(ds, 0)
    if first.ndim != 2:
        raise RejectError(f"not grayscale frames (shape {first.shape})")
    vol = VolumeFile(*first.shape)
    try:
        for i in stack.order:
            vol.append(apply_modality_lut(first if i == 0 else decode_frame(ds, i), frame_dataset(ds, i))
                       .astype(np.float32))
        values_ds = frame_dataset(ds, stack.order[0])
        mapping = gray_mapping(values_ds, cfg)
        if mapping.kind == "percentile" and cfg.percentile_scope == "volume":
            frames = int(ds.NumberOfFrames)
            mapping = with_range(mapping, frames_value_range(ds, first, frames, mapping.percentiles), "frames")
    except BaseException:
        vol.close()
        raise
    base = {"modality": str(ds.get("Modality", "") or "OT"), "source_format": "dicom", "orig_dtype": str(first.dtype)}
    planes = _resliced_planes(vol, stack.axes, (slice_spacing, *stack.pixel_spacing),
                              lambda values: apply_mapping(values, mapping, values_ds, None), cfg, stats, base)
    return identity_of(ds, path), planes


def _resliced_planes(vol: VolumeFile, axes: np.ndarray, spacing: tuple[float, float, float],
                     to_image: Callable[[np.ndarray], tuple[np.ndarray, list[str], dict]], cfg: CurateConfig,
                     stats: dict[str, int], base: dict) -> Iterator[Slice]:
    """The requested planes cut out of ``vol`` (patient directions ``axes``, ``spacing`` in mm along its three
    axes), each mapped by ``to_image``; removes the volume file when finished or closed."""
    budget = max(1, int(cfg.reslice_memory_mb * 2**20))
    base = {**base, "orig_shape": [vol.slices, vol.rows, vol.cols]}
    try:
        for plane in cfg.dicom_reslice:
            layout = plane_layout(plane, axes)
            if layout is None:
                stats["reslice_native_plane"] = stats.get("reslice_native_plane", 0) + 1
                continue  # the stack is already cut in this plane: its native slices are written
            cols_axis = 3 - layout.axis - layout.rows_axis
            in_spacing = (spacing[layout.rows_axis], spacing[cols_axis])
            length = vol.rows if layout.axis == 1 else vol.cols
            for start, slab in vol.slabs(layout.axis, budget):
                for k in range(slab.shape[layout.axis]):
                    values = cut_plane(slab, k, layout)
                    img, names, norm = to_image(values)
                    out_spacing = in_spacing
                    if cfg.dicom_reslice_isotropic:  # square pixels and the size policy in one resize
                        h, w = img.shape[:2]
                        shape = target_size(*isotropic_shape((h, w), in_spacing)[0], cfg.size_policy)
                        img = resize(img, shape)
                        out_spacing = (in_spacing[0] * h / shape[0], in_spacing[1] * w / shape[1])
                    if min(img.shape[:2]) < cfg.min_size:
                        stats["reslice_too_small"] = stats.get("reslice_too_small", 0) + 1
                        continue
                    if skip_background(img, cfg, stats):
                        continue
                    t = start + k
                    index = length - 1 - t if layout.flip_index else t
                    meta = {**base, "channels": names, "normalization": norm, "spacing": list(out_spacing),
                            "slice_axis": plane, "slice_index": index}
                    yield Slice(image=np.ascontiguousarray(img), key=f"{plane}{index}", meta=meta)
                del slab  # release before the next slab is read: one slab in memory at a time
    finally:
        vol.close()
