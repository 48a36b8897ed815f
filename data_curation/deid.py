"""De-identification: the secret salt, salted identity hashes and the metadata allowlist.

Identity values (patient id, study / series / instance UIDs, file paths) only ever leave this module as
keyed BLAKE2b digests. The salt is read from a key file or the environment and is never written to OUT.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Any

from data_curation.format import KEY_CHANNELS, KEY_LABEL, KEY_MODALITY, KEY_SPLIT, OPTIONAL_KEYS

SALT_ENV = "SCANMAE_CURATE_SALT"
DEFAULT_SALT_FILE = Path("~/.config/scanmae/curate_salt")
ALLOWED_META_KEYS: frozenset[str] = frozenset(
    (KEY_MODALITY, KEY_SPLIT, KEY_LABEL, KEY_CHANNELS, *OPTIONAL_KEYS, "nonfinite_voxels"))


class SaltError(RuntimeError):
    """The salt cannot be loaded or would be stored inside the output."""


def load_salt(salt_file: str, output_dir: str | Path) -> tuple[bytes, str]:
    """Return ``(salt, where)``: from ``salt_file``, else $SCANMAE_CURATE_SALT, else the default key file
    (created with 32 random bytes, mode 0600, on first use). A key file inside OUT is refused."""
    if not salt_file and os.environ.get(SALT_ENV):
        return os.environ[SALT_ENV].encode("utf-8"), f"${SALT_ENV}"
    path = Path(salt_file).expanduser() if salt_file else DEFAULT_SALT_FILE.expanduser()
    out = Path(output_dir).expanduser().resolve()
    resolved = path.resolve()
    if resolved == out or out in resolved.parents:
        raise SaltError(f"salt file {path} lies inside the output folder {out}; keep it outside OUT")
    if not path.exists():
        if salt_file:
            raise SaltError(f"salt file {path} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    salt = path.read_bytes().strip()
    if len(salt) < 16:
        raise SaltError(f"salt file {path} holds fewer than 16 bytes")
    return salt, str(path)


def salted_hash(salt: bytes, *parts: object, digest_size: int = 12) -> str:
    """Hex digest of ``parts`` keyed with ``salt`` (no dots, safe as a WebDataset key)."""
    h = hashlib.blake2b(key=salt[:64], digest_size=digest_size)
    for part in parts:
        h.update(str(part).encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def source_label(salt: bytes, name: str, public: bool = False) -> str:
    """What shards and the manifest call an input root: a keyed digest of its name (``src-`` + 12 hex digits),
    or, with ``public``, the name itself. Input folders are often named after patients (PACS exports, one
    folder per subject), and their names would otherwise reach every sample; the operator's files (ledger,
    rejects.jsonl) and the console summary keep the readable name."""
    return name if public else "src-" + salted_hash(salt, "source", name, digest_size=6)


def salt_fingerprint(salt: bytes) -> str:
    """A short keyed digest that tells whether two outputs used the same salt without revealing it."""
    return salted_hash(salt, "salt-fingerprint", digest_size=8)


def split_for_subject(salt: bytes, subject_hash: str, fractions: list[float]) -> str:
    """Deterministic train/val/test assignment from a subject hash (all of a subject's data share it)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split_fractions must be three non-negative numbers, got {fractions}")
    u = int(salted_hash(salt, "split", subject_hash, digest_size=8), 16) / 2**64
    total = sum(fractions)
    if u < fractions[0] / total:
        return "train"
    if u < (fractions[0] + fractions[1]) / total:
        return "val"
    return "test"


def allowlisted(meta: dict[str, Any]) -> dict[str, Any]:
    """Keep only allowlisted keys; an unknown key is a programming error, not silently dropped PHI."""
    extra = set(meta) - ALLOWED_META_KEYS
    if extra:
        raise KeyError(f"metadata keys outside the de-identification allowlist: {sorted(extra)}")
    return dict(meta)
