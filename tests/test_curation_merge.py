"""``curate --merge``: two parts curated from real files merged into one dataset (accounting, duplicates
across parts, renumbered readable shards, rejects), re-run no-op, resume after a crash, refused parts."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pydicom
import pytest

from data_curation import merge as merge_mod
from data_curation.cli import main as curate_main
from data_curation.format import decode_image, decode_meta
from data_curation.merge import MergeError, merge

SITE = Path(pydicom.__file__).parent.parent
PYDICOM_FILES = SITE / "pydicom" / "data" / "test_files"
PYDICOM_DATA = SITE / "data_store" / "data"
KERMANY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "xray" / "kermany_cxr_224"
SALT = "merge-test-salt-0123456789abcdef"
FLAGS = ["--workers", "1", "--no-progress", "--shard_maxcount", "3"]


def _copy(files: dict[str, Path], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, folder / name)
    return folder


def _curate(inputs: list[Path], out: Path, *extra: str) -> dict:
    assert curate_main([*map(str, inputs), "--output", str(out), *FLAGS, *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    """Two parts with the same salt: part B repeats 693_UNCI's pixels (another file), MR_small's pixels
    (another transfer syntax) and one file path of part A (overlapping input lists)."""
    root = tmp_path_factory.mktemp("merge")
    mp = pytest.MonkeyPatch()
    mp.setenv("SCANMAE_CURATE_SALT", SALT)
    xray = sorted((KERMANY / "train" / "NORMAL").iterdir())
    a_dcm = _copy({"ct.dcm": PYDICOM_DATA / "693_UNCI.dcm", "ct_small.dcm": PYDICOM_FILES / "CT_small.dcm",
                   "mr_rle.dcm": PYDICOM_FILES / "MR_small_RLE.dcm", "rtplan.dcm": PYDICOM_FILES / "rtplan.dcm"},
                  root / "in_a" / "dicom_a")
    a_img = _copy({p.name: p for p in xray[:4]}, root / "in_a" / "xray_a")
    b_dcm = _copy({"ct_copy.dcm": PYDICOM_DATA / "693_UNCI.dcm", "emri.dcm": PYDICOM_DATA / "emri_small.dcm",
                   "mr_j2k.dcm": PYDICOM_FILES / "MR_small_jp2klossless.dcm",
                   "ecg.dcm": PYDICOM_FILES / "waveform_ecg.dcm"}, root / "in_b" / "dicom_b")
    b_img = _copy({p.name: p for p in xray[4:7]}, root / "in_b" / "xray_b")
    shared_file = a_dcm / "ct_small.dcm"
    part_a, part_b = root / "parts" / "part-0000", root / "parts" / "part-0001"
    man_a = _curate([a_dcm, a_img], part_a)
    man_b = _curate([b_dcm, b_img, shared_file], part_b)
    pristine = root / "pristine"
    shutil.copytree(root / "parts", pristine)  # merging moves shards: keep copies for the other tests
    yield {"root": root, "a": part_a, "b": part_b, "man_a": man_a, "man_b": man_b, "pristine": pristine}
    mp.undo()


def _fresh_parts(parts: dict, dest: Path) -> list[Path]:
    shutil.copytree(parts["pristine"], dest)
    return [dest / "part-0000", dest / "part-0001"]


def _read(out: Path) -> list[dict]:
    import webdataset as wds

    tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    return list(wds.WebDataset(tars, shardshuffle=False))


def _pixel_hashes(samples: list[dict]) -> list[str]:
    return [hashlib.sha256(decode_image(s).tobytes()).hexdigest() for s in samples]


def test_merge_counts_each_input_once_and_removes_duplicates_across_parts(parts, tmp_path):
    a, b = _fresh_parts(parts, tmp_path / "parts")
    out = tmp_path / "merged"
    steps = merge_mod.plan_merge([merge_mod._load_part(a), merge_mod._load_part(b)]).steps
    assert any(s.keep is not None and s.name for s in steps)  # a shard is rewritten without its duplicates
    assert any(s.keep is None for s in steps)  # and others are moved as they are
    assert curate_main(["--merge", str(a), str(b), "--output", str(out), "--no-progress"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    ma, mb = parts["man_a"], parts["man_b"]
    # every input counted once: the file given to both parts is counted from part A only
    assert m["files_seen"] == ma["files_seen"] + mb["files_seen"] - 1
    assert m["files_seen"] == m["files_used"] + m["files_rejected"] + m["files_duplicate"]
    # part B's 693 copy and its JPEG 2000 MR (same pixels as A's RLE MR) become duplicates
    assert m["files_duplicate"] == ma["files_duplicate"] + mb["files_duplicate"] + 2
    assert m["files_rejected"] == ma["files_rejected"] + mb["files_rejected"] == 2
    assert m["samples_written"] == ma["samples_written"] + mb["samples_written"] - 3  # 693, MR, CT_small
    assert m["samples_duplicate"] == ma["samples_duplicate"] + mb["samples_duplicate"] + 2
    samples = _read(out)
    assert len(samples) == m["samples_written"] == sum(s["samples"] for s in m["shards"])
    assert len({s["__key__"] for s in samples}) == len(samples)
    assert len(set(_pixel_hashes(samples))) == len(samples)  # no pixel content twice
    assert {decode_meta(s)["split"] for s in samples} <= {"train", "val", "test"}
    # shards renumbered per split from 0, sizes and hashes recorded truthfully, parts' shards moved away
    for split in ("train", "val", "test"):
        names = sorted(s["name"] for s in m["shards"] if s["split"] == split)
        assert names == [f"{split}-{i:06d}.tar" for i in range(len(names))]
    for shard in m["shards"]:
        data = (out / "shards" / shard["name"]).read_bytes()
        assert len(data) == shard["bytes"] and hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(s["name"] for s in m["shards"])
    assert not list((a / "shards").glob("*.tar")) and not list((b / "shards").glob("*.tar"))
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(Path(r["path"]).name for r in rejects) == ["ecg.dcm", "rtplan.dcm"]
    assert m["merged_from"]["parts"] == [a.name, b.name] and m["salt_id"] == ma["salt_id"]  # no paths
    assert SALT.encode() not in (out / "manifest.json").read_bytes()

    # re-running is a no-op: same manifest bytes, same shard files
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    manifest_bytes = (out / "manifest.json").read_bytes()
    assert curate_main(["--merge", str(a), str(b), "--output", str(out), "--no-progress"]) == 0
    assert (out / "manifest.json").read_bytes() == manifest_bytes
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before

    # the merged folder is an ordinary curate output: extending it writes only the new file
    extra = _copy({"ct2.dcm": PYDICOM_FILES / "CT_small.dcm", "mr.dcm": PYDICOM_FILES / "MR_small.dcm"},
                  tmp_path / "more")
    m2 = _curate([extra], out)
    assert m2["files_seen"] == m["files_seen"] + 2 and m2["files_duplicate"] == m["files_duplicate"] + 2
    assert m2["samples_written"] == m["samples_written"]  # both are pixel copies of merged samples


def test_merge_resumes_after_a_crash(parts, tmp_path, monkeypatch):
    a, b = _fresh_parts(parts, tmp_path / "parts")
    ref_a, ref_b = _fresh_parts(parts, tmp_path / "ref_parts")
    ref = merge([str(ref_a), str(ref_b)], str(tmp_path / "ref"), show_progress=False)
    real = merge_mod._execute
    calls = {"n": 0}

    def crash_after_two(step, shard_dir):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(step, shard_dir)

    out = tmp_path / "merged"
    monkeypatch.setattr(merge_mod, "_execute", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        merge([str(a), str(b)], str(out), show_progress=False)
    assert (out / merge_mod.MARKER).is_file() and not (out / "manifest.json").exists()
    monkeypatch.setattr(merge_mod, "_execute", real)
    got = merge([str(a), str(b)], str(out), show_progress=False)
    for key in ("files_seen", "files_used", "files_rejected", "files_duplicate", "samples_written",
                "samples_duplicate", "samples_per_split"):
        assert got[key] == ref[key], key
    assert [(s["name"], s["sha256"]) for s in got["shards"]] == [(s["name"], s["sha256"]) for s in ref["shards"]]
    assert not (out / merge_mod.MARKER).exists()
    assert len(_read(out)) == got["samples_written"]


def test_merge_refuses_parts_that_do_not_match(parts, tmp_path, monkeypatch):
    a, b = _fresh_parts(parts, tmp_path / "parts")
    monkeypatch.setenv("SCANMAE_CURATE_SALT", SALT)
    one = _copy({"ct.dcm": PYDICOM_FILES / "CT_small.dcm"}, tmp_path / "in_c")
    other_window = tmp_path / "part-window"
    _curate([one], other_window, "--ct_windows", "brain")
    with pytest.raises(MergeError, match=r"part-window was curated with other settings.*ct_windows"):
        merge([str(a), str(other_window)], str(tmp_path / "o1"), show_progress=False)
    monkeypatch.setenv("SCANMAE_CURATE_SALT", "another-salt-0123456789abcdef")
    other_salt = tmp_path / "part-salt"
    _curate([one], other_salt)
    with pytest.raises(MergeError, match=r"part-salt was made with a different salt"):
        merge([str(a), str(other_salt)], str(tmp_path / "o2"), show_progress=False)
    unfinished = tmp_path / "part-unfinished"
    shutil.copytree(b, unfinished)
    (unfinished / "manifest.json").unlink()
    with pytest.raises(MergeError, match=r"part-unfinished: no manifest.json"):
        merge([str(a), str(unfinished)], str(tmp_path / "o3"), show_progress=False)
    # a ledger that grew after the manifest (a later run into the part stopped early)
    grown = tmp_path / "part-grown"
    shutil.copytree(b, grown)
    with open(grown / ".curate_state.jsonl", "a") as fh:
        fh.write(json.dumps({"t": "item", "id": "x/y.dcm", "path": "/x/y.dcm", "source": "x", "status": "used",
                             "reason": None, "modality": "CT", "samples": 1, "dup_samples": 0, "skipped": 0}) + "\n")
    with pytest.raises(MergeError, match=r"part-grown: 1 inputs are not completely written"):
        merge([str(a), str(grown)], str(tmp_path / "o4"), show_progress=False)
    # an output that already holds another dataset is never mixed with the merge
    with pytest.raises(MergeError, match="already holds another curated dataset"):
        merge([str(a), str(b)], str(other_window), show_progress=False)
    assert len(list((a / "shards").glob("*.tar"))) == len(parts["man_a"]["shards"])  # nothing was moved
    assert curate_main(["--merge", str(a), "--output", str(tmp_path / "o5"), str(one)]) == 2  # inputs + merge
