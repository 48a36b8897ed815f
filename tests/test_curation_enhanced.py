"""Enhanced multi-frame DICOM and derived objects, on real files from pydicom / pydicom-data.

- An Enhanced CT keeps its rescale and window in functional groups, not at the top level: its frames must be
  windowed in HU like any CT (they were percentile-scaled from raw stored values), with a frame's own groups
  overriding the shared ones.
- Its frames carry their positions in functional groups too: they are ordered along the slice normal like the
  files of a series, and resliced like one (``--dicom_reslice``), with the same pixels as the equivalent series of
  single-frame files.
- A segmentation (SEG) or a dose grid (RTDOSE) carries pixel data but is no image of the patient: rejected with
  the reason instead of entering a pretraining pool.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from data_curation.cli import main as curate_main
from data_curation.format import decode_image, decode_meta
from data_curation.intensity import apply_window

SITE = Path(pydicom.__file__).parent.parent
PYDICOM_DATA = SITE / "data_store" / "data"
PYDICOM_FILES = SITE / "pydicom" / "data" / "test_files"
ENHANCED_CT = PYDICOM_DATA / "eCT_Supplemental.dcm"  # 2 frames, rescale -1024 and window 49/102 in shared groups
SALT = "enhanced-test-salt-0123456789abcdef"


@pytest.fixture()
def salt(monkeypatch):
    monkeypatch.setenv("SCANMAE_CURATE_SALT", SALT)


def _frame_at_slice_index(ds: pydicom.Dataset) -> dict[int, int]:
    """slice_index -> frame index of an enhanced file whose frames have distinct positions (rank along the normal
    of the shared orientation)."""
    iop = np.asarray(ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    along = [float(np.dot(g.PlanePositionSequence[0].ImagePositionPatient, normal))
             for g in ds.PerFrameFunctionalGroupsSequence]
    return dict(enumerate(np.argsort(along).tolist()))


def _curate(out: Path, inputs: list[Path], *flags: str) -> tuple[list[tuple[np.ndarray, dict]], list[dict]]:
    assert curate_main([*map(str, inputs), "--output", str(out), "--workers", "1", "--no-progress",
                        "--min_foreground", "0", *flags]) == 0
    import webdataset as wds

    samples = wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")), shardshuffle=False)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    return sorted(((decode_image(s), decode_meta(s)) for s in samples), key=lambda x: x[1]["slice_index"]), rejects


def test_enhanced_ct_frames_are_windowed_in_hu(tmp_path, salt):
    ds = pydicom.dcmread(ENHANCED_CT)
    assert "RescaleIntercept" not in ds  # only in the functional groups
    hu = ds.pixel_array.astype(np.float64) - 1024.0
    samples, rejects = _curate(tmp_path / "out", [ENHANCED_CT], "--ct_windows", "soft_tissue", "dicom")
    assert not rejects and len(samples) == ds.NumberOfFrames
    frame_at = _frame_at_slice_index(ds)
    assert frame_at == {0: 1, 1: 0}  # this file stores its frames against the normal
    for img, meta in samples:
        frame = frame_at[meta["slice_index"]]
        assert meta["normalization"]["kind"] == "ct_window"
        assert [w["level"] for w in meta["normalization"]["windows"]] == [40.0, 49.0]  # the file's frame window
        expected = np.stack([apply_window(hu[frame], 40, 400), apply_window(hu[frame], 49, 102)], axis=-1)
        np.testing.assert_array_equal(img, expected)


def test_a_frame_s_own_groups_override_the_shared_ones(tmp_path, salt):
    ds = pydicom.dcmread(ENHANCED_CT)
    transform = Dataset()
    transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = -2048, 1, "HU"
    ds.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence = Sequence([transform])
    path = tmp_path / "in" / "ect_frame_rescale.dcm"
    path.parent.mkdir()
    ds.save_as(path)
    raw = ds.pixel_array.astype(np.float64)
    samples, _ = _curate(tmp_path / "out", [path.parent])
    frame_at = _frame_at_slice_index(ds)
    images = {frame_at[meta["slice_index"]]: img[:, :, 0] for img, meta in samples}
    np.testing.assert_array_equal(images[0], apply_window(raw[0] - 1024, 40, 400))
    np.testing.assert_array_equal(images[1], apply_window(raw[1] - 2048, 40, 400))


def test_frames_are_ordered_along_the_normal_with_their_spacing(tmp_path, salt):
    ds = pydicom.dcmread(ENHANCED_CT)
    samples, _ = _curate(tmp_path / "out", [ENHANCED_CT])
    frame_at = _frame_at_slice_index(ds)
    hu = ds.pixel_array.astype(np.float64) - 1024.0
    assert [meta["slice_index"] for _, meta in samples] == [0, 1]
    for img, meta in samples:
        assert meta["slice_axis"] == "native"  # a position along the normal, as a series' slices have
        assert meta["spacing"] == [0.388672, 0.388672]  # PixelMeasuresSequence, not a top-level PixelSpacing
        np.testing.assert_array_equal(img[:, :, 0], apply_window(hu[frame_at[meta["slice_index"]]], 40, 400))


def _single_frame_series(ds: pydicom.Dataset, folder: Path) -> None:
    """The enhanced CT written as the classic series it stands for: one CT Image file per frame, with the
    frame's position and the shared orientation, spacing, rescale and window at the top level."""
    folder.mkdir(parents=True)
    shared = ds.SharedFunctionalGroupsSequence[0]
    frames = ds.pixel_array
    for i, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        one = Dataset()
        for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "Rows",
                        "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
                        "HighBit", "PixelRepresentation"):
            setattr(one, keyword, ds[keyword].value)
        one.SOPClassUID, one.SOPInstanceUID = pydicom.uid.CTImageStorage, pydicom.uid.generate_uid()
        one.ImagePositionPatient = group.PlanePositionSequence[0].ImagePositionPatient
        one.ImageOrientationPatient = shared.PlaneOrientationSequence[0].ImageOrientationPatient
        one.PixelSpacing = shared.PixelMeasuresSequence[0].PixelSpacing
        transform, voi = shared.PixelValueTransformationSequence[0], shared.FrameVOILUTSequence[0]
        one.RescaleIntercept, one.RescaleSlope, one.RescaleType = (transform.RescaleIntercept,
                                                                   transform.RescaleSlope, "HU")
        one.WindowCenter, one.WindowWidth = voi.WindowCenter, voi.WindowWidth
        one.PixelData = np.ascontiguousarray(frames[i]).tobytes()
        one.file_meta = pydicom.dataset.FileMetaDataset()
        one.file_meta.MediaStorageSOPClassUID, one.file_meta.MediaStorageSOPInstanceUID = one.SOPClassUID, \
            one.SOPInstanceUID
        one.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        one.save_as(folder / f"frame{i}.dcm", enforce_file_format=True)


