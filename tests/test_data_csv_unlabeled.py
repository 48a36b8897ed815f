"""A CSV of images with metadata columns and no label column: unlabeled MAE pretraining reads it, and
linprobe / finetune refuse it with one line naming the columns looked for and the columns it has.

Real Kermany chest X-rays copied next to the CSV (relative paths), as a user's export would list them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_linprobe_fixtures import KERMANY, export_tiny_encoder, fails_with, kermany_rows

from common.data import DataSourceError, build_dataset
from common.transfer.data import open_splits
from finetune.main import main as finetune_main
from linprobe.main import main as linprobe_main
from pretrain.main import main as pretrain_main


def metadata_csv(folder: Path, header: str = "path,patient_id,age,split", n: int = 8) -> Path:
    """``n`` X-rays under ``folder/images`` and a CSV listing them with ``header`` (train, then 2 val rows)."""
    (folder / "images").mkdir(parents=True)
    lines = [header]
    for i, row in enumerate(kermany_rows()[:n]):
        name = Path(row["path"]).name
        shutil.copy(KERMANY / row["path"], folder / "images" / name)
        values = {"path": f"images/{name}", "patient_id": f"P{i:04d}", "age": str(40 + i),
                  "split": "val" if i >= n - 2 else "train"}
        lines.append(",".join(values[c] for c in header.split(",")))
    path = folder / "scans.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("header", ["path,patient_id,age,split", "path,split"])
def test_a_csv_without_labels_is_an_unlabeled_source(tmp_path: Path, header: str) -> None:
    path = metadata_csv(tmp_path, header)
    ds = build_dataset(path, split="train", labeled=False, in_chans=1)
    assert len(ds) == 6 and ds.num_classes is None
    images = list(ds)
    assert all(isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.shape == (1, 224, 224) for x in images)
    columns = header.replace(",", "', '")
    looked_for = (r"no 'label' column, so \['patient_id', 'age'\] are read as one 0/1 column per class.*"
                  r"has patient_id='P0000'" if "age" in header else r"no 'label' column and no 0/1 class columns")
    with pytest.raises(DataSourceError, match=rf"{path}: {looked_for}; name the column holding the class 'label' "
                                              rf"\(the CSV's columns: \['{columns}'\]"):
        build_dataset(path, split="train", labeled=True, in_chans=1)


def test_pretraining_runs_on_a_metadata_csv_and_transfer_refuses_it(tmp_path: Path) -> None:
    path = metadata_csv(tmp_path / "data")
    out = tmp_path / "mae"
    argv = ["--model", "mae_test_vit", "--input_size", "32", "--in_chans", "1", "--data_path", str(path),
            "--output_dir", str(out), "--batch_size", "3", "--epochs", "1", "--warmup_epochs", "0", "--num_workers",
            "0", "--vis_every", "0", "--save_every", "1000", "--no-tensorboard"]
    assert pretrain_main(argv) == 0
    assert (out / "encoder.safetensors").is_file()
    expected = r"scans.csv: no 'label' column.*the CSV's columns: \['path', 'patient_id', 'age', 'split'\]"
    with pytest.raises(DataSourceError, match=expected):
        open_splits(str(path), 1, None, False)
    encoder = export_tiny_encoder(tmp_path / "enc")
    for main in (linprobe_main, finetune_main):
        fails_with(main, ["--data_path", str(path), "--finetune", str(encoder), "--output_dir",
                          str(tmp_path / main.__module__), "--num_workers", "0"], expected)
