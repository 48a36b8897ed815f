"""The kNN monitor of pretrain/main.py: the kNN rule itself, its records in log.jsonl on real BreastMNIST, and
that monitoring leaves the training run (weights, global RNG, train mode) exactly as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from common.data import default_normalization
from common.logging import read_jsonl
from pretrain.main import main as pretrain_main
from pretrain.monitor import KnnMonitor, knn_metrics, knn_scores

REPO = Path(__file__).resolve().parents[1]
BREAST = REPO / "sample_data" / "medmnist" / "breastmnist.npz"  # 28 px ultrasound, 2 classes, train/val/test


def _clusters(n_per_class: int, centers: torch.Tensor, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.cat([c + spread * torch.randn(n_per_class, centers.shape[1], generator=gen) for c in centers])
    labels = torch.arange(len(centers)).repeat_interleave(n_per_class)
    return feats, labels


def test_knn_is_perfect_on_separated_classes_and_wrong_on_swapped_labels() -> None:
    centers = torch.eye(3, 16) * 10.0  # three orthogonal directions: cosine similarity separates them
    train_f, train_y = _clusters(30, centers, 0.5, seed=0)
    val_f, val_y = _clusters(10, centers, 0.5, seed=1)
    assert knn_metrics(train_f, train_y, val_f, val_y, num_classes=3, k=20)["knn_acc"] == 1.0
    probs = knn_scores(train_f, train_y, val_f, num_classes=3, k=20)
    assert torch.allclose(probs.sum(dim=1), torch.ones(len(val_f)))
    swapped = (train_y + 1) % 3
    assert knn_metrics(train_f, swapped, val_f, val_y, num_classes=3, k=20)["knn_acc"] == 0.0
    binary = knn_metrics(train_f[:60], train_y[:60], val_f[:20], val_y[:20], num_classes=2, k=5)
    assert binary == {"knn_acc": 1.0, "knn_auc": 1.0}


def test_knn_weights_close_neighbours_more() -> None:
    """One very close neighbour of class 1 outweighs two distant ones of class 0 (a majority vote says 0)."""
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[0.95, 0.31]])
    probs = knn_scores(train, labels, query, num_classes=2, k=3)
    assert probs.argmax(dim=1).item() == 1 and probs[0, 1] > 0.99


def test_monitor_keeps_global_rng_and_train_mode() -> None:
    import models

    mae = models.create_model("mae_test_vit", img_size=32, in_chans=1)
    mae.train()
    mae.encoder.blocks[0].eval()  # a submodule deliberately in eval mode must stay so
    mean, std = default_normalization(1)
    monitor = KnnMonitor(data_path=str(BREAST), every=1, k=5, max_samples=40, input_size=32, in_chans=1,
                         mean=mean, std=std, batch_size=16).open()
    before = torch.get_rng_state()
    metrics = monitor.run(mae, Accelerator(cpu=True))
    assert torch.equal(torch.get_rng_state(), before)
    assert mae.training and mae.encoder.training and not mae.encoder.blocks[0].training
    assert metrics["knn_train"] == 40 and metrics["knn_val"] == 40 and 0.0 <= metrics["knn_acc"] <= 1.0
    assert metrics == {**monitor.run(mae, Accelerator(cpu=True)), "knn_seconds": metrics["knn_seconds"]}


def _args(out: Path, **over: object) -> list[str]:
    opts: dict[str, object] = {"model": "mae_test_vit", "input_size": 32, "in_chans": 1, "data_path": BREAST,
                               "output_dir": out, "batch_size": 16, "epochs": 2, "warmup_epochs": 1, "lr": 2e-3,
                               "num_workers": 1, "log_every": 1, "save_every": 1000, "vis_every": 0, "seed": 3,
                               "max_steps": 7}
    opts.update(over)
    argv = ["--norm_pix_loss", "--no-tensorboard"]
    for key, value in opts.items():
        argv += [f"--{key}", str(value)]
    return argv


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_monitor_logs_at_its_steps_and_leaves_training_bitwise_unchanged(tmp_path: Path) -> None:
    on, off = tmp_path / "on", tmp_path / "off"
    assert pretrain_main(_args(on, monitor_data_path=BREAST, monitor_every=3, monitor_k=10,
                               monitor_max_samples=120)) == 0
    assert pretrain_main(_args(off)) == 0
    knn = [r for r in read_jsonl(on / "log.jsonl") if "knn_acc" in r]
    assert [r["step"] for r in knn] == [3, 6, 7]  # every 3 steps and at the last one
    for rec in knn:
        assert rec["event"] == "monitor" and 0.0 <= rec["knn_acc"] <= 1.0 and 0.0 <= rec["knn_auc"] <= 1.0
        assert rec["knn_train"] == 120 and rec["knn_val"] == 78 and rec["knn_k"] == 10  # val (78) under the cap
    assert not [r for r in read_jsonl(off / "log.jsonl") if "knn_acc" in r]
    loss_on = [r["loss"] for r in read_jsonl(on / "log.jsonl") if "loss" in r]
    loss_off = [r["loss"] for r in read_jsonl(off / "log.jsonl") if "loss" in r]
    assert loss_on == loss_off and len(loss_on) == 7
    ckpt = Path("checkpoints") / "step_00000007" / "model.safetensors"
    assert _digest(on / ckpt) == _digest(off / ckpt)
    assert _digest(on / "encoder.safetensors") == _digest(off / "encoder.safetensors")


def test_monitor_flag_errors(tmp_path: Path) -> None:
    assert pretrain_main(_args(tmp_path / "a", monitor_every=5)) == 2  # no --monitor_data_path
    assert pretrain_main(_args(tmp_path / "b", monitor_every=5, monitor_data_path=tmp_path / "nope.npz")) == 2
    with pytest.raises(ValueError, match="features must be"):
        knn_scores(torch.zeros(4, 3), torch.zeros(4), torch.zeros(2, 5), num_classes=2)
