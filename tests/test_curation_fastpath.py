"""The fast paths of curation give exactly what the direct computation gives: stored-value lookup tables
for DICOM grayscale mapping (real CT, MR, CR files) and the numpy PNG encoder (real images)."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_modality_lut

from data_curation.config import CurateConfig
from data_curation.format import decode_image, encode_image
from data_curation.png import encode_png
from data_curation.readers.dicom import decode_frame, open_dataset
from data_curation.readers.dicom_gray import (
    apply_mapping,
    gray_mapping,
    map_gray,
    stored_value_table,
    with_range,
)

SITE = Path(pydicom.__file__).parent.parent
PYDICOM_FILES = SITE / "pydicom" / "data" / "test_files"
PYDICOM_DATA = SITE / "data_store" / "data"
KERMANY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "xray" / "kermany_cxr_224"

CASES = [  # (file, config overrides)
    (PYDICOM_DATA / "693_UNCI.dcm", {"ct_windows": ["brain", "bone", "lung"]}),
    (PYDICOM_DATA / "693_UNCI.dcm", {"ct_windows": ["soft_tissue"], "output_bits": 16}),
    (PYDICOM_DATA / "693_UNCI.dcm", {"ct_windows": ["hu16"]}),
    (PYDICOM_FILES / "CT_small.dcm", {"ct_windows": ["dicom", "-50:350.5"]}),  # signed int16 stored values
    (PYDICOM_DATA / "RG1_UNCI.dcm", {}),  # CR, MONOCHROME1, the file's window
    (PYDICOM_FILES / "MR_small.dcm", {"use_dicom_voi": True}),
]


@pytest.mark.parametrize(("path", "overrides"), CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_lookup_table_equals_direct_mapping(path: Path, overrides: dict) -> None:
    cfg = dataclasses.replace(CurateConfig(), **overrides)
    ds = open_dataset(path)
    raw = decode_frame(ds, None)
    mapping = gray_mapping(ds, cfg)
    fast, names, norm = map_gray(ds, raw, None, mapping)
    direct, direct_names, direct_norm = apply_mapping(apply_modality_lut(raw, ds), mapping, ds, None)
    assert fast.dtype == direct.dtype and fast.shape == direct.shape
    np.testing.assert_array_equal(fast, direct)
    assert (names, norm) == (direct_names, direct_norm)
    if mapping.kind in ("ct", "window"):  # these are the table cases; the table is cached and read-only
        table = stored_value_table(mapping, raw.dtype.str)[0]
        assert table.shape == (fast.shape[2], 2 ** (8 * raw.dtype.itemsize)) and not table.flags.writeable
        assert stored_value_table(mapping, raw.dtype.str)[0] is table


def test_percentile_mapping_is_not_tabulated() -> None:
    cfg = dataclasses.replace(CurateConfig(), use_dicom_voi=False)
    ds = open_dataset(PYDICOM_FILES / "MR_small.dcm")
    assert gray_mapping(ds, cfg).kind == "percentile"  # depends on the image: computed directly
    raw = decode_frame(ds, None)
    img, _, norm = map_gray(ds, raw, None, gray_mapping(ds, cfg))
    lo, hi = np.percentile(raw.astype(np.float32), [0.5, 99.5])
    expected = np.clip(np.rint((raw.astype(np.float32) - np.float32(lo)) * np.float32(255 / (hi - lo))), 0, 255)
    np.testing.assert_array_equal(img[:, :, 0], expected.astype(np.uint8))
    assert norm["kind"] == "percentile" and norm["scope"] == "image"


def test_fixed_range_percentile_mapping_is_tabulated_and_exact() -> None:
    """A series' range makes percentile scaling a function of the stored value: the table gives the direct
    path's pixels, and the range is recorded."""
    cfg = dataclasses.replace(CurateConfig(), use_dicom_voi=False)
    ds = open_dataset(PYDICOM_FILES / "MR_small.dcm")
    raw = decode_frame(ds, None)
    mapping = with_range(gray_mapping(ds, cfg), (100.0, 1500.5), "series")
    fast, _, norm = map_gray(ds, raw, None, mapping)
    direct, _, direct_norm = apply_mapping(apply_modality_lut(raw, ds), mapping, ds, None)
    np.testing.assert_array_equal(fast, direct)
    assert norm == direct_norm and norm["scope"] == "series" and norm["range"] == [100.0, 1500.5]
    assert stored_value_table(mapping, raw.dtype.str)[0].shape == (1, 2 ** (8 * raw.dtype.itemsize))
    expected = np.clip(np.rint((raw.astype(np.float32) - 100) * np.float32(255 / 1400.5)), 0, 255)
    np.testing.assert_array_equal(fast[:, :, 0], expected.astype(np.uint8))
    # not a percentile mapping: a range changes nothing
    ct = dataclasses.replace(gray_mapping(open_dataset(PYDICOM_FILES / "CT_small.dcm"), cfg))
    assert with_range(ct, (0.0, 1.0), "series") is ct


def _real_images() -> list[np.ndarray]:
    ct = pydicom.dcmread(PYDICOM_DATA / "693_UNCI.dcm").pixel_array
    xray = np.asarray(Image.open(sorted((KERMANY / "train" / "NORMAL").iterdir())[0]).convert("L"))
    rgb = pydicom.dcmread(PYDICOM_DATA / "SC_rgb.dcm").pixel_array
    return [ct.astype(np.uint16), (ct >> 4).astype(np.uint8), xray, rgb, xray[:1, :1], xray[:, :7]]


@pytest.mark.parametrize("level", [0, 1, 6])
def test_png_encoder_is_lossless_and_standard(level: int) -> None:
    for arr in _real_images():
        data = encode_png(arr, level)
        with Image.open(io.BytesIO(data)) as im:  # an independent decoder reads it back exactly
            im.load()
            assert im.format == "PNG" and im.size == (arr.shape[1], arr.shape[0])
            back = np.asarray(im, dtype=np.uint16 if arr.dtype == np.uint16 else np.uint8)
        np.testing.assert_array_equal(back, arr)
        ext, blob = encode_image(arr if arr.ndim == 3 else arr[:, :, None], level)
        assert ext == "png" and blob == data
        np.testing.assert_array_equal(decode_image({"png": blob}).reshape(arr.shape), arr)


def test_png_encoder_is_not_larger_than_pil_on_ct_and_xray() -> None:
    ct, ct8, xray = _real_images()[:3]
    for arr in (ct8, xray):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
        assert len(encode_png(arr, 1)) <= 1.05 * len(buf.getvalue())
    with pytest.raises(ValueError, match="unsupported"):
        encode_png(np.zeros((4, 4, 2), np.uint8))
