"""``--percentile_scope volume`` for DICOM: the native slices of a series and the frames of a multi-frame file are
scaled by one percentile range (the volume's), as NIfTI volumes are, instead of each image by its own.

Real pixel data throughout: pydicom-data's 10-frame MR (``emri_small.dcm``) and pydicom's 5-slice axial CT series
``CT5N``. The CT series is also curated relabeled as MR (Modality and the window changed in copies of its files,
pixels untouched), since only non-CT images are percentile-scaled and pydicom ships no multi-file MR series with
one orientation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from data_curation.cli import main as curate_main
from data_curation.format import decode_image, decode_meta
from data_curation.intensity import scale_range
from data_curation.readers.dicom import RANGE_MAX_SLICES, range_indices

SITE = Path(pydicom.__file__).parent.parent
CT5N = SITE / "pydicom" / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
EMRI = SITE / "data_store" / "data" / "emri_small.dcm"
SALT = "series-range-test-salt-0123456789ab"


@pytest.fixture()
def salt(monkeypatch):
    monkeypatch.setenv("SCANMAE_CURATE_SALT", SALT)


def _curate(out: Path, inputs: list[Path], *flags: str) -> tuple[dict, list[tuple[np.ndarray, dict]]]:
    assert curate_main([*map(str, inputs), "--output", str(out), "--workers", "1", "--no-progress",
                        "--min_size", "4", "--min_foreground", "0", *flags]) == 0
    import webdataset as wds

    samples = wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")), shardshuffle=False)
    return json.loads((out / "manifest.json").read_text()), [(decode_image(s), decode_meta(s)) for s in samples]


def _relabeled_series(dst: Path) -> list[Path]:
    """CT5N's files with Modality MR and no window (so the percentile path scales them), sorted by z."""
    dst.mkdir()
    paths = []
    for src in sorted(CT5N.iterdir()):
        ds = pydicom.dcmread(src)
        ds.Modality = "MR"
        for keyword in ("WindowCenter", "WindowWidth"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(dst / src.name)
        paths.append(dst / src.name)
    return sorted(paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))


def _values(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return apply_modality_lut(ds.pixel_array, ds).astype(np.float32)


def _expected_range(slices: list[np.ndarray]) -> tuple[float, float]:
    """0.5 / 99.5 percentiles of every value (these volumes are far below the sampling limit)."""
    lo, hi = np.percentile(np.concatenate([v.reshape(-1) for v in slices]), [0.5, 99.5])
    return float(lo), float(hi)


def test_native_slices_of_a_series_share_the_series_range(tmp_path, salt):
    paths = _relabeled_series(tmp_path / "series")
    values = [_values(p) for p in paths]
    lo, hi = _expected_range(values)
    manifest, samples = _curate(tmp_path / "out", [tmp_path / "series"], "--dicom_reslice", "coronal")
    assert manifest["files_used"] == len(paths)
    native = {m["slice_index"]: (img, m) for img, m in samples if m["slice_axis"] == "native"}
    assert sorted(native) == list(range(len(paths)))
    for k, (img, meta) in native.items():
        norm = meta["normalization"]
        assert (norm["kind"], norm["scope"]) == ("percentile", "series")
        assert norm["range"] == pytest.approx([lo, hi])
        np.testing.assert_array_equal(img[:, :, 0], scale_range(values[k], lo, hi))
    # the resliced planes of the series use the same range as its native slices
    coronal = [m["normalization"] for _, m in samples if m["slice_axis"] == "coronal"]
    assert coronal and all(n["scope"] == "series" and n["range"] == pytest.approx([lo, hi]) for n in coronal)

    # per image, as before: each slice its own range, which is not the series' for every slice
    _, per_image = _curate(tmp_path / "out_image", [tmp_path / "series"], "--percentile_scope", "image")
    ranges = set()
    for img, meta in per_image:
        k = meta["slice_index"]
        own = _expected_range([values[k]])
        assert meta["normalization"]["scope"] == "image" and "range" not in meta["normalization"]
        np.testing.assert_array_equal(img[:, :, 0], scale_range(values[k], *own))
        ranges.add(own)
    assert len(ranges) > 1 and (lo, hi) not in ranges


def test_frames_of_a_multi_frame_file_share_one_range(tmp_path, salt):
    ds = pydicom.dcmread(EMRI)
    frames = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)  # (10, 64, 64)
    lo, hi = _expected_range(list(frames))
    _, samples = _curate(tmp_path / "out", [EMRI])
    assert len(samples) == frames.shape[0]
    for img, meta in samples:
        norm = meta["normalization"]
        assert meta["slice_axis"] == "frame" and norm["scope"] == "frames" and norm["range"] == pytest.approx([lo, hi])
        np.testing.assert_array_equal(img[:, :, 0], scale_range(frames[meta["slice_index"]], lo, hi))


