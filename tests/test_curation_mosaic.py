"""Siemens mosaics: each tile a slice of its own, on real headers from nibabel's Siemens test files.

nibabel's diffusion mosaics (``siemens_dwi_1000.dcm.gz``, 48 slices of 128x128 in a 7x7 grid) carry real Siemens
headers but blank pixels, so the tests put a real MR volume into a copy: pydicom-data's ``emri_small.dcm`` (10
frames of 64x64), tiled as a scanner does (4x4 grid, row by row, the rest of the grid empty).
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest

from data_curation.cli import main as curate_main
from data_curation.format import decode_image, decode_meta
from data_curation.intensity import apply_window

SITE = Path(pydicom.__file__).parent.parent
EMRI = SITE / "data_store" / "data" / "emri_small.dcm"
NICOM = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"
DWI_MOSAIC = NICOM / "siemens_dwi_1000.dcm.gz"
RAMP_MOSAIC = NICOM / "0.dcm"  # 48 slices claimed, 256x256 pixels: no 7x7 grid of equal tiles
SALT = "mosaic-test-salt-0123456789abcdef"


@pytest.fixture()
def salt(monkeypatch):
    monkeypatch.setenv("SCANMAE_CURATE_SALT", SALT)


def _mosaic_of_real_mr(path: Path, volume: np.ndarray, **changes: object) -> None:
    """A copy of the Siemens diffusion mosaic whose pixels are ``volume`` (slices, 64, 64) tiled 4 to a row."""
    ds = pydicom.dcmread(gzip.open(DWI_MOSAIC))
    side, tile = 4, volume.shape[1]
    grid = np.zeros((side * tile, side * tile), np.uint16)
    for k, image in enumerate(volume):
        r, c = divmod(k, side)
        grid[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = image
    ds.Rows = ds.Columns = side * tile
    ds[0x0019, 0x100A].value = len(volume)
    ds.PixelData = grid.tobytes()
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)


def _real_mr() -> np.ndarray:
    return pydicom.dcmread(EMRI).pixel_array.astype(np.uint16)  # (10, 64, 64)


def _curate(out: Path, inputs: list[Path], *flags: str) -> tuple[list[tuple[np.ndarray, dict]], list[dict], dict]:
    assert curate_main([*map(str, inputs), "--output", str(out), "--workers", "1", "--no-progress", *flags]) == 0
    import webdataset as wds

    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    samples = wds.WebDataset(shards, shardshuffle=False) if shards else []
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    decoded = [(decode_image(s), decode_meta(s)) for s in samples]
    return decoded, rejects, json.loads((out / "manifest.json").read_text())


def test_each_tile_is_a_slice_and_a_broken_mosaic_is_rejected(tmp_path, salt):
    volume = _real_mr()
    _mosaic_of_real_mr(tmp_path / "in" / "mosaic.dcm", volume)
    shutil.copy(RAMP_MOSAIC, tmp_path / "in" / "ramp_mosaic.dcm")
    samples, rejects, _ = _curate(tmp_path / "out", [tmp_path / "in"], "--min_foreground", "0",
                                  "--size_policy", "keep")
    ds = pydicom.dcmread(tmp_path / "in" / "mosaic.dcm")
    level, width = float(ds.WindowCenter), float(ds.WindowWidth)
    by_index = {meta["slice_index"]: (img, meta) for img, meta in samples}
    assert sorted(by_index) == list(range(len(volume)))  # 10 slices, not one grid, not the 6 empty tiles
    for k, (img, meta) in by_index.items():
        assert img.shape == (64, 64, 1) and meta["slice_axis"] == "native"
        assert meta["orig_shape"] == [10, 64, 64]
        np.testing.assert_array_equal(img[:, :, 0], apply_window(volume[k], level, width))
    assert len(rejects) == 1 and rejects[0]["path"].endswith("ramp_mosaic.dcm")
    assert "do not split into 7x7 equal tiles" in rejects[0]["reason"]


def test_percentiles_span_the_whole_mosaic_and_empty_slices_are_left_out(tmp_path, salt):
    volume = _real_mr()
    volume[3] = 0  # a slice outside the body
    _mosaic_of_real_mr(tmp_path / "in" / "mosaic.dcm", volume, WindowCenter=None, WindowWidth=None)
    samples, _, manifest = _curate(tmp_path / "out", [tmp_path / "in"], "--percentile_scope", "volume")
    assert sorted(meta["slice_index"] for _, meta in samples) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert manifest["slices_skipped_background"] == 1
    expected = np.percentile(volume.astype(np.float32), [0.5, 99.5])
    for _, meta in samples:
        norm = meta["normalization"]
        assert norm["kind"] == "percentile" and norm["scope"] == "mosaic"
        np.testing.assert_allclose(norm["range"], expected, rtol=1e-5)


def test_mosaics_of_one_series_are_volumes_not_slices_of_a_stack(tmp_path, salt):
    volume = _real_mr()
    _mosaic_of_real_mr(tmp_path / "in" / "b1000.dcm", volume)  # one series, one position: two diffusion volumes
    _mosaic_of_real_mr(tmp_path / "in" / "b0.dcm", np.flip(volume, axis=2).copy(),
                       SOPInstanceUID=pydicom.uid.generate_uid())
    samples, rejects, manifest = _curate(tmp_path / "out", [tmp_path / "in"], "--min_foreground", "0",
                                         "--dicom_reslice", "coronal")
    assert not rejects and manifest["series_not_resliced"] == 0  # no series of two "slices" at one position
    assert sorted(meta["slice_index"] for _, meta in samples) == sorted(list(range(10)) * 2)


def test_a_mosaic_that_does_not_say_how_many_slices_it_holds_is_rejected(tmp_path, salt):
    path = tmp_path / "in" / "mosaic.dcm"
    _mosaic_of_real_mr(path, _real_mr())
    ds = pydicom.dcmread(path)
    for tag in ((0x0019, 0x100A), (0x0029, 0x1010), (0x0029, 0x1020)):  # the count and both CSA headers
        ds.pop(tag, None)
    ds.save_as(path)
    samples, rejects, _ = _curate(tmp_path / "out", [path.parent])
    assert not samples and len(rejects) == 1
    assert "Siemens mosaic without its number of slices" in rejects[0]["reason"]
