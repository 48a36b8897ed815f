"""finetune's best checkpoint as a pretrained checkpoint again, and labels read without decoding images
(issue 6 fixes)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_linprobe_fixtures import (
    BREAST_NPZ,
    export_tiny_encoder,
    fails_with,
    finetune_fast_args,
    kermany_image_folder,
    kermany_multilabel_csv,
    read_results,
)

from common.checkpoint import CheckpointError, load_weights
from common.data.dataset import build_dataset
from common.data.labels import dataset_labels
from common.transfer.encoder import build_model, resolve_spec
from finetune.main import main as finetune_main
from linprobe.main import main as linprobe_main

FAST = finetune_fast_args(n_bootstrap=50)


def _labels_by_decoding(ds) -> np.ndarray:  # noqa: ANN001 - an ImageDataset
    labels = [label for _, label in ds]
    return np.stack([lab.numpy() for lab in labels]) if ds.multilabel else np.asarray(labels, dtype=np.int64)


def _forbid_decoding(ds, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    def refuse(*_: object) -> None:
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(ds.source, "decode", refuse)
    if hasattr(ds.source, "load"):
        monkeypatch.setattr(ds.source, "load", refuse)


def test_split_labels_without_decoding_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_data_fixtures import write_shards

    folder = kermany_image_folder(tmp_path / "folder", {"train": 3, "val": 2})
    findings = kermany_multilabel_csv(tmp_path / "findings.csv", {"train": 3, "val": 1})
    with np.load(BREAST_NPZ) as z:
        write_shards(tmp_path / "shards", z["train_images"][:25], z["train_labels"][:25, 0], "train", per_shard=10)
    cases = [build_dataset(BREAST_NPZ, "val", labeled=True, in_chans=1),
             build_dataset(folder, "train", labeled=True, in_chans=1),
             build_dataset(findings, "train", labeled=True, in_chans=1, multilabel=True),
             build_dataset(tmp_path / "shards", "train", labeled=True, in_chans=1, num_classes=2)]
    for ds in cases:
        expected = _labels_by_decoding(ds)
        with monkeypatch.context() as patch:
            _forbid_decoding(ds, patch)
            got = dataset_labels(ds)
        assert got.dtype == expected.dtype and got.shape == expected.shape, ds
        np.testing.assert_array_equal(got, expected)
    assert dataset_labels(cases[2]).shape == (9, 3)  # 3 findings, 3 per subtype
    assert sorted(set(dataset_labels(cases[1]).tolist())) == [0, 1]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of finetune on BreastMNIST with a class-weighted loss and no image check: the class weights
    come from the labels alone (the decoding pass is made to fail)."""
    root = tmp_path_factory.mktemp("ft")
    encoder = export_tiny_encoder(root / "encoder")
    out = root / "run"
    with pytest.MonkeyPatch.context() as patch:
        def no_scan(*_: object, **__: object) -> None:
            raise AssertionError("the images were decoded to get the labels")

        patch.setattr("common.transfer.setup.scan_labels", no_scan)
        assert finetune_main(["--data_path", str(BREAST_NPZ), "--finetune", str(encoder), "--batch_size", "128",
                              "--epochs", "1", "--class_weighted_loss", "--no-verify_data", "--output_dir",
                              str(out), *FAST]) == 0
    # BreastMNIST train: 147 malignant (0), 399 benign (1)
    assert read_results(out)["class_weights"] == pytest.approx([546 / (2 * 147), 546 / (2 * 399)], rel=1e-5)
    return out / "checkpoint-best.safetensors"


def test_best_checkpoint_is_loadable_like_an_exported_encoder(finetuned: Path) -> None:
    import models

    meta = json.loads(finetuned.with_suffix(".json").read_text())
    assert (meta["model"], meta["kind"], meta["num_classes"], meta["global_pool"]) == ("test_vit", "classifier", 2,
                                                                                        "avg")
    best = load_weights(finetuned)
    # what finetune --finetune builds (same class count: the head is kept)
    spec = resolve_spec(None, str(finetuned), None, None, 2, None, None, default_pool="avg")
    assert (spec.model, spec.in_chans, spec.input_size, spec.kwargs["global_pool"]) == ("test_vit", 1, 32, "avg")
    assert spec.mean == meta["normalization"]["mean"]
    rebuilt = build_model(spec).state_dict()
    assert rebuilt.keys() == best.keys()
    for key, value in best.items():
        torch.testing.assert_close(rebuilt[key], value, msg=key)
    # the registry's own loader: exact classifier, and a headless encoder from the same file
    clf = models.create_model("test_vit", pretrained=finetuned, in_chans=1, num_classes=2, global_pool="avg")
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clf.eval()(x), build_model(spec).eval()(x))
    encoder = models.create_model("test_vit", pretrained=finetuned, in_chans=1)
    torch.testing.assert_close(encoder.state_dict()["patch_embed.proj.weight"], best["patch_embed.proj.weight"])


def test_linprobe_and_finetune_accept_the_best_checkpoint(finetuned: Path, tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    assert linprobe_main(["--data_path", str(BREAST_NPZ), "--finetune", str(finetuned), "--fast", "--batch_size",
                          "128", "--epochs", "1", "--warmup_epochs", "1", "--lr_grid", "1", "--output_dir",
                          str(probe), "--num_workers", "0", "--n_bootstrap", "50"]) == 0
    model = json.loads((probe / "model.json").read_text())
    assert (model["model"], model["kwargs"]["global_pool"]) == ("test_vit", "avg")  # the fine-tuned pooling
    # --model naming the same architecture is fine; another one is the usual clear error
    spec = resolve_spec("test_vit", str(finetuned), None, None, 0, None, None, default_pool="token")
    assert spec.model == "test_vit"
    argv = ["--data_path", str(BREAST_NPZ), "--finetune", str(finetuned), "--model", "test_vim",
            "--output_dir", str(tmp_path / "x"), *FAST]
    fails_with(finetune_main, argv, r"holds a 'test_vit' encoder.*--model is 'test_vim'")
    # a linear probe's checkpoint-best is a head only: say what to pass instead
    argv = ["--data_path", str(BREAST_NPZ), "--finetune", str(probe / "checkpoint-best.safetensors"),
            "--output_dir", str(tmp_path / "y"), *FAST]
    fails_with(finetune_main, argv, r"probe/checkpoint-best.json: a linear-probe checkpoint holds only "
                                           rf"the probe head.*pass its encoder \({re.escape(str(finetuned))}\)")


def test_best_checkpoint_of_an_older_finetune_is_named(finetuned: Path, tmp_path: Path) -> None:
    old = tmp_path / "checkpoint-best.safetensors"
    shutil.copy(finetuned, old)
    meta = json.loads(finetuned.with_suffix(".json").read_text())
    old.with_suffix(".json").write_text(json.dumps({"kind": "classifier", "model": meta["transfer"]}))
    with pytest.raises(CheckpointError, match=r"checkpoint-best.json: written by an older finetune"):
        resolve_spec(None, str(old), None, None, 2, None, None)
