"""Shared helpers for the linprobe / finetune tests: a tiny exported encoder and small real datasets."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared" / "data").resolve()
BREAST_NPZ = SHARED / "medmnist" / "breastmnist.npz"
PNEUMONIA_NPZ = SHARED / "medmnist" / "pneumoniamnist.npz"
KERMANY = SHARED / "xray" / "kermany_cxr_224"


def npz_head(src: Path, out: Path, counts: dict[str, int]) -> Path:
    """The first ``counts[split]`` images and labels of each split of the MedMNIST-style ``src``, saved as ``out``
    (a quick CPU probe on real images)."""
    import numpy as np

    arrays = {}
    with np.load(src) as z:
        for split, n in counts.items():
            arrays[f"{split}_images"] = z[f"{split}_images"][:n]
            arrays[f"{split}_labels"] = z[f"{split}_labels"][:n]
    np.savez(out, **arrays)
    return out


def export_tiny_encoder(out: Path, seed: int = 0, in_chans: int = 1) -> Path:
    """A randomly initialised ``test_vit`` (32 px, patch 8) exported as encoder.safetensors + encoder.json."""
    import models
    from models.checkpoint import export_encoder

    torch.manual_seed(seed)
    encoder = models.create_model("test_vit", in_chans=in_chans)
    weights, _ = export_encoder(encoder, out, normalization={"mean": [0.5] * in_chans, "std": [0.25] * in_chans})
    return weights


def finetune_fast_args(n_bootstrap: int) -> list[str]:
    """finetune flags for a short CPU run of ``test_vit``: in-process loading, 32 px, no RandAugment / random
    erasing / drop path, one warmup epoch."""
    return ["--num_workers", "0", "--n_bootstrap", str(n_bootstrap), "--input_size", "32", "--aa", "none",
            "--reprob", "0", "--drop_path", "0", "--warmup_epochs", "1"]


def kermany_rows() -> list[dict[str, str]]:
    with open(KERMANY / "labels.csv") as fh:
        return list(csv.DictReader(fh))


def kermany_image_folder(root: Path, per_class: dict[str, int]) -> Path:
    """An ImageFolder ``root/{split}/{NORMAL,PNEUMONIA}`` of real Kermany X-rays.

    Every split is cut from Kermany's train folder (disjoint slices): its official test folder differs in
    acquisition enough that a randomly initialised tiny encoder's features flip sign between the two.
    """
    rows = kermany_rows()
    offset = 0
    for split, n in per_class.items():
        for label in ("NORMAL", "PNEUMONIA"):
            chosen = [r for r in rows if r["split"] == "train" and r["label"] == label][offset:offset + n]
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for r in chosen:
                shutil.copy(KERMANY / r["path"], root / split / label / Path(r["path"]).name)
        offset += n
    return root


def kermany_multilabel_csv(path: Path, per_class: dict[str, int]) -> Path:
    """CSV ``path,label,split`` with findings pneumonia / bacterial / viral (``;``-joined, empty = normal),
    every split cut from Kermany's train folder (see :func:`kermany_image_folder`)."""
    rows = kermany_rows()
    findings = {"": "", "bacteria": "pneumonia;bacterial", "virus": "pneumonia;viral"}
    out = []
    offset = 0
    for split, n in per_class.items():
        for sub in ("", "bacteria", "virus"):
            chosen = [r for r in rows if r["split"] == "train" and r["pneumonia_subtype"] == sub][offset:offset + n]
            out += [{"path": str(KERMANY / r["path"]), "label": findings[sub], "split": split} for r in chosen]
        offset += n
    return write_split_csv(path, out)


def write_split_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    """A labeled CSV as common.data reads it: columns path, label, split."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_results(out_dir: Path) -> dict:
    return json.loads((out_dir / "results.json").read_text())


def cli_fails(capsys: Any, main_fn: Any, argv: list[str], pattern: str) -> str:
    """Run a CLI ``main`` that must reject its input: exit status 2 and ``pattern`` in the one-line error."""
    capsys.readouterr()
    assert main_fn(argv) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err, re.S), err
    assert "Traceback" not in err
    return err


def fails_with(main_fn: Callable[[list[str]], int], argv: list[str], pattern: str) -> str:
    """Run a CLI ``main`` that must reject its input: exit status 2 and ``pattern`` in the one-line error.

    Only stderr is redirected (not pytest's capsys): ``get_logger`` binds the sys.stdout current when a
    logger is first made, and a capsys stream is closed after its test, breaking later tests' logging.
    """
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main_fn(argv) == 2
    text = err.getvalue()
    assert re.search(pattern, text, re.S), text
    assert "Traceback" not in text
    return text