def test_an_unreadable_slice_is_rejected_alone_and_left_out_of_the_range(tmp_path, salt):
    paths = _relabeled_series(tmp_path / "series")
    broken = paths[2]
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) - 200])  # pixel data cut short
    good = [p for p in paths if p != broken]
    lo, hi = _expected_range([_values(p) for p in good])
    manifest, samples = _curate(tmp_path / "out", [tmp_path / "series"])
    assert manifest["files_used"] == len(good) and manifest["files_rejected"] == 1
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["path"].endswith(broken.name) and "truncated" in rejects[0]["reason"]
    assert len(samples) == len(good)
    assert all(m["normalization"]["range"] == pytest.approx([lo, hi]) for _, m in samples)


def test_a_slice_with_its_own_window_keeps_it_and_the_rest_share_their_range(tmp_path, salt):
    paths = _relabeled_series(tmp_path / "series")
    windowed = paths[1]
    ds = pydicom.dcmread(windowed)
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.save_as(windowed)
    others = [p for p in paths if p != windowed]
    lo, hi = _expected_range([_values(p) for p in others])
    _, samples = _curate(tmp_path / "out", [tmp_path / "series"])
    kinds = sorted(m["normalization"]["kind"] for _, m in samples)
    assert kinds == ["dicom_window"] + ["percentile"] * len(others)
    assert all(m["normalization"]["range"] == pytest.approx([lo, hi]) for _, m in samples
               if m["normalization"]["kind"] == "percentile")


def test_a_resumed_run_scales_and_indexes_the_rest_of_a_series_as_an_uninterrupted_run(tmp_path, salt, monkeypatch):
    """A run stopped after two slices of a series: the resumed run plans the series whole (all its files, also
    those already curated), so its other slices get the same range and slice indices as in one run."""
    from data_curation import writer as writer_mod

    _relabeled_series(tmp_path / "series")
    _, reference = _curate(tmp_path / "full", [tmp_path / "series"])
    expected = {m["slice_index"]: (img, m["normalization"]) for img, m in reference}

    real_write, calls = writer_mod.ShardSink.write, {"n": 0}

    def crashing_write(self, sample, item_id):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real_write(self, sample, item_id)

    out = tmp_path / "resumed"
    flags = ["--shard_maxcount", "1"]
    monkeypatch.setattr(writer_mod.ShardSink, "write", crashing_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _curate(out, [tmp_path / "series"], *flags)
    monkeypatch.setattr(writer_mod.ShardSink, "write", real_write)
    manifest, resumed = _curate(out, [tmp_path / "series"], *flags)
    assert manifest["files_used"] == len(expected) == len(resumed)
    for img, meta in resumed:
        ref_img, ref_norm = expected[meta["slice_index"]]
        assert meta["normalization"] == ref_norm
        np.testing.assert_array_equal(img, ref_img)


def test_ct_series_keep_their_windows(tmp_path, salt):
    _, samples = _curate(tmp_path / "out", [CT5N])
    assert samples and all(m["normalization"]["kind"] == "ct_window" for _, m in samples)


def test_range_reads_evenly_spaced_slices_of_long_series():
    assert range_indices(5) == [0, 1, 2, 3, 4]
    picked = range_indices(300)
    assert len(picked) == RANGE_MAX_SLICES and picked[0] == 0 and picked[-1] == 299
    gaps = np.diff(picked)
    assert gaps.max() - gaps.min() <= 1
