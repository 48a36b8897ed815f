"""De-identification over every real test DICOM, resume after an interrupted run, salt handling, format."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from data_curation import writer as writer_mod
from data_curation.cli import main as curate_main
from data_curation.deid import SaltError, load_salt, source_label
from data_curation.format import decode_image, encode_image

SITE = Path(pydicom.__file__).parent.parent
DICOM_DIRS = [SITE / "pydicom" / "data" / "test_files", SITE / "data_store" / "data"]
SALT = "phi-test-salt-0123456789abcdef"


def _identifiers() -> set[str]:
    values: set[str] = set()
    for folder in DICOM_DIRS:
        for path in folder.rglob("*"):
            if not path.is_file():
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
                for kw in ("PatientName", "PatientID"):
                    v = str(ds.get(kw, "") or "").strip()
                    if len(v) >= 2:
                        values.add(v)
            except Exception:  # noqa: BLE001 - unreadable test files simply carry no identifier
                continue
    return values


def test_no_patient_identifier_reaches_shards_or_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("SCANMAE_CURATE_SALT", SALT)
    ids = _identifiers()
    assert len(ids) >= 30  # the real test files carry many names / ids
    out = tmp_path / "out"
    assert curate_main([*map(str, DICOM_DIRS), "--output", str(out), "--workers", "2", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples_written"] > 100
    blobs = [p.read_bytes() for p in (out / "shards").glob("*.tar")] + [(out / "manifest.json").read_bytes()]
    # Byte-level check for every value that cannot occur by chance in tar headers / compressed pixels
    # (short all-digit ids such as "0010" are tar-header octal digits; runs of one or two characters such
    # as the empty person name "^^^^" occur in compressed pixel rows); all values are checked against
    # every string in the metadata and manifest below.
    distinctive = {v for v in ids if (len(v) >= 6 or (len(v) >= 4 and not v.isdigit())) and len(set(v)) >= 3}
    assert len(distinctive) >= 30
    for blob in blobs:
        for value in distinctive:
            assert value.encode() not in blob, f"identifier {value!r} leaked"
        assert SALT.encode() not in blob
    strings = set(_json_strings(manifest))
    import tarfile

    for tar in (out / "shards").glob("*.tar"):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    strings.update(_json_strings(json.loads(tf.extractfile(m).read())))
    for value in ids:
        assert not any(value == s or (len(value) >= 4 and value in s) for s in strings), value
    for name in ("PatientName", "PatientID", "StudyInstanceUID", "InstitutionName", "AccessionNumber"):
        assert all(name.encode() not in blob for blob in blobs)


def test_input_folder_named_after_a_patient_reaches_neither_shards_nor_manifest(tmp_path, monkeypatch, capsys):
    """PACS exports name folders after patients: the folder's name and path stay in the operator's files (the
    console summary, the ledger), shards and manifest get a keyed label; --public_source_names opts out."""
    monkeypatch.setenv("SCANMAE_CURATE_SALT", SALT)
    name = "DOE^JANE_MRN4417"
    folder = tmp_path / "exports" / name
    folder.mkdir(parents=True)
    for dcm in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(DICOM_DIRS[0] / dcm, folder / dcm)
    out = tmp_path / "out"
    assert curate_main([str(folder), "--output", str(out), "--workers", "1", "--no-progress"]) == 0
    assert name in capsys.readouterr().out  # the operator still sees which folder is which
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples_written"] == 2 and list(manifest["per_source"]) == [source_label(SALT.encode(), name)]
    for blob in [p.read_bytes() for p in (out / "shards").glob("*.tar")] + [(out / "manifest.json").read_bytes()]:
        assert b"MRN4417" not in blob and str(tmp_path).encode() not in blob  # no name, no path (config included)
    public = tmp_path / "public"
    assert curate_main([str(folder), "--output", str(public), "--workers", "1", "--no-progress",
                        "--public_source_names"]) == 0
    assert list(json.loads((public / "manifest.json").read_text())["per_source"]) == [name]


def _json_strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in [k, *_json_strings(v)]]
    if isinstance(obj, list):
        return [s for v in obj for s in _json_strings(v)]
    return []


class _Crash(RuntimeError):
    pass


def test_resume_after_interrupted_run_writes_only_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("SCANMAE_CURATE_SALT", SALT)
    src = str(DICOM_DIRS[1])
    args = ["--workers", "1", "--no-progress", "--shard_maxcount", "20"]
    full = tmp_path / "full"
    assert curate_main([src, "--output", str(full), *args]) == 0
    reference = json.loads((full / "manifest.json").read_text())

    real_write, calls = writer_mod.ShardSink.write, {"n": 0}

    def crashing_write(self, sample, item_id):
        calls["n"] += 1
        if calls["n"] == 55:  # after two shards of 20 were completed and one is half written
            raise _Crash("simulated crash")
        return real_write(self, sample, item_id)

    out = tmp_path / "resumed"
    monkeypatch.setattr(writer_mod.ShardSink, "write", crashing_write)
    with pytest.raises(_Crash):
        curate_main([src, "--output", str(out), *args])
    monkeypatch.setattr(writer_mod.ShardSink, "write", real_write)
    assert not (out / "manifest.json").exists()
    assert curate_main([src, "--output", str(out), *args]) == 0
    resumed = json.loads((out / "manifest.json").read_text())
    for key in ("files_seen", "files_used", "files_rejected", "files_duplicate", "samples_written"):
        assert resumed[key] == reference[key], key
    keys = []
    for shard in resumed["shards"]:
        import tarfile

        with tarfile.open(out / "shards" / shard["name"]) as tf:
            keys += [m.name.split(".")[0] for m in tf.getmembers() if m.name.endswith(".json")]
    assert len(keys) == len(set(keys)) == reference["samples_written"]  # nothing written twice


def test_unreadable_file_is_rejected(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("root can read files with mode 000")
    monkeypatch.setenv("SCANMAE_CURATE_SALT", SALT)
    f = tmp_path / "in" / "locked.dcm"
    f.parent.mkdir()
    f.write_bytes((DICOM_DIRS[0] / "CT_small.dcm").read_bytes())
    f.chmod(0)
    assert curate_main([str(f.parent), "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    rejects = (tmp_path / "out" / "rejects.jsonl").read_text()
    assert "locked.dcm" in rejects and "unreadable file" in rejects


def test_salt_file_inside_output_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("SCANMAE_CURATE_SALT", raising=False)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "salt").write_text("x" * 40)
    with pytest.raises(SaltError):
        load_salt(str(out / "salt"), out)
    (tmp_path / "salt").write_text("y" * 40)
    assert load_salt(str(tmp_path / "salt"), out)[0] == b"y" * 40


@pytest.mark.parametrize("shape,dtype,ext", [((9, 7), np.uint8, "png"), ((9, 7), np.uint16, "png"),
                                             ((9, 7, 3), np.uint8, "png"), ((9, 7, 3), np.uint16, "npy"),
                                             ((9, 7, 2), np.uint8, "npy")])
def test_format_round_trip_real_pixels(shape, dtype, ext):
    ds = pydicom.dcmread(DICOM_DIRS[0] / "CT_small.dcm")
    px = ds.pixel_array.astype(np.int64) - int(ds.pixel_array.min())
    top = np.iinfo(dtype).max
    base = np.clip(px[: shape[0], : shape[1]] * (1 if dtype == np.uint16 else 1) % (top + 1), 0, top)
    arr = np.stack([base] * (shape[2] if len(shape) == 3 else 1), axis=-1).astype(dtype)
    arr = arr[:, :, 0] if len(shape) == 2 else arr
    got_ext, data = encode_image(arr)
    assert got_ext == ext
    out = decode_image({got_ext: data})
    assert out.dtype == dtype and np.array_equal(out.reshape(arr.shape), arr)
