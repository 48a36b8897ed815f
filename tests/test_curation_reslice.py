"""DICOM series reslicing (``--dicom_reslice``) on real series: pixels and orientation against the stacked
volume built independently, isotropic resampling, slab memory bound, and series that must not be resliced
(pydicom-data's 693 CT "series" is one slice in three encodings at one position)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from data_curation.cli import main as curate_main
from data_curation.format import decode_image, decode_meta
from data_curation.intensity import apply_window
from data_curation.reslice import VolumeFile, plane_layout

SITE = Path(pydicom.__file__).parent.parent
DICOMDIR_TESTS = SITE / "pydicom" / "data" / "test_files" / "dicomdirtests"
CT5N = DICOMDIR_TESTS / "98892001" / "CT5N"  # 5 real axial CT slices, 2.5 mm apart
CT2_GAP = DICOMDIR_TESTS / "77654033" / "CT2"  # 4 slices of one series with a 200 mm gap
PYDICOM_DATA = SITE / "data_store" / "data"
SALT = "reslice-test-salt-0123456789abcdef"
WINDOWS = ["soft_tissue", "bone", "brain"]


def _hu_volume(folder: Path) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """HU volume (slice, row, col) sorted by z (these slices are axial: normal +z), built with pydicom."""
    dss = sorted((pydicom.dcmread(p) for p in folder.iterdir()), key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss])
    return hu, dss


def _curate(tmp: Path, inputs: list[Path], *flags: str) -> tuple[dict, list[dict], list[dict]]:
    out = tmp / "out"
    assert curate_main([*map(str, inputs), "--output", str(out), "--workers", "1", "--no-progress", *flags]) == 0
    import webdataset as wds

    samples = list(wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")), shardshuffle=False))
    items = [r for r in map(json.loads, (out / ".curate_state.jsonl").read_text().splitlines()) if r["t"] == "item"]
    return json.loads((out / "manifest.json").read_text()), samples, items


@pytest.fixture()
def salt(monkeypatch):
    monkeypatch.setenv("SCANMAE_CURATE_SALT", SALT)


def test_coronal_and_sagittal_planes_match_the_stacked_volume(tmp_path, salt):
    series = tmp_path / "ct5n"
    shutil.copytree(CT5N, series)
    manifest, samples, items = _curate(tmp_path, [series], "--dicom_reslice", "coronal", "sagittal", "axial",
                                       "--no-dicom_reslice_isotropic", "--ct_windows", *WINDOWS,
                                       "--min_size", "4", "--min_foreground", "0")
    hu, dss = _hu_volume(CT5N)
    n_slices, rows, cols = hu.shape
    assert manifest["files_seen"] == manifest["files_used"] == n_slices  # reslicing adds no input file
    assert manifest["series_resliced"] == 1 and manifest["series_not_resliced"] == 0
    by_plane: dict[str, dict[int, tuple[np.ndarray, dict]]] = {}
    for s in samples:
        meta = decode_meta(s)
        by_plane.setdefault(meta["slice_axis"], {})[meta["slice_index"]] = (decode_image(s), meta)
    assert set(by_plane) == {"native", "coronal", "sagittal"}  # axial is the native plane: not repeated
    assert sorted(by_plane["coronal"]) == list(range(rows)) and sorted(by_plane["sagittal"]) == list(range(cols))
    expected = np.stack([apply_window(hu, *lw) for lw in ((40, 400), (400, 1800), (40, 80))], axis=-1)
    px = float(dss[0].PixelSpacing[0])
    for i, (img, meta) in by_plane["coronal"].items():
        # superior at the top (z descending), patient left to the right (+x = column index)
        np.testing.assert_array_equal(img, expected[::-1, i, :, :])
        assert meta["spacing"] == pytest.approx([2.5, px]) and meta["orig_shape"] == [n_slices, rows, cols]
        assert meta["channels"] == WINDOWS and meta["modality"] == "CT"
    for j, (img, _) in by_plane["sagittal"].items():
        # superior at the top, posterior to the right (+y = row index)
        np.testing.assert_array_equal(img, expected[::-1, :, j, :])
    native = {m["slice_index"]: img for img, m in by_plane["native"].values()}
    for k in range(n_slices):  # native slices keep their stack rank
        np.testing.assert_array_equal(native[k], expected[k])
    owner = next(r for r in items if r.get("resliced"))
    assert Path(owner["path"]).name == Path(dss[0].filename).name and owner["resliced"] == rows + cols


def test_isotropic_planes_and_the_slab_budget(tmp_path, salt):
    series = tmp_path / "ct5n"
    shutil.copytree(CT5N, series)
    flags = ["--dicom_reslice", "coronal", "sagittal", "--min_size", "4", "--min_foreground", "0"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, big, _ = _curate(tmp_path / "a", [series], *flags)
    _, small, _ = _curate(tmp_path / "b", [series], *flags, "--reslice_memory_mb", "0.002")  # 3 slabs
    assert [s["png"] for s in big] == [s["png"] for s in small]  # the slab size changes nothing
    hu, dss = _hu_volume(CT5N)
    px = float(dss[0].PixelSpacing[0])
    resliced = [decode_meta(s) for s in big if decode_meta(s)["slice_axis"] in ("coronal", "sagittal")]
    assert len(resliced) == 32
    rows = round(5 * 2.5 / px)
    for meta in resliced:  # 5 slices x 2.5 mm resampled to the 0.488 mm pixels: 26 rows of 12.5/26 mm
        assert meta["size"] == [rows, 16] and meta["spacing"] == pytest.approx([5 * 2.5 / rows, px])

    vol = VolumeFile(*hu.shape[1:], directory=str(tmp_path))
    for plane in hu:
        vol.append(plane)
    for axis in (1, 2):
        parts = [(start, slab) for start, slab in vol.slabs(axis, max_bytes=1000)]
        assert all(slab.nbytes <= 1000 for _, slab in parts) and len(parts) > 1
        np.testing.assert_array_equal(np.concatenate([s for _, s in parts], axis=axis), hu.astype(np.float32))
    assert vol.max_read_bytes <= 1000
    vol.close()
    assert not list(tmp_path.glob("scanmae-reslice-*"))


def test_series_that_are_not_regular_stacks_are_not_resliced(tmp_path, salt):
    trio = tmp_path / "ct693"
    trio.mkdir()
    for p in PYDICOM_DATA.glob("693_*.dcm"):  # one series, one position, three transfer syntaxes
        shutil.copy(p, trio / p.name)
    gap = tmp_path / "ct2"
    shutil.copytree(CT2_GAP, gap)
    manifest, samples, items = _curate(tmp_path, [trio, gap], "--dicom_reslice", "coronal", "--min_size", "4")
    assert manifest["series_resliced"] == 0 and manifest["series_not_resliced"] == 2
    notes = sorted(r["reslice_note"] for r in items if r.get("reslice_note"))
    assert "share a position" in notes[0] and "uneven slice spacing" in notes[1]
    assert manifest["files_used"] + manifest["files_duplicate"] == 7  # the native slices are still curated
    assert all(decode_meta(s)["slice_axis"] == "native" for s in samples)


def test_plane_layout_of_a_real_sagittal_series():
    ds = pydicom.dcmread(DICOMDIR_TESTS / "98892003" / "MR2" / "6605", stop_before_pixels=True)
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])  # rows +y (posterior), cols -z
    axes = np.stack([np.cross(iop[:3], iop[3:]), iop[3:], iop[:3]])
    assert plane_layout("sagittal", axes) is None  # native plane
    coronal = plane_layout("coronal", axes)  # fixed: the column index (+y); rows: image rows (-z, no flip)
    assert (coronal.axis, coronal.rows_axis, coronal.flip_rows) == (2, 1, False)
    assert coronal.flip_cols == bool(axes[0] @ np.array([1.0, 0, 0]) < 0)
    axial = plane_layout("axial", axes)  # fixed: the image rows (-z, so iterate backwards)
    assert (axial.axis, axial.flip_index) == (1, True)
    assert axial.rows_axis == 2 and not axial.flip_rows  # anterior at the top: +y runs down the rows
