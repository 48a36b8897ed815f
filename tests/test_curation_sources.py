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
