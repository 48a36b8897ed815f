"""--attention_backend in finetune and linprobe: our attention kernels (interpreted on the CPU) train and probe the
same model as SDPA, the choice is kept in config.yaml, and a backend that cannot run is a one-line error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_linprobe_fixtures import (
    BREAST_NPZ,
    cli_fails,
    export_tiny_encoder,
    finetune_fast_args,
    read_results,
)

from common.config import load_yaml
from common.logging import read_jsonl
from finetune.main import main as finetune_main
from linprobe.main import main as linprobe_main


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_encoder(tmp_path_factory.mktemp("encoder"))


@pytest.fixture(scope="module")
def tiny_breast(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 32 / 16 / 16 BreastMNIST images: the interpreted kernels take seconds per step."""
    out = {}
    with np.load(BREAST_NPZ) as z:
        for split, n in (("train", 32), ("val", 16), ("test", 16)):
            out[f"{split}_images"], out[f"{split}_labels"] = z[f"{split}_images"][:n], z[f"{split}_labels"][:n]
    path = tmp_path_factory.mktemp("data") / "tiny_breast.npz"
    np.savez(path, **out)
    return path


def _losses(out: Path) -> list[float]:
    """Every epoch's train and validation loss."""
    return [r[k] for r in read_jsonl(out / "log.jsonl") for k in ("train_loss", "val_loss") if k in r]


@pytest.mark.parametrize("stage", ["finetune", "linprobe"])
def test_triton_attention_trains_the_same_model_as_sdpa(encoder_ckpt: Path, tiny_breast: Path, tmp_path: Path,
                                                        stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import kernels.triton_attention as triton_attention

    main = finetune_main if stage == "finetune" else linprobe_main
    calls = []  # our kernels' calls (the attention block imports the function when it runs it)
    kernel = triton_attention.packed_attention_triton
    monkeypatch.setattr(triton_attention, "packed_attention_triton", lambda qkv: calls.append(1) or kernel(qkv))
    argv = ["--data_path", str(tiny_breast), "--finetune", str(encoder_ckpt), "--batch_size", "16", "--epochs", "2"]
    if stage == "finetune":
        argv += finetune_fast_args(n_bootstrap=20)
    else:
        argv += ["--num_workers", "0", "--n_bootstrap", "20", "--input_size", "32", "--warmup_epochs", "1",
                 "--train_aug", "none"]
    runs = {}
    for backend in ("sdpa", "triton"):
        out = tmp_path / backend
        calls.clear()
        assert main([*argv, "--attention_backend", backend, "--output_dir", str(out)]) == 0
        assert load_yaml(out / "config.yaml")["attention_backend"] == backend
        assert (len(calls) > 0) == (backend == "triton"), (backend, len(calls))
        runs[backend] = (_losses(out), read_results(out))
    (sdpa_losses, sdpa), (triton_losses, triton) = runs["sdpa"], runs["triton"]
    assert len(sdpa_losses) == len(triton_losses) == 4
    assert triton_losses == pytest.approx(sdpa_losses, rel=1e-4, abs=1e-6)  # float32 on the CPU: up to rounding
    assert triton["auc"] == pytest.approx(sdpa["auc"], abs=1e-3)


def test_backend_errors_are_one_line(encoder_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for main in (finetune_main, linprobe_main):
        argv = ["--data_path", str(BREAST_NPZ), "--finetune", str(encoder_ckpt), "--output_dir", str(tmp_path / "o"),
                "--num_workers", "0", "--input_size", "32"]
        cli_fails(capsys, main, [*argv, "--attention_backend", "flash"],
                  r"attention_backend must be one of sdpa, triton, auto, got 'flash'")
        if not torch.cuda.is_available():  # no CUDA and no interpreter: said before any data is read
            with pytest.MonkeyPatch.context() as env:
                env.delenv("TRITON_INTERPRET", raising=False)
                cli_fails(capsys, main, [*argv, "--attention_backend", "triton"],
                          r"--attention_backend triton needs a CUDA device")
    assert not (tmp_path / "o" / "log.jsonl").exists()


def test_heads_our_kernels_do_not_take_are_a_usage_error() -> None:
    """build_model (both transfer stages) puts the attention blocks on the stage's backend; "triton" on a model whose
    heads our kernels do not take (8 channels here) is a usage error naming the block, "auto" builds it."""
    from common.transfer.encoder import EncoderSpec, build_model
    from common.transfer.errors import TransferUsageError

    spec = EncoderSpec(model="test_vit", kwargs={"num_heads": 4, "img_size": 32, "in_chans": 1}, input_size=32,
                       in_chans=1, mean=[0.5], std=[0.25])
    with pytest.raises(TransferUsageError, match=r"--attention_backend: .*blocks\.0\.attn has 8"):
        build_model(spec, "triton")
    model = build_model(spec, "auto")
    assert {m.attention_backend for m in model.modules() if hasattr(m, "attention_backend")} == {"auto"}
