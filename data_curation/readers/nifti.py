"""NIfTI reader: canonical (RAS) reorientation, slicing along chosen axes, background skipping.

A 4D file is read one 3D volume at a time (``volume``), so memory is bounded by one volume.
Non-finite voxels (NaN/Inf) are repaired: set to the volume's lowest finite value and counted in the
metadata (``nonfinite_voxels``); a volume without any finite voxel is rejected.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, io_orientation

from data_curation.config import CurateConfig
from data_curation.intensity import ct_channels, percentile_range, scale_range
from data_curation.readers import Identity, RejectError, Slice, skip_background

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".img", ".hdr", ".mgh", ".mgz")
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


def is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz") or name.endswith(".mgz") or name.endswith(".mgh")


def _load(path: Path) -> nib.spatialimages.SpatialImage:
    try:
        return nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for corrupt files
        raise RejectError(f"corrupt or unreadable NIfTI: {type(exc).__name__}: {str(exc)[:160]}") from exc


def nifti_volumes(path: Path) -> int:
    """Number of 3D volumes (1 for 3D files); reads only the header."""
    img = _load(path)
    shape = img.shape
    if len(shape) < 3 or min(shape[:3]) < 1:
        raise RejectError(f"NIfTI is not a 3D/4D volume (shape {shape})")
    return int(np.prod(shape[3:])) if len(shape) > 3 else 1


def read_nifti(path: Path, cfg: CurateConfig, volume: int, stats: dict[str, int]
               ) -> tuple[Identity, Iterator[Slice]]:
    img = _load(path)
    shape = img.shape
    try:
        if len(shape) > 3:
            flat = np.unravel_index(volume, shape[3:])
            data = np.asarray(img.dataobj[(slice(None),) * 3 + tuple(int(i) for i in flat)])
        else:
            data = np.asarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - zlib/EOF errors of a corrupt .nii.gz surface here
        raise RejectError(f"corrupt NIfTI pixel data: {type(exc).__name__}: {str(exc)[:160]}") from exc
    if data.ndim != 3:
        raise RejectError(f"NIfTI volume is not 3D after selecting volume {volume} (shape {data.shape})")
    orig_dtype = str(data.dtype)
    ornt = io_orientation(img.affine)
    data = apply_orientation(data, ornt)  # canonical RAS axis order
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = zooms
    finite = np.isfinite(data)
    n_bad = int(data.size - finite.sum())
    if n_bad == data.size:
        raise RejectError("NIfTI volume has no finite voxels (all NaN/Inf)")
    values = data.astype(np.float32)
    if n_bad:
        values[~finite] = values[finite].min()
    modality = cfg.nifti_modality
    if modality != "CT" and cfg.percentile_scope == "volume":
        vol_range = percentile_range(values, cfg.percentile_low, cfg.percentile_high)

    def slices() -> Iterator[Slice]:
        for axis_name in cfg.nifti_axes:
            if axis_name not in AXES:
                raise RejectError(f"unknown slicing axis '{axis_name}' (use {sorted(AXES)})")
            axis = AXES[axis_name]
            in_plane = [a for a in range(3) if a != axis]
            for k in range(values.shape[axis]):
                # rows: anterior/superior first; columns: patient right first (radiological view)
                plane = np.take(values, k, axis=axis).T[::-1, ::-1]
                if modality == "CT":
                    out, names, norm = ct_channels(plane, list(cfg.ct_windows), None, cfg.output_bits)
                else:
                    lo, hi = vol_range if cfg.percentile_scope == "volume" else \
                        percentile_range(plane, cfg.percentile_low, cfg.percentile_high)
                    out = scale_range(plane, lo, hi, cfg.output_bits)[:, :, None]
                    names = ["gray"]
                    norm = {"kind": "percentile", "scope": cfg.percentile_scope, "low": cfg.percentile_low,
                            "high": cfg.percentile_high, "bits": cfg.output_bits}
                if skip_background(out, cfg, stats):
                    continue
                meta = {"modality": modality, "source_format": "nifti", "orig_shape": list(shape),
                        "orig_dtype": orig_dtype, "channels": names, "normalization": norm,
                        "spacing": [float(spacing[in_plane[1]]), float(spacing[in_plane[0]])],
                        "slice_axis": axis_name, "slice_index": k, "nonfinite_voxels": n_bad}
                yield Slice(image=np.ascontiguousarray(out), key=f"v{volume}-{axis_name}{k}", meta=meta)

    return Identity(subject=str(path)), slices()
