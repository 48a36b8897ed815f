"""Builds small WebDataset shard directories from real MedMNIST images in the curated format.

Used while the ``curate`` CLI is not the subject of the test: samples are encoded with
``data_curation.format`` exactly as ``curate`` writes them, and a manifest lists shards and counts.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np

from data_curation.format import encode_image, encode_meta

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared" / "data").resolve()
BREAST_NPZ = SHARED / "medmnist" / "breastmnist.npz"
BREAST_64_NPZ = SHARED / "medmnist" / "breastmnist_64.npz"


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shards(out: Path, images: np.ndarray, labels: np.ndarray | None, split: str = "train",
                 per_shard: int = 10, prefix: str = "img") -> dict:
    """Write ``out/shards/{split}-NNNNNN.tar`` and ``out/manifest.json``; returns the manifest."""
    (out / "shards").mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"shards": []}
    for s, start in enumerate(range(0, len(images), per_shard)):
        name = f"{split}-{s:06d}.tar"
        path = out / "shards" / name
        count = 0
        with tarfile.open(path, "w") as tf:
            for i in range(start, min(start + per_shard, len(images))):
                ext, data = encode_image(images[i])
                label = None if labels is None else int(labels[i])
                channels = ["gray"] if images[i].ndim == 2 or images[i].shape[-1] == 1 else ["R", "G", "B"]
                meta = {"modality": "US", "split": split, "label": label, "channels": channels}
                key = f"{prefix}{i:05d}"
                _add(tf, f"{key}.{ext}", data)
                _add(tf, f"{key}.json", encode_meta(meta))
                count += 1
        manifest["shards"].append({"name": name, "split": split, "samples": count, "bytes": path.stat().st_size,
                                   "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    manifest["samples_written"] = sum(s["samples"] for s in manifest["shards"])
    manifest_path.write_text(json.dumps(manifest))
    return manifest


def breast_shards(out: Path, n: int = 80, per_shard: int = 10, big: bool = False) -> Path:
    """``n`` real BreastMNIST train images (28 px, or 64 px with ``big``) as labeled train shards."""
    with np.load(BREAST_64_NPZ if big else BREAST_NPZ) as d:
        images, labels = d["train_images"][:n], d["train_labels"][:n, 0]
    write_shards(out, images, labels, "train", per_shard)
    return out