def test_an_enhanced_file_is_resliced_like_its_single_frame_series(tmp_path, salt):
    _single_frame_series(pydicom.dcmread(ENHANCED_CT), tmp_path / "series")
    flags = ("--dicom_reslice", "coronal", "sagittal", "--ct_windows", "soft_tissue", "dicom")
    enhanced, rejects = _curate(tmp_path / "out_enhanced", [ENHANCED_CT], *flags)
    series, _ = _curate(tmp_path / "out_series", [tmp_path / "series"], *flags)
    manifest = json.loads((tmp_path / "out_enhanced" / "manifest.json").read_text())
    assert not rejects and manifest["series_resliced"] == 1 and manifest["files_used"] == 1
    by_plane = {}
    for _, meta in enhanced:
        by_plane.setdefault(meta["slice_axis"], []).append(meta["slice_index"])
    assert sorted(by_plane) == ["coronal", "native", "sagittal"]  # 512 planes each, less the exact duplicates
    assert len(by_plane["coronal"]) > 300 and len(by_plane["sagittal"]) > 300

    def keyed(samples):
        return {(m["slice_axis"], m["slice_index"]): (img, m) for img, m in samples}

    enhanced_by_key, series_by_key = keyed(enhanced), keyed(series)
    assert enhanced_by_key.keys() == series_by_key.keys()
    for key, (img, meta) in enhanced_by_key.items():
        other_img, other_meta = series_by_key[key]
        np.testing.assert_array_equal(img, other_img, err_msg=str(key))
        for field in ("spacing", "normalization", "size", "orig_shape"):
            if key[0] != "native" or field != "orig_shape":  # native: the file's [frames, rows, cols]
                assert meta[field] == other_meta[field], (key, field)


def test_frames_that_are_no_regular_stack_are_curated_but_not_resliced(tmp_path, salt):
    ds = pydicom.dcmread(ENHANCED_CT)
    frames = ds.PerFrameFunctionalGroupsSequence
    frames[1].PlanePositionSequence[0].ImagePositionPatient = frames[0].PlanePositionSequence[0].ImagePositionPatient
    path = tmp_path / "in" / "ect_one_position.dcm"
    path.parent.mkdir()
    ds.save_as(path)
    samples, rejects = _curate(tmp_path / "out", [path.parent], "--dicom_reslice", "coronal")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert not rejects and len(samples) == 2 and manifest["series_not_resliced"] == 1
    assert [meta["slice_index"] for _, meta in samples] == [0, 0]  # one position: one index, as in a series
    state = (tmp_path / "out" / ".curate_state.jsonl").read_text()
    assert "the frames do not form a regular stack" in state and "share a position" in state


def test_frames_in_several_orientations_keep_their_file_order(tmp_path, salt):
    ds = pydicom.dcmread(ENHANCED_CT)
    sagittal = Dataset()
    sagittal.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.PerFrameFunctionalGroupsSequence[0].PlaneOrientationSequence = Sequence([sagittal])  # a localizer-like file
    path = tmp_path / "in" / "ect_two_orientations.dcm"
    path.parent.mkdir()
    ds.save_as(path)
    samples, _ = _curate(tmp_path / "out", [path.parent])
    assert [(meta["slice_axis"], meta["slice_index"]) for _, meta in samples] == [("frame", 0), ("frame", 1)]
    assert all(meta["spacing"] == [0.388672, 0.388672] for _, meta in samples)  # the shared pixel measures


@pytest.mark.parametrize(("path", "words"), [(PYDICOM_DATA / "liver.dcm", "segmentation"),
                                             (PYDICOM_FILES / "rtdose.dcm", "dose grid")],
                         ids=["SEG", "RTDOSE"])
def test_segmentations_and_dose_grids_are_rejected_with_the_reason(tmp_path, salt, path, words):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(path, folder / path.name)
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", folder / "CT_small.dcm")  # the rest of the run goes on
    samples, rejects = _curate(tmp_path / "out", [folder], "--min_size", "4")
    assert len(samples) == 1 and samples[0][1]["modality"] == "CT"
    assert len(rejects) == 1 and rejects[0]["path"].endswith(path.name)
    assert "not an image of the patient" in rejects[0]["reason"] and words in rejects[0]["reason"]
