"""End-to-end curation of a small real-data selection (curated once per session, inspected by many tests)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from data_curation.cli import main as curate_main
from data_curation.format import SPLITS, decode_image, decode_meta
from data_curation.intensity import apply_window

SITE = Path(pydicom.__file__).parent.parent
PYDICOM_FILES = SITE / "pydicom" / "data" / "test_files"
PYDICOM_DATA = SITE / "data_store" / "data"
NIBABEL_DATA = SITE / "nibabel" / "tests" / "data"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KERMANY = SHARED / "xray" / "kermany_cxr_224"
SALT = "test-salt-not-a-secret-0123456789"

DICOMS = {  # name -> folder
    "693_UNCI.dcm": PYDICOM_DATA, "MR_small_jp2klossless.dcm": PYDICOM_FILES, "CT_small.dcm": PYDICOM_FILES,
    "MR_small_RLE.dcm": PYDICOM_FILES, "emri_small.dcm": PYDICOM_DATA, "RG1_UNCI.dcm": PYDICOM_DATA,
    "SC_rgb.dcm": PYDICOM_DATA, "SC_ybr_full_uncompressed.dcm": PYDICOM_DATA,
    "OT-PAL-8-face.dcm": PYDICOM_DATA, "rtplan.dcm": PYDICOM_FILES, "waveform_ecg.dcm": PYDICOM_FILES,
    "MR_truncated.dcm": PYDICOM_FILES, "emri_small_jpeg_2k_lossless_too_short.dcm": PYDICOM_DATA,
    "test-SR.dcm": PYDICOM_FILES,
}
EXPECTED_REJECTS = {  # file name -> words the reason must contain
    "rtplan.dcm": "not an image: RT Plan", "waveform_ecg.dcm": "not an image: 12-lead ECG",
    "test-SR.dcm": "not an image: Comprehensive SR", "MR_truncated.dcm": "truncated pixel data",
    "emri_small_jpeg_2k_lossless_too_short.dcm": "truncated", "empty.dcm": "empty file (0 bytes)",
    "notes.dcm": "not a DICOM file", "corrupt.nii.gz": "corrupt", "tiny_1x1.png": "image too small",
    "loop": "symlink loop",
}


def _build_inputs(root: Path) -> list[str]:
    dcm = root / "ct_dicom"
    dcm.mkdir(parents=True)
    for name, folder in DICOMS.items():
        shutil.copy(folder / name, dcm / name)
    shutil.copy(PYDICOM_DATA / "693_UNCI.dcm", dcm / "copy_of_693.dcm")  # exact duplicate
    (dcm / "empty.dcm").write_bytes(b"")
    (dcm / "notes.dcm").write_text("a text file with a .dcm name, not DICOM\n")
    (dcm / "sub").mkdir()
    os.symlink("..", dcm / "sub" / "loop")  # directory symlink back to an ancestor
    nii = root / "brain_nifti"
    nii.mkdir()
    shutil.copy(NIBABEL_DATA / "anatomical.nii", nii / "anatomical.nii")
    shutil.copy(NIBABEL_DATA / "example4d.nii.gz", nii / "example4d.nii.gz")
    raw = (NIBABEL_DATA / "example4d.nii.gz").read_bytes()
    (nii / "corrupt.nii.gz").write_bytes(raw[: len(raw) // 2])  # a real file cut in half
    anat = nib.load(str(NIBABEL_DATA / "anatomical.nii"))
    data = np.asarray(anat.dataobj).astype(np.float32)
    data[:3, :3, :] = np.nan  # inject non-finite voxels into a real volume
    data[-1, -1, 0] = np.inf
    assert nib.orientations.io_orientation(anat.affine)[2, 0] == 2  # source axis 2 is the axial axis
    data[:, :, :2] = np.nan  # two all-NaN axial slices: repaired to the minimum -> background, skipped
    (root / "nan_count.txt").write_text(str(int((~np.isfinite(data)).sum())))
    nib.save(nib.Nifti1Image(data, anat.affine), str(nii / "with_nan.nii.gz"))
    img = root / "xray_png"
    for split, cls in (("train", "NORMAL"), ("train", "PNEUMONIA"), ("test", "NORMAL")):
        (img / split / cls).mkdir(parents=True)
        for f in sorted((KERMANY / split / cls).iterdir())[:2]:
            shutil.copy(f, img / split / cls / f.name)
    first = sorted((KERMANY / "train" / "NORMAL").iterdir())[0]
    Image.open(first).convert("L").crop((100, 100, 101, 101)).save(img / "tiny_1x1.png")
    ct = pydicom.dcmread(PYDICOM_DATA / "693_UNCI.dcm")
    Image.fromarray(ct.pixel_array.astype(np.uint16)).save(img / "ct16.png")  # 16-bit PNG of real CT pixels
    npz = root / "medmnist"
    npz.mkdir()
    shutil.copy(SHARED / "medmnist" / "breastmnist.npz", npz / "breastmnist.npz")
    return [str(dcm), str(nii), str(img), str(npz)]


def read_shards(out: Path) -> list[dict]:
    samples = []
    for tar in sorted((out / "shards").glob("*.tar")):
        groups: dict[str, dict] = {}
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                groups.setdefault(key, {"__key__": key, "__shard__": tar.name})[ext] = tf.extractfile(m).read()
        samples.extend(groups.values())
    return samples


@pytest.fixture(scope="session")
def curated(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("curation")
    inputs = _build_inputs(root / "in")
    out = root / "out"
    os.environ["SCANMAE_CURATE_SALT"] = SALT
    rc = curate_main([*inputs, "--output", str(out), "--workers", "2", "--no-progress",
                      "--ct_windows", "brain", "bone", "--shard_maxcount", "300"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    samples = read_shards(out)
    metas = [decode_meta(s) for s in samples]
    return {"out": out, "inputs": inputs, "manifest": manifest, "rejects": rejects, "samples": samples,
            "metas": metas, "root": root}


def test_manifest_accounting_invariant(curated):
    m = curated["manifest"]
    assert m["files_seen"] == m["files_used"] + m["files_rejected"] + m["files_duplicate"]
    n_inputs = sum(len(files) for src in curated["inputs"] for _, _, files in os.walk(src)) + 1  # + the loop
    assert m["files_seen"] == n_inputs
    assert m["samples_written"] == len(curated["samples"]) == sum(s["samples"] for s in m["shards"])
    assert sum(m["samples_per_split"].values()) == m["samples_written"]
    assert len(curated["rejects"]) == m["files_rejected"]
    for shard in m["shards"]:
        data = (curated["out"] / "shards" / shard["name"]).read_bytes()
        assert len(data) == shard["bytes"] and hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert not [p for p in (curated["out"] / "shards").iterdir() if p.name.startswith(".tmp")]


def test_every_bad_input_is_named_with_its_reason(curated):
    by_name = {Path(r["path"]).name: r["reason"] for r in curated["rejects"]}
    for name, words in EXPECTED_REJECTS.items():
        assert name in by_name, f"{name} not in rejects.jsonl"
        assert words in by_name[name], f"{name}: {by_name[name]!r} lacks {words!r}"


def test_samples_round_trip_through_webdataset(curated):
    import webdataset as wds

    tars = sorted(str(p) for p in (curated["out"] / "shards").glob("*.tar"))
    n = 0
    for sample in wds.WebDataset(tars, shardshuffle=False):
        img, meta = decode_image(sample), decode_meta(sample)
        assert img.ndim == 3 and img.dtype in (np.uint8, np.uint16)
        assert img.shape[2] == len(meta["channels"]) and list(img.shape[:2]) == meta["size"]
        assert meta["split"] in SPLITS and "." not in sample["__key__"]
        n += 1
    assert n == curated["manifest"]["samples_written"]
    assert len({s["__key__"] for s in curated["samples"]}) == n


def test_ct_hu_windows_are_exact(curated):
    ds = pydicom.dcmread(PYDICOM_DATA / "693_UNCI.dcm")
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    ct = [(s, m) for s, m in zip(curated["samples"], curated["metas"]) if m["orig_shape"] == [512, 512]
          and m["modality"] == "CT"]
    assert len(ct) == 1  # copy_of_693.dcm is a duplicate
    img = decode_image(ct[0][0])
    assert ct[0][1]["channels"] == ["brain", "bone"]
    np.testing.assert_array_equal(img[:, :, 0], apply_window(hu, 40, 80))
    np.testing.assert_array_equal(img[:, :, 1], apply_window(hu, 400, 1800))
    # spot values: air (-1000 HU) is black in both windows, 80 HU (= level + width/2) is white in brain
    assert img[0, 0, 0] == 0 and img[0, 0, 1] == 0
    assert np.all(img[:, :, 0][hu >= 80] == 255) and np.all(img[:, :, 0][hu <= 0] == 0)


def _items(curated) -> list[dict]:
    lines = (curated["out"] / ".curate_state.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["t"] == "item"]


def _item(curated, name: str) -> dict:
    return next(r for r in _items(curated) if Path(r["path"]).name == name)


def test_duplicates_and_multiframe_and_colour(curated):
    dups = {Path(r["path"]).name for r in _items(curated) if r["status"] == "duplicate"}
    assert {"MR_small_jp2klossless.dcm", "copy_of_693.dcm"} & dups  # first of each pair written, other dup
    assert len({"MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"} & dups) == 1
    metas = curated["metas"]
    frames = sorted(x["slice_index"] for x in metas if x.get("slice_axis") == "frame" and x["modality"] == "MR"
                    and x["orig_shape"][0] == 10)
    assert frames == list(range(10))  # emri_small: 10 frames -> 10 samples
    rgb = [x for x in metas if x["channels"] == ["R", "G", "B"] and x["source_format"] == "dicom"]
    assert {x["normalization"]["kind"] for x in rgb} >= {"rgb", "palette_to_rgb"}
    mono1 = [x for x in metas if x["modality"] == "CR"]
    assert mono1 and mono1[0]["normalization"].get("inverted") is True


def test_monochrome1_is_inverted_numerically(curated):
    ds = pydicom.dcmread(PYDICOM_DATA / "RG1_UNCI.dcm")
    values = ds.pixel_array.astype(np.float64)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    sample = next(s for s, m in zip(curated["samples"], curated["metas"]) if m["modality"] == "CR")
    img = decode_image(sample)[:, :, 0].astype(int)
    # stored shrunk to <= 1024 px: compare means of the window-mapped, inverted source and the sample
    expected = 255 - np.clip(np.rint((values - (c - w / 2)) * 255 / w), 0, 255)
    assert abs(img.mean() - expected.mean()) < 2.0


def test_nifti_canonical_slices_background_and_nan(curated):
    metas = curated["metas"]
    anat = [m for m in metas if m["source_format"] == "nifti" and m["nonfinite_voxels"] == 0
            and len(m["orig_shape"]) == 3]
    img = nib.as_closest_canonical(nib.load(str(NIBABEL_DATA / "anatomical.nii")))
    n_axial = img.shape[2]
    skipped = curated["manifest"]["slices_skipped_background"]
    assert 0 < len(anat) <= n_axial and skipped >= 2
    assert len(anat) + _item(curated, "anatomical.nii")["skipped"] == n_axial
    nan = [m for m in metas if m.get("nonfinite_voxels")]
    n_bad = int((curated["root"] / "in" / "nan_count.txt").read_text())
    assert nan and all(m["nonfinite_voxels"] == n_bad for m in nan)  # repaired and counted
    nan_item = _item(curated, "with_nan.nii.gz")
    assert nan_item["skipped"] >= 2 and nan_item["samples"] + nan_item["skipped"] == n_axial
    four_d = [m for m in metas if len(m["orig_shape"]) == 4]
    assert {m["slice_axis"] for m in four_d} == {"axial"} and len(four_d) > 0


def test_nifti_slice_orientation_matches_canonical(curated):
    img = nib.as_closest_canonical(nib.load(str(NIBABEL_DATA / "anatomical.nii")))
    vol = np.asarray(img.dataobj, dtype=np.float32)
    k = vol.shape[2] // 2
    lo, hi = np.percentile(vol, [0.5, 99.5])
    expected = np.clip(np.rint((vol[:, :, k].T[::-1, ::-1] - lo) * 255 / (hi - lo)), 0, 255)
    match = [s for s, m in zip(curated["samples"], curated["metas"]) if m["source_format"] == "nifti"
             and m["slice_index"] == k and m["nonfinite_voxels"] == 0 and len(m["orig_shape"]) == 3]
    assert len(match) == 1
    got = decode_image(match[0])[:, :, 0].astype(int)
    assert np.abs(got - expected).max() <= 1


def test_image_folder_labels_splits_and_16bit(curated):
    metas = [m for m in curated["metas"] if m["source_format"] == "image"]
    named = {(m["label_name"], m["label"], m["split"]) for m in metas if m["label_name"]}
    assert named == {("NORMAL", 0, "train"), ("PNEUMONIA", 1, "train"), ("NORMAL", 0, "test")}
    assert all(m["channels"] == ["gray"] for m in metas)  # Kermany JPEGs are gray stored as RGB
    ct16 = [m for m in metas if m["orig_dtype"] in ("uint16", "int32") and m["label_name"] is None]
    assert ct16 and ct16[0]["normalization"]["kind"] == "percentile"


def test_npz_given_splits_and_labels(curated):
    metas = [m for m in curated["metas"] if m["source_format"] == "npz"]
    with np.load(SHARED / "medmnist" / "breastmnist.npz") as z:
        counts = {s: len(z[f"{s}_images"]) for s in SPLITS}
        labels = {s: np.bincount(z[f"{s}_labels"].reshape(-1)).tolist() for s in SPLITS}
    for split in SPLITS:
        got = [m["label"] for m in metas if m["split"] == split]
        dup = curated["manifest"]["samples_duplicate"]
        assert counts[split] - dup <= len(got) <= counts[split]
        assert abs(np.bincount(got).tolist()[1] - labels[split][1]) <= dup


def test_subject_level_split_is_consistent(curated):
    by_subject: dict[str, set] = {}
    for m in curated["metas"]:
        if m["source_format"] != "npz":
            by_subject.setdefault(m["subject"], set()).add(m["split"] if m["label_name"] is None else "given")
    assert all(len(v) == 1 for v in by_subject.values())


def test_no_salt_no_paths_in_outputs(curated):
    blob = b"".join(p.read_bytes() for p in (curated["out"] / "shards").glob("*.tar"))
    blob += (curated["out"] / "manifest.json").read_bytes()
    assert SALT.encode() not in blob
    assert str(curated["root"]).encode() not in blob.replace((curated["out"] / "manifest.json").read_bytes(), b"")


def test_rerun_is_idempotent(curated, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(curated["out"], out)
    before = sorted(p.name for p in (out / "shards").iterdir())
    assert curate_main([*curated["inputs"], "--output", str(out), "--workers", "1", "--no-progress",
                        "--ct_windows", "brain", "bone", "--shard_maxcount", "300"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in (out / "shards").iterdir()) == before
    for key in ("files_seen", "files_used", "files_rejected", "files_duplicate", "samples_written"):
        assert manifest[key] == curated["manifest"][key], key


def test_gzip_corruption_is_really_corrupt():
    raw = (NIBABEL_DATA / "example4d.nii.gz").read_bytes()
    with pytest.raises((EOFError, OSError)):
        gzip.decompress(raw[: len(raw) // 2])
