"""Pooling for encoders without a class token, and DataLoader worker counts (issue 6 fixes)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from test_linprobe_fixtures import BREAST_NPZ, fails_with, npz_head, read_results

from common.data.loader import usable_workers
from common.transfer.data import make_loader
from common.transfer.encoder import resolve_spec
from common.transfer.errors import TransferUsageError
from linprobe.main import main as linprobe_main

COMMON = ["--num_workers", "0", "--n_bootstrap", "50", "--input_size", "32"]


@pytest.fixture(scope="module")
def breast_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 200 / 60 / 60 real BreastMNIST images of each split."""
    return npz_head(BREAST_NPZ, tmp_path_factory.mktemp("data") / "breast_subset.npz",
                    {"train": 200, "val": 60, "test": 60})


@pytest.fixture(scope="module")
def vim_without_cls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported ``test_vim`` built without a class token (encoder.json records ``cls_token: false``)."""
    import models
    from models.checkpoint import export_encoder

    torch.manual_seed(0)
    encoder = models.create_model("test_vim", in_chans=1, cls_token=False, global_pool="avg")
    weights, _ = export_encoder(encoder, tmp_path_factory.mktemp("vim"), normalization={"mean": [0.5], "std": [0.25]})
    return weights


def test_pooling_defaults_to_average_without_a_class_token() -> None:
    for name in ("test_medmamba", "test_mambamic"):
        spec = resolve_spec(name, None, None, 1, 0, None, None, default_pool="token")
        assert spec.kwargs["global_pool"] == "avg", name
        assert resolve_spec(name, None, None, 1, 0, True, None, default_pool="token").kwargs["global_pool"] == "avg"
        with pytest.raises(TransferUsageError, match=f"--cls_token: model '{name}' has no class token"):
            resolve_spec(name, None, None, 1, 0, False, None, default_pool="token")
    # with a class token, the command's default (linprobe: the token) and explicit choices are kept
    assert resolve_spec("test_vit", None, None, 1, 0, None, None, default_pool="token").kwargs["global_pool"] == "token"
    assert resolve_spec("test_vim", None, None, 1, 0, False, None, default_pool="avg").kwargs["global_pool"] == "token"


def test_linprobe_of_a_vim_without_class_token(vim_without_cls: Path, breast_subset: Path, tmp_path: Path) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("scanmae.transfer").addHandler(handler)
    try:
        out = tmp_path / "run"
        assert linprobe_main(["--data_path", str(breast_subset), "--finetune", str(vim_without_cls), "--fast",
                              "--batch_size", "50", "--epochs", "2", "--warmup_epochs", "1", "--lr_grid", "1",
                              "--output_dir", str(out), *COMMON]) == 0
    finally:
        logging.getLogger("scanmae.transfer").removeHandler(handler)
    assert any("has no class token" in r.getMessage() for r in records)
    model = json.loads((out / "model.json").read_text())
    assert model["kwargs"]["global_pool"] == "avg" and model["kwargs"]["cls_token"] is False
    assert 0.0 <= read_results(out)["auc"] <= 1.0
    argv = ["--data_path", str(breast_subset), "--finetune", str(vim_without_cls), "--cls_token", "--fast",
            "--output_dir", str(tmp_path / "token"), *COMMON]
    fails_with(linprobe_main, argv, r"--cls_token: model 'test_vim' has no class token")


def test_finetune_cls_token_on_mambamic_is_a_clear_error(breast_subset: Path, tmp_path: Path) -> None:
    from finetune.main import main as finetune_main

    argv = ["--data_path", str(breast_subset), "--model", "test_mambamic", "--in_chans", "1", "--cls_token",
            "--output_dir", str(tmp_path), *COMMON]
    fails_with(finetune_main, argv, r"--cls_token: model 'test_mambamic' has no class token")
    assert not (tmp_path / "log.jsonl").exists()


def test_worker_count_is_capped_to_the_available_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils.data import SequentialSampler, TensorDataset

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert (usable_workers(0), usable_workers(1), usable_workers(10)) == (0, 1, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 processes on a 2-CPU node: one worker each, not zero
    assert usable_workers(10) == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    ds = TensorDataset(torch.zeros(4, 1))
    loader = make_loader(ds, 2, SequentialSampler(ds), num_workers=10, pin_memory=False)
    assert loader.num_workers == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyTorch's "excessive worker creation" warning would raise here
        loader.check_worker_number_rationality()
