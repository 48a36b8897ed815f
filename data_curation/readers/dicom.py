"""DICOM reader: pixel decoding, rescale, photometric handling, VOI, CT windows, multi-frame."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

from data_curation.config import CurateConfig
from data_curation.intensity import percentile_range, rgb_to_uint8
from data_curation.readers import Identity, RejectError, Slice, skip_background
from data_curation.readers.dicom_frames import frame_dataset, frame_pixel_spacing, frame_stack
from data_curation.readers.dicom_gray import GrayMapping, gray_mapping, map_gray, with_range
from data_curation.readers.dicom_mosaic import is_mosaic, mosaic_count, mosaic_tiles

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Objects with pixel data that are not images of the patient: pretraining on them would teach label masks or dose
# grids as if they were anatomy.
_DERIVED_MODALITIES = {
    "SEG": "a segmentation (label masks drawn on images)",
    "RTDOSE": "a radiotherapy dose grid",
}
# Volume percentiles (``percentile_scope volume``) of a series or multi-frame file come from at most this many
# slices / frames, evenly spaced, and at most this many values in all.
RANGE_MAX_SLICES = 32
RANGE_MAX_VALUES = 1_000_000
# Which package decodes which compressed transfer syntax (shown in the reject reason when one is missing).
_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg", "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",
}


def looks_like_dicom(path: Path) -> bool:
    """True for a 'DICM' preamble, or a DICOM-like suffix (files without a preamble exist)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return path.suffix.lower() in DICOM_SUFFIXES
    return head[128:132] == b"DICM" or path.suffix.lower() in DICOM_SUFFIXES


@dataclass
class DicomHeader:
    """The few header fields used to group single-frame files into series."""

    series_uid: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    shape: tuple[int, int]
    frames: int
    spacing: tuple[float, float] | None = None  # PixelSpacing: (between rows, between columns) in mm
    burned_in: bool = False
    photometric: str = ""
    enhanced: bool = False  # multi-frame with per-frame functional groups (geometry per frame: ``frame_stack``)
    mosaic: bool = False  # a Siemens mosaic: a volume of its own, not a slice of a series


