"""Val/test labels that no train sample carries stop linprobe/finetune with one line, when the data defines its classes.

CSV label names, class folders and integer labels (without --nb_classes) gather the class list over every split,
so a typo in val ("pnemonia") used to become a class of its own that the head never saw in training. Real
Kermany chest X-rays and BreastMNIST images throughout.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_linprobe_fixtures import (
    BREAST_NPZ,
    KERMANY,
    export_tiny_encoder,
    fails_with,
    kermany_image_folder,
    kermany_multilabel_csv,
    kermany_rows,
    write_split_csv,
)

from common.transfer.data import open_splits
from common.transfer.errors import TransferDataError
from finetune.main import main as finetune_main
from linprobe.main import main as linprobe_main

FAST = ["--num_workers", "0", "--n_bootstrap", "10", "--batch_size", "4", "--warmup_epochs", "0", "--epochs", "1"]


def kermany_csv(path: Path, labels: dict[int, str] | None = None, ids: bool = False) -> Path:
    """12 Kermany train X-rays, 6 per class, split train/train/val/test in turn (every class in every split);
    ``labels`` replaces the label of some rows, ``ids`` writes 0/1 instead of the class names."""
    rows = [r for r in kermany_rows() if r["split"] == "train"]
    chosen = [r for r in rows if r["label"] == "NORMAL"][:6] + [r for r in rows if r["label"] == "PNEUMONIA"][:6]
    out = [{"path": str(KERMANY / r["path"]), "split": ("train", "train", "val", "test")[i % 4],
            "label": str(int(r["label"] == "PNEUMONIA")) if ids else r["label"]} for i, r in enumerate(chosen)]
    for i, label in (labels or {}).items():
        out[i]["label"] = label
    return write_split_csv(path, out)


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_encoder(tmp_path_factory.mktemp("enc"))


def test_a_misspelt_csv_class_in_val_or_test_is_named_with_the_closest_train_class(tmp_path: Path,
                                                                                   encoder_ckpt: Path) -> None:
    # rows 6 and 10 are PNEUMONIA val rows, row 3 a NORMAL test row; the trailing space of a cell is stripped
    path = kermany_csv(tmp_path / "typo.csv", {6: "pnemonia", 10: "pnemonia", 3: "Normal "})
    expected = (rf"{path}: the val split has label 'pnemonia' \(2 samples, closest train class 'PNEUMONIA'\); "
                r"the test split has label 'Normal' \(1 sample, closest train class 'NORMAL'\) that no train sample "
                r"has \(train classes: 'NORMAL', 'PNEUMONIA'\); a class without training samples cannot be learned")
    with pytest.raises(TransferDataError, match=expected):
        open_splits(str(path), 1, None, False)
    with pytest.raises(TransferDataError, match=expected):  # the typo, not "--nb_classes 2 but the data has 4"
        open_splits(str(path), 1, 2, False)
    for main in (linprobe_main, finetune_main):
        fails_with(main, ["--data_path", str(path), "--finetune", str(encoder_ckpt), "--output_dir",
                          str(tmp_path / main.__module__), *FAST], expected)


def test_a_class_folder_only_under_val_is_named_with_its_spaces(tmp_path: Path) -> None:
    root = kermany_image_folder(tmp_path / "cxr", {"train": 3, "val": 2})
    stray = root / "val" / "PNEUMONIA "
    stray.mkdir()
    moved = sorted((root / "val" / "PNEUMONIA").iterdir())[0]
    shutil.move(moved, stray / moved.name)
    expected = (rf"{root}: the val split has label 'PNEUMONIA ' \(1 sample, closest train class 'PNEUMONIA'\) that "
                r"no train sample has \(train classes: 'NORMAL', 'PNEUMONIA'\)")
    for nb_classes in (None, 3):  # --nb_classes counts the folders; it names no class
        with pytest.raises(TransferDataError, match=expected):
            open_splits(str(root), 1, nb_classes, False)


def test_a_multilabel_finding_only_in_val_is_named(tmp_path: Path) -> None:
    path = kermany_multilabel_csv(tmp_path / "ml.csv", {"train": 2, "val": 2})
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    first_viral_val = next(i for i, r in enumerate(rows) if r["split"] == "val" and "viral" in r["label"])
    rows[first_viral_val]["label"] = "pneumonia;virl"
    write_split_csv(path, rows)
    with pytest.raises(TransferDataError, match=r"val split has label 'virl' \(1 sample, closest train class "
                                                r"'viral'\).*train classes: 'bacterial', 'pneumonia', 'viral'"):
        open_splits(str(path), 1, None, True)


def test_integer_labels_only_in_val_need_nb_classes(tmp_path: Path) -> None:
    path = kermany_csv(tmp_path / "ids.csv", {6: "2"}, ids=True)
    with pytest.raises(TransferDataError, match=r"val split has label 2 \(1 sample\) that no train sample has "
                                                r"\(train classes: 0, 1\).*or pass --nb_classes 3 if every index"):
        open_splits(str(path), 1, None, False)
    _, labels = open_splits(str(path), 1, 3, False)  # declared: class 2 is meant to exist
    assert labels.num_classes == 3
    with np.load(BREAST_NPZ) as d:
        arrays = {k: d[k][:24] for k in d.files}
    arrays["test_labels"] = arrays["test_labels"].copy()
    arrays["test_labels"][[0, 5]] = 4
    npz = tmp_path / "breast.npz"
    np.savez(npz, **arrays)
    with pytest.raises(TransferDataError, match=rf"{npz}: the test split has label 4 \(2 samples\)"):
        open_splits(str(npz), 1, None, False)


def test_classes_missing_from_val_or_declared_by_columns_are_fine(tmp_path: Path) -> None:
    path = kermany_csv(tmp_path / "no_pneumonia_in_val.csv", {6: "NORMAL", 10: "NORMAL"})
    _, labels = open_splits(str(path), 1, None, False)
    assert labels.class_names == ["NORMAL", "PNEUMONIA"]
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = tmp_path / "columns.csv"  # the header declares the labels: 'mass' only in val is the user's choice
    with open(columns, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "split", "effusion", "mass"])
        writer.writeheader()
        writer.writerows({"path": r["path"], "split": r["split"], "effusion": int(r["label"] == "PNEUMONIA"),
                          "mass": int(i == 2)} for i, r in enumerate(rows))
    _, labels = open_splits(str(columns), 1, None, True)
    assert labels.class_names == ["effusion", "mass"]


def test_the_pretraining_knn_monitor_refuses_a_val_only_class(tmp_path: Path) -> None:
    """The kNN monitor reads labeled train / val itself (not through open_splits): the same rule holds there."""
    from common.config import ConfigError
    from pretrain.monitor import KnnMonitor

    path = kermany_csv(tmp_path / "typo.csv", {6: "pnemonia"})
    monitor = KnnMonitor(data_path=str(path), every=1, k=3, max_samples=8, input_size=32, in_chans=1, mean=[0.5],
                         std=[0.25])
    with pytest.raises(ConfigError, match=r"kNN monitor: .*the val split has label 'pnemonia' \(1 sample, closest "
                                          r"train class 'PNEUMONIA'\)"):
        monitor.open()
    assert KnnMonitor(data_path=str(kermany_csv(tmp_path / "ok.csv")), every=1, k=3, max_samples=8, input_size=32,
                      in_chans=1, mean=[0.5], std=[0.25]).open().splits["val"].num_classes == 2
