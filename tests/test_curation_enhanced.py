"""Enhanced multi-frame DICOM and derived objects, on real files from pydicom / pydicom-data.

- An Enhanced CT keeps its rescale and window in functional groups, not at the top level: its frames must be
  windowed in HU like any CT (they were percentile-scaled from raw stored values), with a frame's own groups
  overriding the shared ones.
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
    for img, meta in samples:
        frame = meta["slice_index"]
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
    images = {meta["slice_index"]: img[:, :, 0] for img, meta in samples}
    np.testing.assert_array_equal(images[0], apply_window(raw[0] - 1024, 40, 400))
    np.testing.assert_array_equal(images[1], apply_window(raw[1] - 2048, 40, 400))


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