def read_header(path: Path) -> DicomHeader | None:
    """Grouping fields, or None when the file is not a groupable image (errors surface in ``read_dicom``)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        ipp = ds.get("ImagePositionPatient")
        iop = ds.get("ImageOrientationPatient")
        return DicomHeader(
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            position=tuple(float(v) for v in ipp) if ipp is not None and len(ipp) == 3 else None,
            orientation=tuple(float(v) for v in iop) if iop is not None and len(iop) == 6 else None,
            shape=(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)),
            frames=int(ds.get("NumberOfFrames", 1) or 1),
            spacing=tuple(float(v) for v in ps) if (ps := ds.get("PixelSpacing")) and len(ps) == 2 else None,
            burned_in=str(ds.get("BurnedInAnnotation", "")).upper() == "YES",
            photometric=str(ds.get("PhotometricInterpretation", "")).upper(),
            enhanced=int(ds.get("NumberOfFrames", 1) or 1) > 1 and "PerFrameFunctionalGroupsSequence" in ds,
            mosaic=is_mosaic(ds),
        )
    except Exception:  # noqa: BLE001 - any unreadable header simply means "not groupable"
        return None


def _sop_name(ds: pydicom.Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    name = getattr(uid, "name", "") or str(uid or "unknown SOP class")
    return name.removesuffix(" Storage")


def open_dataset(path: Path) -> pydicom.Dataset:
    """Read a DICOM file or raise RejectError with a specific reason."""
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for corrupt input
        raise RejectError(f"unreadable DICOM: {type(exc).__name__}: {exc}") from exc
    meta = getattr(ds, "file_meta", None)
    has_meta = meta is not None and "MediaStorageSOPClassUID" in meta
    if not has_meta and not any(k in ds for k in ("SOPClassUID", "Modality", "Rows", *_PIXEL_KEYWORDS)):
        raise RejectError("not a DICOM file: no preamble and no recognisable DICOM elements")
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        name = _sop_name(ds)
        if "Image" in name:
            raise RejectError(f"no complete Pixel Data element: truncated or stripped file ({name})")
        raise RejectError(f"not an image: {name}")
    derived = _DERIVED_MODALITIES.get(str(ds.get("Modality", "")).upper())
    if derived is not None:
        raise RejectError(f"not an image of the patient: {_sop_name(ds)} (Modality {ds.Modality}), {derived}")
    if meta is None:
        ds.file_meta = meta = pydicom.dataset.FileMetaDataset()
    if "TransferSyntaxUID" not in meta:  # files without meta: use the encoding pydicom detected
        implicit = getattr(ds, "original_encoding", (True, True))[0]
        meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian if implicit else \
            pydicom.uid.ExplicitVRLittleEndian
    return ds


def identity_of(ds: pydicom.Dataset, path: Path) -> Identity:
    subject = str(ds.get("PatientID", "") or ds.get("PatientName", "") or ds.get("StudyInstanceUID", "")
                  or path)
    return Identity(subject=subject, study=str(ds.get("StudyInstanceUID", "")),
                    series=str(ds.get("SeriesInstanceUID", "")))


def decode_frame(ds: pydicom.Dataset, index: int | None) -> np.ndarray:
    """Decode one frame (``index`` None for single-frame) with reasons for the usual failures."""
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    ts_name = getattr(ts, "name", str(ts or "unknown transfer syntax"))
    try:
        return pixel_array(ds, index=index)
    except (NotImplementedError, RuntimeError) as exc:
        msg = str(exc)
        if "exceptions were raised by all available plugins" in msg:
            raise RejectError(f"corrupt or unsupported compressed pixel data ({ts_name}): "
                              f"{' '.join(msg.split())[:240]}") from exc
        if "no plugin" in msg.lower() or "unable to decode" in msg.lower() or isinstance(exc, NotImplementedError):
            hint = _DECODER_HINTS.get(str(ts), "pylibjpeg and its plugins or python-gdcm")
            raise RejectError(f"no decoder for {ts_name}: install {hint} ({msg.splitlines()[0][:120]})") from exc
        raise RejectError(f"pixel data could not be decoded ({ts_name}): {msg[:200]}") from exc
    except Exception as exc:  # noqa: BLE001
        msg = str(exc)
        if "less than expected" in msg or "truncat" in msg.lower() or "insufficient" in msg.lower():
            raise RejectError(f"truncated pixel data ({msg[:160]})") from exc
        raise RejectError(f"pixel data could not be decoded ({ts_name}): {type(exc).__name__}: "
                          f"{msg[:200]}") from exc


def map_frame(ds: pydicom.Dataset, raw: np.ndarray, index: int, mapping: GrayMapping,
              values_ds: pydicom.Dataset | None = None) -> tuple[np.ndarray, list[str], dict]:
    """Raw decoded pixels -> (H, W, C) uint array, channel names, normalization record (``mapping``: the
    grayscale one, unused for colour; ``values_ds``: the frame's rescale / window, ``frame_dataset``)."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(raw, ds)
        rgb = (rgb >> 8).astype(np.uint8) if rgb.dtype != np.uint8 else rgb
        return rgb, ["R", "G", "B"], {"kind": "palette_to_rgb"}
    if raw.ndim == 3:  # RGB or YBR (pydicom converts YBR to RGB while decoding)
        return rgb_to_uint8(raw, int(ds.get("BitsStored", 8))), ["R", "G", "B"], {"kind": "rgb"}
    return map_gray(ds if values_ds is None else values_ds, raw, index, mapping)


def read_dicom(path: Path, cfg: CurateConfig, stats: dict[str, int], series_index: int | None = None,
               series_range: tuple[float, float] | None = None) -> tuple[Identity, Iterator[Slice]]:
    """Identity plus a lazy iterator of slices (frames decoded one at a time). ``series_range``: the
    percentile range of the file's series (planned with ``percentile_scope volume``), used when the file is
    percentile-scaled; a multi-frame file gets one range over its frames instead, a Siemens mosaic one over
    its slices."""
    ds = open_dataset(path)
    if cfg.reject_burned_in and str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        raise RejectError("BurnedInAnnotation=YES (burned-in text may identify the patient)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    mosaic = mosaic_count(ds) if frames == 1 else None
    first = decode_frame(ds, 0 if frames > 1 else None)  # fail early, before any slice is emitted
    if mosaic is not None:
        return identity_of(ds, path), _mosaic_slices(ds, mosaic_tiles(first, mosaic), cfg, stats)
    mapping = gray_mapping(frame_dataset(ds, 0), cfg)
    frames_range = None
    if frames > 1 and mapping.kind == "percentile" and cfg.percentile_scope == "volume" and first.ndim == 2:
        frames_range = frames_value_range(ds, first, frames, mapping.percentiles)
        mapping = with_range(mapping, frames_range, "frames")
    elif series_range is not None and cfg.percentile_scope == "volume":
        mapping = with_range(mapping, series_range, "series")

    def frame_mapping(i: int) -> tuple[pydicom.Dataset, GrayMapping]:
        """Frame ``i``'s values dataset and mapping: the file's, unless its functional groups differ by frame."""
        values_ds = frame_dataset(ds, i)
        if i == 0 or values_ds is ds:
            return values_ds, mapping
        return values_ds, with_range(gray_mapping(values_ds, cfg), frames_range, "frames")

    stack = frame_stack(ds)  # an enhanced file's frames along the slice normal; else they keep file order

    def slices() -> Iterator[Slice]:
        spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or frame_pixel_spacing(ds, 0)
        base = {
            "modality": str(ds.get("Modality", "") or "OT"), "source_format": "dicom",
            "orig_dtype": str(first.dtype),
            "orig_shape": [frames, *first.shape] if frames > 1 else list(first.shape),
            "spacing": [float(spacing[0]), float(spacing[1])] if spacing else None,
        }
        for k, i in enumerate(stack.order if stack else range(frames)):
            raw = first if i == 0 else decode_frame(ds, i)
            values_ds, frame_map = frame_mapping(i)
            img, names, norm = map_frame(ds, raw, i, frame_map, values_ds)
            meta = {**base, "channels": names, "normalization": norm}
            if stack is not None:
                meta.update(slice_axis="native", slice_index=stack.slice_index[k])
            elif frames > 1:
                meta.update(slice_axis="frame", slice_index=i)
            elif series_index is not None:
                meta.update(slice_axis="native", slice_index=series_index)
            else:
                meta.update(slice_axis=None, slice_index=None)
            yield Slice(image=img, key=f"f{i}", meta=meta)

    return identity_of(ds, path), slices()


def _mosaic_slices(ds: pydicom.Dataset, tiles: np.ndarray, cfg: CurateConfig, stats: dict[str, int]
                   ) -> Iterator[Slice]:
    """The slices of a Siemens mosaic (``tiles`` in slice order), mapped as the slices of one volume: one
    percentile range over all of them with ``--percentile_scope volume``, and like NIfTI slices, those with too
    little foreground left out and counted."""
    mapping = gray_mapping(ds, cfg)
    if mapping.kind == "percentile" and cfg.percentile_scope == "volume":
        values = value_sample(apply_modality_lut(tiles, ds), 1)
        mapping = with_range(mapping, percentile_range(values, *mapping.percentiles), "mosaic")
    spacing = ds.get("PixelSpacing")
    base = {"modality": str(ds.get("Modality", "") or "OT"), "source_format": "dicom", "orig_dtype": str(tiles.dtype),
            "orig_shape": list(tiles.shape), "spacing": [float(spacing[0]), float(spacing[1])] if spacing else None,
            "slice_axis": "native"}
    for k, tile in enumerate(tiles):
        img, names, norm = map_gray(ds, np.ascontiguousarray(tile), None, mapping)
        if skip_background(img, cfg, stats):
            continue
        yield Slice(image=img, key=f"m{k}", meta={**base, "channels": names, "normalization": norm, "slice_index": k})


def range_indices(count: int) -> list[int]:
    """Which of ``count`` slices / frames the volume percentiles read: all, or RANGE_MAX_SLICES evenly spaced
    from the first to the last."""
    if count <= RANGE_MAX_SLICES:
        return list(range(count))
    return sorted({round(i * (count - 1) / (RANGE_MAX_SLICES - 1)) for i in range(RANGE_MAX_SLICES)})


def value_sample(values: np.ndarray, slices: int) -> np.ndarray:
    """A strided float32 subsample of one slice's modality values, so that ``slices`` of them hold at most
    about RANGE_MAX_VALUES values."""
    flat = values.reshape(-1)
    step = max(1, flat.size * slices // RANGE_MAX_VALUES)
    return flat[::step].astype(np.float32)


def frames_value_range(ds: pydicom.Dataset, first: np.ndarray, frames: int, percentiles: tuple[float, float]
                       ) -> tuple[float, float]:
    """Percentile range of a multi-frame grayscale file's modality values over its (sampled) frames."""
    picked = range_indices(frames)
    samples = [value_sample(apply_modality_lut(first if i == 0 else decode_frame(ds, i), frame_dataset(ds, i)),
                            len(picked)) for i in picked]
    return percentile_range(np.concatenate(samples), *percentiles)


def series_value_range(paths: list[str], cfg: CurateConfig) -> tuple[float, float] | None:
    """Percentile range of a series' modality values over its (sampled) percentile-scaled grayscale slices, for
    its native slices and its resliced planes alike; None when there is none (CT, a window or VOI LUT, RGB) or
    none of them decodes (each slice's own task then reports why). Never raises for bad input: a slice that
    fails here fails its own task with the reason."""
    picked = [paths[i] for i in range_indices(len(paths))]
    samples: list[np.ndarray] = []
    for path in picked:
        try:
            # the header decides first: a CT series costs no pixel reads here
            header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            if gray_mapping(header, cfg).kind != "percentile":  # a slice with its own window keeps it
                continue
            ds = open_dataset(Path(path))
            raw = decode_frame(ds, None)
        except Exception:  # noqa: BLE001 - unreadable or undecodable: the slice's own task reports why
            continue
        if raw.ndim == 2:  # not colour
            samples.append(value_sample(apply_modality_lut(raw, ds), len(picked)))
    if not samples:
        return None
    return percentile_range(np.concatenate(samples), cfg.percentile_low, cfg.percentile_high)
