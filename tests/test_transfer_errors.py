"""Bad input to the labeled-data readers and the transfer CLIs: one line naming the file and the reason.

Each case breaks real data (BreastMNIST, Kermany chest X-rays) the way a user would, and checks what the user
sees: a ``DataSourceError`` / ``CheckpointError`` / ``TransferDataError`` message or, for the CLIs, exit status 2
with a one-line error and no traceback.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from test_linprobe_fixtures import BREAST_NPZ, KERMANY, export_tiny_encoder, fails_with, write_split_csv

from common.data import DataSourceError, ImageDecodeError, build_dataset
from common.transfer.data import open_splits
from common.transfer.errors import TransferDataError
from finetune.main import main as finetune_main
from linprobe.main import main as linprobe_main


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_encoder(tmp_path_factory.mktemp("enc"))


def breast_subset(path: Path, n: int = 24, **changes: np.ndarray | None) -> Path:
    """The first ``n`` samples of every BreastMNIST array, with ``changes`` (None drops an array)."""
    with np.load(BREAST_NPZ) as d:
        arrays = {k: d[k][:n] for k in d.files}
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    np.savez(path, **arrays)
    return path


# --- .npz ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage, pattern", [
    ("truncated", r"not a \.npz archive.*truncated"),
    ("empty", r"empty file \(0 bytes\)"),
    ("text", r"not a \.npz archive"),
])
def test_an_npz_that_is_not_an_archive_is_named(tmp_path: Path, damage: str, pattern: str) -> None:
    path = tmp_path / "data.npz"
    good = breast_subset(tmp_path / "good.npz").read_bytes()
    path.write_bytes({"truncated": good[:4000], "empty": b"", "text": b"train_images,train_labels\n"}[damage])
    with pytest.raises(DataSourceError, match=f"{path}: {pattern}"):
        build_dataset(path, split="train", labeled=True, in_chans=1)
    with pytest.raises(DataSourceError, match=f"{path}: {pattern}"):  # the transfer split check too
        open_splits(str(path), 1, None, False)


def test_an_object_array_in_an_npz_is_named(tmp_path: Path) -> None:
    path = breast_subset(tmp_path / "obj.npz", train_images=np.empty(24, dtype=object))
    with pytest.raises(DataSourceError, match="array 'train_images' holds Python objects"):
        build_dataset(path, split="train", labeled=True, in_chans=1)


def test_an_empty_npz_split_is_named(tmp_path: Path) -> None:
    path = breast_subset(tmp_path / "e.npz", train_images=np.zeros((0, 28, 28), np.uint8),
                         train_labels=np.zeros((0, 1), np.uint8))
    with pytest.raises(DataSourceError, match="split 'train' has no samples"):
        build_dataset(path, split="train", labeled=True, in_chans=1)


def test_missing_npz_labels_are_reported_when_the_split_is_opened(tmp_path: Path) -> None:
    path = breast_subset(tmp_path / "nolabels.npz", val_labels=None)
    with pytest.raises(DataSourceError, match="no 'val_labels' array"):
        open_splits(str(path), 1, None, False)
    assert len(build_dataset(path, split="val", labeled=False, in_chans=1)) == 24  # unlabeled use still works


def test_fractional_npz_labels_are_refused(tmp_path: Path) -> None:
    with np.load(BREAST_NPZ) as d:
        labels = d["val_labels"][:24].astype(np.float32) + 0.5
    path = breast_subset(tmp_path / "float.npz", val_labels=labels)
    with pytest.raises(DataSourceError, match=r"val_labels: labels must be whole numbers.*sample 0 has \[0?\.?\d"):
        build_dataset(path, split="val", labeled=True, in_chans=1)
    whole = breast_subset(tmp_path / "whole.npz", val_labels=labels - 0.5)  # float dtype, whole values: fine
    assert build_dataset(whole, split="val", labeled=True, in_chans=1).num_classes == 2


# --- the CLIs: output folder, --finetune, --resume, batch size ---------------------------------------------------

FAST = ["--num_workers", "0", "--n_bootstrap", "10", "--batch_size", "8", "--warmup_epochs", "0"]


def probe_args(data: Path, encoder: Path, out: Path) -> list[str]:
    return ["--data_path", str(data), "--finetune", str(encoder), "--output_dir", str(out), *FAST]


def test_an_output_dir_that_is_a_file_is_a_one_line_error(encoder_ckpt: Path, tmp_path: Path) -> None:
    data = breast_subset(tmp_path / "b.npz")
    taken = tmp_path / "results.txt"
    taken.write_text("an earlier run's notes\n")
    fails_with(linprobe_main, probe_args(data, encoder_ckpt, taken), rf"--output_dir {taken}: is a file")
    fails_with(finetune_main, probe_args(data, encoder_ckpt, taken / "run"),
               rf"--output_dir {taken}/run: cannot create the folder \({taken} is a file\)")
    assert taken.read_text() == "an earlier run's notes\n"


def test_finetune_folders_without_a_checkpoint_say_what_to_pass(encoder_ckpt: Path, tmp_path: Path) -> None:
    data = breast_subset(tmp_path / "b.npz")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails_with(linprobe_main, probe_args(data, empty, tmp_path / "o1"),
               rf"--finetune {empty}: this folder has no encoder.safetensors and no train_state.json")
    steps = tmp_path / "pretrain" / "checkpoints"
    for n in (3, 5):
        (steps / f"step_{n:08d}").mkdir(parents=True)
        (steps / f"step_{n:08d}" / "train_state.json").write_text("{}")
    fails_with(linprobe_main, probe_args(data, steps, tmp_path / "o2"),
               rf"pretraining checkpoints: pass one of them, e.g. {steps}/step_00000005 \(the latest\)")


@pytest.mark.parametrize("content", [b"", b"weights are on the shared drive\n"])
def test_a_finetune_file_that_is_no_checkpoint_is_named(encoder_ckpt: Path, tmp_path: Path, content: bytes) -> None:
    data = breast_subset(tmp_path / "b.npz")
    bogus = tmp_path / "encoder.pth"
    bogus.write_bytes(content)
    fails_with(linprobe_main, [*probe_args(data, bogus, tmp_path / "o"), "--model", "test_vit"],
               rf"--finetune {bogus}: (empty file|not a checkpoint)")


def test_resume_problems_are_found_before_the_data_is_read(encoder_ckpt: Path, tmp_path: Path) -> None:
    data = tmp_path / "not_there.npz"  # the --resume check comes first: no data error, no decoding
    base = probe_args(data, encoder_ckpt, tmp_path / "o")
    fails_with(linprobe_main, [*base, "--resume", str(tmp_path / "checkpoint-last.pt")],
               rf"--resume {tmp_path}/checkpoint-last.pt: file not found")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-last.pt").write_bytes(b"PK\x03\x04")
    fails_with(finetune_main, [*base, "--resume", str(run)],
               rf"--resume {run}: is a folder, not a checkpoint file; pass {run}/checkpoint-last.pt")
    text = tmp_path / "notes.txt"
    text.write_text("resume from epoch 3\n")
    fails_with(finetune_main, [*base, "--resume", str(text)], rf"--resume {text}: not a checkpoint")
    fails_with(linprobe_main, [*base, "--resume", str(encoder_ckpt)],
               r"a \.safetensors file holds weights only.*add --eval")


def test_a_batch_larger_than_the_training_split_is_refused_before_decoding(encoder_ckpt: Path,
                                                                           tmp_path: Path) -> None:
    data = breast_subset(tmp_path / "b.npz", n=24)
    with np.load(data) as d:  # a corrupt image would only be found by decoding: the batch check comes first
        arrays = dict(d)
    arrays["train_images"] = arrays["train_images"].astype(np.float32)
    arrays["train_images"][0, 0, 0] = np.nan
    np.savez(data, **arrays)
    fails_with(linprobe_main, [*probe_args(data, encoder_ckpt, tmp_path / "o"), "--batch_size", "64"],
               r"24 training samples per process are fewer than one batch of 64.*lower --batch_size")


def test_resuming_into_another_output_dir_keeps_the_best_checkpoint(encoder_ckpt: Path, tmp_path: Path) -> None:
    data = breast_subset(tmp_path / "b.npz", n=24)
    first = tmp_path / "first"
    assert linprobe_main([*probe_args(data, encoder_ckpt, first), "--epochs", "1"]) == 0
    second = tmp_path / "second"  # epoch 0's head stays the best unless epoch 1 beats it: scoring needs it
    assert linprobe_main([*probe_args(data, encoder_ckpt, second), "--epochs", "2", "--blr", "0",
                          "--resume", str(first / "checkpoint-last.pt")]) == 0
    assert (second / "checkpoint-best.safetensors").is_file() and (second / "results.json").is_file()
    (first / "checkpoint-best.safetensors").unlink()
    fails_with(linprobe_main, [*probe_args(data, encoder_ckpt, tmp_path / "third"), "--epochs", "3",
                               "--resume", str(first / "checkpoint-last.pt")],
               r"its run's best epoch \(0\) was saved as .*checkpoint-best.safetensors, which is missing")


# --- CSV ---------------------------------------------------------------------------------------------------------


def kermany_csv(path: Path, rows: list[dict[str, str]] | None = None, **override: dict[int, str]) -> Path:
    """A labeled CSV (path,label,split) of 12 real Kermany X-rays (absolute paths), with per-row overrides
    ``column={row: value}``."""
    if rows is None:
        rows = read_rows()
    out = [dict(r) for r in rows]
    for column, changes in override.items():
        for i, value in changes.items():
            out[i][column] = value
    return write_split_csv(path, out)


def read_rows() -> list[dict[str, str]]:
    with open(KERMANY / "labels.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "train"]
    chosen = [r for r in rows if r["label"] == "NORMAL"][:6] + [r for r in rows if r["label"] == "PNEUMONIA"][:6]
    return [{"path": str(KERMANY / r["path"]), "label": r["label"], "split": ("train", "train", "val")[i % 3]}
            for i, r in enumerate(chosen)]


def test_an_empty_label_in_single_label_csv_is_named_not_taken_for_multilabel(tmp_path: Path) -> None:
    path = kermany_csv(tmp_path / "l.csv", label={4: ""})
    with pytest.raises(DataSourceError, match=r"line 6 \(.*IM-\d+-0001.jpeg\) has an empty label"):
        open_splits(str(path), 1, None, False)
    splits, labels = open_splits(str(path), 1, None, True)  # --multilabel: empty = no positive label
    assert labels.multilabel and labels.num_classes == 2


def test_a_csv_without_label_column_names_the_column_read_as_classes(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    rows = read_rows()
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "diagnosis", "split"])
        writer.writeheader()
        writer.writerows({"path": r["path"], "diagnosis": r["label"], "split": r["split"]} for r in rows)
    with pytest.raises(DataSourceError, match=r"no 'label' column, so \['diagnosis'\] are read as one 0/1 column "
                                              r"per class.*diagnosis='NORMAL'; name the column"):
        build_dataset(path, split="train", labeled=True, in_chans=1)


def test_a_missing_csv_image_names_the_csv_and_its_folder(tmp_path: Path) -> None:
    rows = read_rows()
    rows[0]["path"] = str(Path(rows[0]["path"]).relative_to(KERMANY))  # relative: read from the CSV's folder
    path = kermany_csv(tmp_path / "rel.csv", rows)
    ds = build_dataset(path, split="train", labeled=True, in_chans=1)
    with pytest.raises(ImageDecodeError, match=rf"train/NORMAL/IM-\d+-0001.jpeg: file not found \(listed in "
                                               rf"{path}; relative paths are read from the CSV's folder {tmp_path}\)"):
        ds.sample(0)


def test_an_unknown_split_value_is_an_error_not_dropped_rows(tmp_path: Path) -> None:
    path = kermany_csv(tmp_path / "s.csv", split={3: "Train"})
    with pytest.raises(TransferDataError, match=r"line 5 has split 'Train'.*other rows would be left out"):
        open_splits(str(path), 1, None, False)
