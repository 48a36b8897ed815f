"""Input roots that share a name: every file keeps its own item id, sample keys and per-source counts."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

from data_curation.cli import main as curate_main
from data_curation.deid import source_label
from data_curation.discover import source_names

REPO = Path(__file__).resolve().parent.parent
XRAYS = sorted((REPO / "sample_data" / "xray").rglob("*.jpeg"))
SALT = "source-name-test-salt-0123456789"


def test_source_names_keep_unique_basenames_and_tell_clashes_apart(tmp_path):
    a, b, c = tmp_path / "siteA" / "scans", tmp_path / "siteB" / "scans", tmp_path / "other" / "siteA"
    assert source_names([a, tmp_path / "ct"]) == ["scans", "ct"]
    assert source_names([a, b]) == ["siteA/scans", "siteB/scans"]
    assert source_names([a, b, a]) == ["siteA/scans", "siteB/scans", None]  # a root given twice: walked once
    # "siteA" would be a path prefix of "siteA/scans": both grow until no id can be shared.
    assert source_names([a, b, c]) == [f"{tmp_path.name}/siteA/scans", "siteB/scans", "other/siteA"]


def test_same_named_roots_with_same_relative_paths_lose_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SCANMAE_CURATE_SALT", SALT)
    roots = [tmp_path / "siteA" / "scans", tmp_path / "siteB" / "scans"]
    for root, images in zip(roots, (XRAYS[:2], XRAYS[2:4])):
        root.mkdir(parents=True)
        for i, image in enumerate(images):  # the same relative names in both roots, different images
            shutil.copy(image, root / f"img{i}.jpeg")
    out = tmp_path / "out"
    assert curate_main([*map(str, roots), "--output", str(out), "--workers", "1", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files_seen"] == manifest["files_used"] == 4
    assert manifest["samples_written"] == 4
    assert sorted(manifest["per_source"]) == sorted(source_label(SALT.encode(), name)
                                                    for name in ("siteA/scans", "siteB/scans"))
    keys = []
    for shard in manifest["shards"]:
        with tarfile.open(out / "shards" / shard["name"]) as tf:
            keys += [m.name.split(".")[0] for m in tf.getmembers() if m.name.endswith(".json")]
    assert len(keys) == len(set(keys)) == 4


def _same_patient_studies(folder: Path, n: int) -> None:
    """``n`` real CT slices, each its own study, all under one (anonymised) PatientID; pixels made distinct so
    that none is a duplicate of another."""
    import pydicom

    src = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
    folder.mkdir(parents=True)
    for i in range(n):
        ds = pydicom.dcmread(src)
        ds.PatientID, ds.PatientName = "ANONYMOUS", "ANONYMOUS"
        ds.StudyInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesInstanceUID = pydicom.uid.generate_uid()
        pixels = ds.pixel_array.copy()
        pixels[: 8 * (i + 1), :8] = pixels.max()  # a distinct corner per file
        ds.PixelData = pixels.astype(pixels.dtype).tobytes()
        ds.save_as(folder / f"ct{i}.dcm")


def _subjects(out: Path) -> list[str]:
    subjects = []
    for shard in (out / "shards").glob("*.tar"):
        with tarfile.open(shard) as tf:
            subjects += [json.loads(tf.extractfile(m).read())["subject"] for m in tf.getmembers()
                         if m.name.endswith(".json")]
    return subjects


def test_subject_key_study_splits_a_blanked_patient_id_by_study(tmp_path: Path, monkeypatch, capsys) -> None:
    import data_curation.run as run_mod

    monkeypatch.setenv("SCANMAE_CURATE_SALT", SALT)
    monkeypatch.setattr(run_mod, "ONE_SUBJECT_MIN_SAMPLES", 5)
    _same_patient_studies(tmp_path / "in", 6)
    common = ["--workers", "1", "--no-progress"]
    capsys.readouterr()
    assert curate_main([str(tmp_path / "in"), "--output", str(tmp_path / "patient"), *common]) == 0
    said = capsys.readouterr().out
    assert "6 of the 6 samples written belong to one subject (--subject_key patient)" in said
    assert "--subject_key study" in said
    subjects = _subjects(tmp_path / "patient")
    assert len(subjects) == 6 and len(set(subjects)) == 1  # one subject: one split for all six studies
    assert curate_main([str(tmp_path / "in"), "--output", str(tmp_path / "study"), "--subject_key", "study",
                        *common]) == 0
    assert len(set(_subjects(tmp_path / "study"))) == 6
    assert "belong to one subject" not in capsys.readouterr().out
    assert curate_main([str(tmp_path / "in"), "--output", str(tmp_path / "bad"), "--subject_key", "file",
                        *common]) == 2
    assert "--subject_key must be one of patient, study, series" in capsys.readouterr().err


def test_one_subject_warning_thresholds(capsys) -> None:
    from collections import Counter

    from data_curation.run import _warn_if_one_subject

    _warn_if_one_subject(Counter({"a": 190, "b": 10}), "study")
    assert "190 of the 200 samples written belong to one subject" in capsys.readouterr().out
    _warn_if_one_subject(Counter({"a": 150, "b": 50}), "patient")  # 75 %: no warning
    _warn_if_one_subject(Counter({"a": 19, "b": 1}), "patient")  # too few samples to say
    assert "belong to one subject" not in capsys.readouterr().out


def test_missing_input_and_file_output_are_said_plainly(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SCANMAE_CURATE_SALT", SALT)
    missing = tmp_path / "typo_in_path"
    assert curate_main([str(missing), "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    said = capsys.readouterr()
    assert f"input {missing} does not exist" in said.out
    assert "holds no samples: every input was rejected or a duplicate" in said.err
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"path": str(missing), "reason": "input does not exist or is not readable"}]
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert curate_main([str(missing), "--output", str(a_file), "--no-progress"]) == 2
    assert f"--output {a_file} exists and is not a folder" in capsys.readouterr().err
