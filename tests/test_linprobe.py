"""linprobe end to end on real MedMNIST / Kermany data with a tiny encoder (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_linprobe_fixtures import (
    BREAST_NPZ,
    PNEUMONIA_NPZ,
    REPO,
    cli_fails,
    export_tiny_encoder,
    kermany_multilabel_csv,
    read_results,
)

from common.checkpoint import load_weights
from common.logging import read_jsonl
from linprobe.main import main

COMMON = ["--num_workers", "0", "--n_bootstrap", "200", "--input_size", "32"]


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_encoder(tmp_path_factory.mktemp("encoder"))


def test_fast_probe_on_pneumoniamnist_beats_chance(encoder_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["--data_path", str(PNEUMONIA_NPZ), "--finetune", str(encoder_ckpt), "--fast", "--global_pool",
                 "--batch_size", "256", "--epochs", "6", "--warmup_epochs", "1", "--lr_grid", "1", "10", "100",
                 "--output_dir", str(out), *COMMON]) == 0
    r = read_results(out)
    # Test split: 234 normal / 390 pneumonia, so always guessing the majority gives acc 0.625, AUC 0.5.
    assert r["evaluated_on"] == "test"
    assert r["auc"] > 0.75 and r["balanced_acc"] > 0.65 and r["acc"] > 0.7
    lo, hi = r["ci95"]["auc"]
    assert lo < r["auc"] < hi
    # Two classes: the test metrics at the decision threshold fitted on validation sit beside the argmax ones.
    point = r["test"]["at_val_threshold"]
    assert point["fitted_on"] == "val" and 0.0 < point["threshold"] < 1.0 and point["balanced_acc"] > 0.65
    assert sum(map(sum, point["confusion_matrix"])) == r["test"]["num_samples"] and "balanced_acc" in point["ci95"]
    assert {e["blr"] for e in r["lr_grid"]} == {1.0, 10.0, 100.0}
    for name in ("log.jsonl", "checkpoint-best.safetensors", "confusion_matrix_test.png", "config.yaml"):
        assert (out / name).is_file(), name
    assert len(list((out / "features").glob("*.safetensors"))) == 3
    # The cached features are reused: a second run gives the same answer.
    out2 = tmp_path / "again"
    main(["--data_path", str(PNEUMONIA_NPZ), "--finetune", str(encoder_ckpt), "--fast", "--global_pool",
          "--batch_size", "256", "--epochs", "6", "--warmup_epochs", "1", "--lr_grid", "1", "10", "100",
          "--output_dir", str(out2), "--feature_cache", str(out / "features"), *COMMON])
    assert read_results(out2)["auc"] == pytest.approx(r["auc"])
    assert not (out2 / "features").exists()


def test_fast_grid_head_equals_slow_run_at_the_same_lr(encoder_ckpt: Path, tmp_path: Path) -> None:
    base = ["--data_path", str(BREAST_NPZ), "--finetune", str(encoder_ckpt), "--global_pool", "--batch_size",
            "64", "--epochs", "4", "--warmup_epochs", "1", "--train_aug", "none", *COMMON]
    main([*base, "--fast", "--lr_grid", "0.3", "3", "30", "--output_dir", str(tmp_path / "fast")])
    fast = read_results(tmp_path / "fast")
    main([*base, "--blr", str(fast["blr"]), "--output_dir", str(tmp_path / "slow")])
    slow = read_results(tmp_path / "slow")
    assert slow["best_epoch"] == fast["best_epoch"]
    assert slow["lr"] == pytest.approx(fast["lr"])
    head_fast = load_weights(tmp_path / "fast" / "checkpoint-best.safetensors")
    head_slow = load_weights(tmp_path / "slow" / "checkpoint-best.safetensors")
    assert head_fast.keys() == head_slow.keys()
    for key in head_fast:
        torch.testing.assert_close(head_fast[key], head_slow[key], rtol=1e-3, atol=1e-4)
    for key in ("acc", "auc", "f1"):
        assert slow[key] == pytest.approx(fast[key], abs=1e-3)
    # per-epoch validation log of the slow run, one line per epoch
    assert [rec["epoch"] for rec in read_jsonl(tmp_path / "slow" / "log.jsonl")] == [0, 1, 2, 3]


def test_slow_probe_resume_and_eval(encoder_ckpt: Path, tmp_path: Path) -> None:
    base = ["--data_path", str(BREAST_NPZ), "--finetune", str(encoder_ckpt), "--batch_size", "128",
            "--warmup_epochs", "1", "--blr", "10", *COMMON]
    out = tmp_path / "run"
    main([*base, "--epochs", "2", "--output_dir", str(out)])
    main([*base, "--epochs", "3", "--output_dir", str(out), "--resume", str(out / "checkpoint-last.pt")])
    assert [rec["epoch"] for rec in read_jsonl(out / "log.jsonl")] == [0, 1, 2]
    trained = read_results(out)
    main([*base, "--eval", "--resume", str(out / "checkpoint-best.safetensors"), "--output_dir",
          str(tmp_path / "eval")])
    evaluated = read_results(tmp_path / "eval")
    assert evaluated["mode"] == "eval"
    assert evaluated["auc"] == pytest.approx(trained["auc"])
    assert evaluated["test"]["at_val_threshold"]["threshold"] == pytest.approx(
        trained["test"]["at_val_threshold"]["threshold"])


def test_multilabel_probe_on_kermany_findings(encoder_ckpt: Path, tmp_path: Path) -> None:
    csv_path = kermany_multilabel_csv(tmp_path / "findings.csv", {"train": 40, "val": 20, "test": 30})
    out = tmp_path / "run"
    main(["--data_path", str(csv_path), "--finetune", str(encoder_ckpt), "--multilabel", "--nb_classes", "3",
          "--fast", "--global_pool", "--batch_size", "30", "--epochs", "10", "--warmup_epochs", "1",
          "--lr_grid", "1", "10", "100", "--output_dir", str(out), *COMMON])
    r = read_results(out)
    assert r["multilabel"] is True
    assert set(r["test"]["per_label"]) == {"bacterial", "pneumonia", "viral"}
    assert all(isinstance(r[k], float) for k in ("acc", "balanced_acc", "auc", "f1"))
    assert r["auc"] == pytest.approx(sum(v["auc"] for v in r["test"]["per_label"].values()) / 3)
    # normal vs pneumonia is visible even to random features (bacterial vs viral hardly)
    assert r["test"]["per_label"]["pneumonia"]["auc"] > 0.65 and r["auc"] > 0.55
    assert not (out / "confusion_matrix_test.json").exists()


def test_multilabel_data_without_flag_is_an_error(encoder_ckpt: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = kermany_multilabel_csv(tmp_path / "findings.csv", {"train": 2, "val": 1, "test": 1})
    argv = ["--data_path", str(csv_path), "--finetune", str(encoder_ckpt), "--output_dir",
            str(tmp_path / "x"), *COMMON]
    cli_fails(capsys, main, argv, "multi-label.*--multilabel")


def test_runs_as_a_script_with_mae_flags() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "linprobe" / "main.py"), "--help"], cwd=REPO / "linprobe",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--batch_size", "--epochs", "--blr", "--weight_decay", "--warmup_epochs", "--global_pool",
                 "--cls_token", "--eval", "--dist_eval", "--resume", "--output_dir", "--seed", "--model",
                 "--input_size", "--in_chans", "--data_path", "--nb_classes", "--finetune", "--fast"):
        assert flag in proc.stdout, flag


def test_defaults_follow_mae_main_linprobe() -> None:
    from common.transfer.cli import parse_transfer_config
    from linprobe.config import LinprobeConfig

    cfg = parse_transfer_config(LinprobeConfig, "linprobe", "", [])
    # global_pool None: the class token (MAE's default) whenever the encoder has one
    assert (cfg.batch_size, cfg.epochs, cfg.blr, cfg.weight_decay, cfg.warmup_epochs, cfg.global_pool) == \
        (512, 90, 0.1, 0.0, 10, None)
    assert parse_transfer_config(LinprobeConfig, "linprobe", "", ["--global_pool"]).global_pool is True
    assert parse_transfer_config(LinprobeConfig, "linprobe", "", ["--cls_token"]).global_pool is False
    json.dumps(vars(cfg))


def test_probe_on_curated_shards_with_a_three_channel_encoder(tmp_path: Path) -> None:
    """Labeled shards in the curate format (gray BreastMNIST) feed an RGB encoder (gray repeated)."""
    import numpy as np
    from test_data_fixtures import write_shards

    with np.load(BREAST_NPZ) as z:
        for split in ("train", "val", "test"):
            write_shards(tmp_path / "shards", z[f"{split}_images"], z[f"{split}_labels"][:, 0], split,
                         per_shard=100)
    ckpt = export_tiny_encoder(tmp_path / "rgb", in_chans=3)
    out = tmp_path / "run"
    main(["--data_path", str(tmp_path / "shards"), "--nb_classes", "2", "--finetune", str(ckpt), "--fast",
          "--global_pool", "--batch_size", "64", "--epochs", "2", "--warmup_epochs", "1", "--lr_grid", "10",
          "--output_dir", str(out), *COMMON])
    r = read_results(out)
    assert (r["test"]["num_samples"], r["val"]["num_samples"]) == (156, 78)
    assert json.loads((out / "model.json").read_text())["in_chans"] == 3


def test_nb_classes_mismatch_before_any_work(encoder_ckpt: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--data_path", str(BREAST_NPZ), "--finetune", str(encoder_ckpt), "--nb_classes", "5", "--fast",
            "--output_dir", str(tmp_path), *COMMON]
    cli_fails(capsys, main, argv, r"breastmnist.npz: --nb_classes 5 but the data has 2 classes")
    assert not (tmp_path / "features").exists()


@pytest.mark.slow
def test_two_process_probe_with_dist_eval(encoder_ckpt: Path, tmp_path: Path) -> None:
    """torchrun with 2 CPU processes (gloo): LR scaled by the world size, sharded evaluation reassembled."""
    import os

    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(REPO / "linprobe" / "main.py"), "--data_path", str(BREAST_NPZ), "--finetune",
                           str(encoder_ckpt), "--batch_size", "32", "--epochs", "1", "--warmup_epochs", "1",
                           "--blr", "10", "--dist_eval", "--output_dir", str(out), *COMMON],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = read_results(out)
    assert r["lr"] == pytest.approx(10 * 32 * 2 / 256)
    assert (r["test"]["num_samples"], r["val"]["num_samples"]) == (156, 78)
    assert proc.stdout.count("linprobe test:") == 1


def test_image_folder_without_test_split_reports_on_val(encoder_ckpt: Path, tmp_path: Path) -> None:
    from test_linprobe_fixtures import kermany_image_folder

    root = kermany_image_folder(tmp_path / "data", {"train": 30, "val": 15})
    out = tmp_path / "run"
    main(["--data_path", str(root), "--finetune", str(encoder_ckpt), "--fast", "--global_pool", "--batch_size", "20",
          "--epochs", "3", "--warmup_epochs", "1", "--lr_grid", "10", "--output_dir", str(out), *COMMON])
    r = read_results(out)
    assert r["evaluated_on"] == "val" and r["test"] is None and r["acc"] == r["val"]["acc"]
    assert set(r["val"]["per_class"]) == {"NORMAL", "PNEUMONIA"}
    cm = json.loads((out / "confusion_matrix_val.json").read_text())
    assert cm["labels"] == ["NORMAL", "PNEUMONIA"] and sum(map(sum, cm["matrix"])) == 30


def test_position_embeddings_are_resized_for_another_input_size(encoder_ckpt: Path) -> None:
    from common.transfer.encoder import build_model, resolve_spec

    spec = resolve_spec(None, str(encoder_ckpt), 64, None, 0, True, None)
    encoder = build_model(spec).eval()
    with torch.no_grad():
        tokens = encoder.forward_features(torch.zeros(2, 1, 64, 64))
    assert tokens.shape == (2, 1 + (64 // 8) ** 2, 32)
