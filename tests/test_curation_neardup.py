"""Near-duplicate detection (``--near_duplicates``): the perceptual hash on real X-rays (re-encoded copies
close, distinct images far), the banded index against brute force, and curate / resume / merge counting
near duplicates separately while volumes of one subject keep all their slices."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_curation.cli import main as curate_main
from data_curation.merge import merge
from data_curation.phash import NearDuplicateIndex, hamming, perceptual_hash

KERMANY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "xray" / "kermany_cxr_224"
NIBABEL_DATA = Path(__import__("nibabel").__file__).parent / "tests" / "data"
SALT = "neardup-test-salt-0123456789abcdef"


def _xrays(n: int) -> list[Path]:
    return sorted((KERMANY / "train" / "NORMAL").iterdir())[:n]


def _gray(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def _reencoded(src: Path, dst: Path) -> None:
    """A resized, JPEG-recompressed copy (what dataset scrapes are full of)."""
    Image.open(src).convert("L").resize((180, 180), Image.Resampling.BICUBIC).save(dst, quality=60)


def _brighter(src: Path, dst: Path) -> None:
    arr = _gray(src).astype(np.float32) * 1.1 + 6
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(dst)


def test_hash_is_stable_under_reencoding_and_separates_distinct_xrays(tmp_path):
    paths = _xrays(150)
    imgs = [_gray(p) for p in paths]
    hashes = [perceptual_hash(i) for i in imgs]
    for p, h in zip(paths[:20], hashes):
        _reencoded(p, tmp_path / "a.jpeg")
        _brighter(p, tmp_path / "b.png")
        assert hamming(h, perceptual_hash(_gray(tmp_path / "a.jpeg"))) <= 12
        assert hamming(h, perceptual_hash(_gray(tmp_path / "b.png"))) <= 12
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            if not np.array_equal(imgs[i], imgs[j]):  # the Kermany set holds a few exact pixel copies
                assert hamming(hashes[i], hashes[j]) > 24, (paths[i].name, paths[j].name)
    rgb = np.asarray(Image.open(paths[0]).convert("RGB"))
    assert perceptual_hash(rgb) == hashes[0]  # gray content stored as RGB: the same hash


@pytest.mark.parametrize("bits", [0, 16, 60])
def test_banded_index_finds_exactly_what_brute_force_finds(bits: int) -> None:
    hashes = [perceptual_hash(_gray(p)) for p in _xrays(120)]
    index = NearDuplicateIndex(bits)
    for k, h in enumerate(hashes):
        group = f"subject{k % 7}"
        expected = any(hamming(h, o) <= bits and f"subject{m % 7}" != group for m, o in enumerate(hashes[:k]))
        assert index.find(h, group) == expected
        index.add(h, group)
    with pytest.raises(ValueError, match="0..63"):
        NearDuplicateIndex(64)


def _curate(inputs: list[Path], out: Path, *flags: str) -> dict:
    assert curate_main([*map(str, inputs), "--output", str(out), "--workers", "1", "--no-progress", *flags]) == 0
    return json.loads((out / "manifest.json").read_text())


def test_curate_drops_near_duplicates_and_counts_them_separately(tmp_path, monkeypatch):
    monkeypatch.setenv("SCANMAE_CURATE_SALT", SALT)
    originals = tmp_path / "xray"
    originals.mkdir()
    for p in _xrays(6):
        shutil.copy(p, originals / p.name)
    copies = tmp_path / "copies"
    copies.mkdir()
    _reencoded(_xrays(6)[1], copies / "reencoded.jpeg")
    _brighter(_xrays(6)[4], copies / "brighter.png")
    volume = tmp_path / "mri"
    volume.mkdir()
    shutil.copy(NIBABEL_DATA / "anatomical.nii", volume / "anatomical.nii")  # adjacent slices look alike

    # Readable source names in the manifest, to look up the volume's folder below.
    plain = _curate([originals, copies, volume], tmp_path / "plain", "--public_source_names")
    m = _curate([originals, copies, volume], tmp_path / "near", "--near_duplicates", "--public_source_names")
    assert plain["samples_near_duplicate"] == 0 and plain["samples_written"] == m["samples_written"] + 2
    assert m["samples_near_duplicate"] == 2 and m["files_near_duplicate"] == 2
    assert m["files_duplicate"] == plain["files_duplicate"] + 2 and m["samples_duplicate"] == plain["samples_duplicate"]
    assert m["files_seen"] == m["files_used"] + m["files_rejected"] + m["files_duplicate"]
    nifti = [v for k, v in m["per_source"].items() if k == "mri"][0]
    assert nifti["samples_written"] == plain["per_source"]["mri"]["samples_written"]  # one subject: all kept
    items = [json.loads(line) for line in (tmp_path / "near" / ".curate_state.jsonl").read_text().splitlines()]
    near_items = {Path(r["path"]).name for r in items if r["t"] == "item" and r.get("near_dup_samples")}
    assert near_items == {"reencoded.jpeg", "brighter.png"}

    # resume / extend: the hashes of written samples come back from the ledger
    out = tmp_path / "extend"
    _curate([originals], out, "--near_duplicates")
    m2 = _curate([originals, copies], out, "--near_duplicates")
    assert m2["samples_near_duplicate"] == 2 and m2["samples_written"] == 6

    # merge: a near duplicate in a later part is removed too
    part_a, part_b = tmp_path / "part-a", tmp_path / "part-b"
    _curate([originals], part_a, "--near_duplicates")
    _curate([copies], part_b, "--near_duplicates")
    merged = merge([str(part_a), str(part_b)], str(tmp_path / "merged"), show_progress=False)
    assert merged["samples_near_duplicate"] == 2 and merged["samples_written"] == 6
    assert merged["files_duplicate"] == 2 and merged["files_seen"] == 8
