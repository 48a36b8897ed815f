"""finetune end to end on real MedMNIST / Kermany data with tiny models (CPU), plus layer-decay groups,
facebookresearch/mae checkpoints and losses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_linprobe_fixtures import (
    BREAST_NPZ,
    PNEUMONIA_NPZ,
    REPO,
    cli_fails,
    export_tiny_encoder,
    finetune_fast_args,
    kermany_multilabel_csv,
    read_results,
)

from common.checkpoint import load_weights
from common.transfer.encoder import build_model, resolve_spec
from common.transfer.losses import build_loss, inverse_frequency_weights, positive_weights
from common.transfer.param_groups import layer_decay_groups
from finetune.main import main

FAST = finetune_fast_args(n_bootstrap=100)


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_encoder(tmp_path_factory.mktemp("encoder"))


@pytest.fixture(scope="module")
def pneumonia_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """800 / 200 / 300 random real PneumoniaMNIST images (seeded), to keep CPU epochs short."""
    rng = np.random.default_rng(0)
    out = {}
    with np.load(PNEUMONIA_NPZ) as z:
        for split, n in (("train", 800), ("val", 200), ("test", 300)):
            idx = rng.permutation(len(z[f"{split}_images"]))[:n]
            out[f"{split}_images"] = z[f"{split}_images"][idx]
            out[f"{split}_labels"] = z[f"{split}_labels"][idx]
    path = tmp_path_factory.mktemp("data") / "pneumonia_subset.npz"
    np.savez(path, **out)
    return path


def test_finetune_pneumoniamnist_beats_chance_and_writes_outputs(encoder_ckpt: Path, pneumonia_subset: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["--data_path", str(pneumonia_subset), "--finetune", str(encoder_ckpt), "--batch_size", "64",
                 "--epochs", "4", "--blr", "3e-2", "--layer_decay", "0.9", "--clip_grad", "1.0",
                 "--output_dir", str(out), *FAST]) == 0
    r = read_results(out)
    assert r["mode"] == "finetune" and r["evaluated_on"] == "test"
    assert r["auc"] > 0.75 and r["balanced_acc"] > 0.6
    for key in ("acc", "balanced_acc", "auc", "f1"):
        assert isinstance(r[key], float)
        lo, hi = r["ci95"][key]
        assert lo <= r[key] <= hi
    assert set(r["test"]["per_class"]) == {"0", "1"}
    for name in ("checkpoint-best.safetensors", "checkpoint-best.json", "checkpoint-last.pt", "log.jsonl",
                 "confusion_matrix_test.json", "confusion_matrix_test.png", "confusion_matrix_val.png"):
        assert (out / name).is_file(), name
    # The best checkpoint is a full classifier that scores the same through --eval.
    main(["--data_path", str(pneumonia_subset), "--finetune", str(encoder_ckpt), "--eval", "--resume",
          str(out / "checkpoint-best.safetensors"), "--output_dir", str(tmp_path / "eval"), *FAST])
    assert read_results(tmp_path / "eval")["auc"] == pytest.approx(r["auc"])


def test_finetune_with_ema_mixup_cutmix_class_weights_and_timm_aug(encoder_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    main(["--data_path", str(BREAST_NPZ), "--finetune", str(encoder_ckpt), "--batch_size", "64", "--epochs", "1",
          "--model_ema", "--model_ema_decay", "0.9", "--mixup", "0.8", "--cutmix", "1.0", "--class_weighted_loss",
          "--num_workers", "0", "--n_bootstrap", "50", "--input_size", "32", "--output_dir", str(out)])
    r = read_results(out)
    assert r["ema"] is True
    # BreastMNIST train: 147 malignant (0), 399 benign (1)
    assert r["class_weights"] == pytest.approx([546 / (2 * 147), 546 / (2 * 399)], rel=1e-5)
    best = load_weights(out / "checkpoint-best.safetensors")
    assert best["head.weight"].shape == (2, 32)


def test_scratch_training_of_a_medmamba_classifier(tmp_path: Path) -> None:
    out = tmp_path / "run"
    main(["--data_path", str(BREAST_NPZ), "--model", "test_medmamba", "--in_chans", "1", "--batch_size", "64",
          "--epochs", "1", "--layer_decay", "1.0", "--output_dir", str(out), *FAST])
    r = read_results(out)
    assert r["mode"] == "scratch" and r["checkpoint"] is None and r["model"] == "test_medmamba"
    assert 0.0 <= r["auc"] <= 1.0


def test_multilabel_finetune_on_kermany_findings(encoder_ckpt: Path, tmp_path: Path) -> None:
    csv_path = kermany_multilabel_csv(tmp_path / "findings.csv", {"train": 22, "val": 8, "test": 8})
    out = tmp_path / "run"
    main(["--data_path", str(csv_path), "--finetune", str(encoder_ckpt), "--multilabel", "--batch_size", "32",
          "--epochs", "1", "--class_weighted_loss", "--mixup", "0.5", "--output_dir", str(out), *FAST])
    r = read_results(out)
    assert r["multilabel"] and set(r["test"]["per_label"]) == {"bacterial", "pneumonia", "viral"}
    # labels sorted by name: bacterial (22 of 66 positive), pneumonia (44 of 66), viral (22 of 66)
    assert r["class_weights"] == pytest.approx([44 / 22, 22 / 44, 44 / 22])


def test_layer_decay_groups_follow_the_encoder_interface() -> None:
    import models

    for name in ("test_vit", "test_vim"):
        model = models.create_model(name, num_classes=3)
        depth = model.num_layer_ids - 2
        groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=0.5)
        scale_of = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
        decay_of = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
        assert scale_of["head.weight"] == 1.0 and decay_of["head.weight"] == 0.05
        assert decay_of["head.bias"] == 0.0
        assert scale_of["patch_embed.proj.weight"] == 0.5 ** (depth + 1)
        block0 = next(n for n in scale_of if n.startswith(("blocks.0.", "layers.0.")) and n.endswith("weight"))
        assert scale_of[block0] == 0.5 ** depth
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert set(scale_of) == trainable  # every trainable parameter in exactly one group
        for token in model.no_weight_decay() & trainable:
            assert decay_of[token] == 0.0


def _mae_layout_checkpoint(path: Path, with_pickled_args: bool = False) -> torch.nn.Module:
    """A facebookresearch/mae pretraining checkpoint: timm ViT encoder keys + MAE decoder keys, {"model": ...}."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(3)
    vit = VisionTransformer(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                            num_classes=0, global_pool="token").eval()
    state = dict(vit.state_dict())
    state.update({"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.randn(16, 32),
                  "decoder_embed.bias": torch.zeros(16), "decoder_pos_embed": torch.zeros(1, 17, 16),
                  "decoder_norm.weight": torch.ones(16), "decoder_norm.bias": torch.zeros(16),
                  "decoder_pred.weight": torch.randn(64, 16), "decoder_pred.bias": torch.zeros(64)})
    payload: dict = {"model": state, "epoch": 799}
    if with_pickled_args:
        import argparse

        payload["args"] = argparse.Namespace(model="mae_vit_base_patch16")  # as MAE's training script saves
    torch.save(payload, path)
    return vit


def test_facebookresearch_mae_checkpoint_loads_with_the_same_features(tmp_path: Path) -> None:
    ckpt = tmp_path / "mae_pretrain.pth"
    vit = _mae_layout_checkpoint(ckpt)
    spec = resolve_spec("test_vit", str(ckpt), None, None, 0, False, None)
    assert (spec.in_chans, spec.input_size) == (1, 32)  # read from the patch kernel and pos_embed
    ours = build_model(spec).eval()
    x = torch.from_numpy(np.load(BREAST_NPZ)["test_images"][:4]).float().div(255).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear")
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), vit.forward_features(x), rtol=1e-4, atol=1e-5)


def test_mae_checkpoint_finetunes_from_the_cli(tmp_path: Path) -> None:
    ckpt = tmp_path / "mae_pretrain.pth"
    _mae_layout_checkpoint(ckpt)
    main(["--data_path", str(BREAST_NPZ), "--model", "test_vit", "--finetune", str(ckpt), "--batch_size", "128",
          "--epochs", "1", "--output_dir", str(tmp_path / "run"), *FAST])
    assert read_results(tmp_path / "run")["checkpoint"] == str(ckpt)


# -- bad input: each error names the file or the mismatch, before training ---------------------------------
def _no_training_happened(out: Path) -> bool:
    return not (out / "log.jsonl").exists() and not (out / "checkpoint-best.safetensors").exists()


def test_nb_classes_mismatch(encoder_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--data_path", str(BREAST_NPZ), "--finetune", str(encoder_ckpt), "--nb_classes", "3",
            "--output_dir", str(tmp_path), *FAST]
    cli_fails(capsys, main, argv, r"--nb_classes 3 but the data has 2 classes")
    assert _no_training_happened(tmp_path)


def test_missing_split_folder(encoder_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_linprobe_fixtures import kermany_image_folder

    root = kermany_image_folder(tmp_path / "data", {"train": 2, "test": 2})
    argv = ["--data_path", str(root), "--finetune", str(encoder_ckpt), "--output_dir", str(tmp_path / "o"), *FAST]
    cli_fails(capsys, main, argv, r"data: the 'val' split is missing")


def test_empty_class_folder(encoder_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_linprobe_fixtures import kermany_image_folder

    root = kermany_image_folder(tmp_path / "data", {"train": 2, "val": 2})
    for f in (root / "val" / "NORMAL").iterdir():
        f.unlink()
    argv = ["--data_path", str(root), "--finetune", str(encoder_ckpt), "--output_dir", str(tmp_path / "o"), *FAST]
    cli_fails(capsys, main, argv, r"val/NORMAL: class folder has no images")


def test_corrupt_image_is_reported_before_training(encoder_ckpt: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from test_linprobe_fixtures import kermany_image_folder

    root = kermany_image_folder(tmp_path / "data", {"train": 3, "val": 2})
    victim = sorted((root / "train" / "PNEUMONIA").iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:300])  # a truncated JPEG
    out = tmp_path / "o"
    argv = ["--data_path", str(root), "--finetune", str(encoder_ckpt), "--batch_size", "2",
            "--output_dir", str(out), *FAST]
    cli_fails(capsys, main, argv, victim.name)
    assert _no_training_happened(out)


def test_every_corrupt_image_of_a_split_is_named_at_once(encoder_ckpt: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from test_linprobe_fixtures import kermany_image_folder

    root = kermany_image_folder(tmp_path / "data", {"train": 3, "val": 2})
    victims = [sorted((root / "train" / cls).iterdir())[0] for cls in ("NORMAL", "PNEUMONIA")]
    victims[0].write_bytes(victims[0].read_bytes()[:300])  # truncated
    victims[1].write_bytes(b"")  # empty
    argv = ["--data_path", str(root), "--finetune", str(encoder_ckpt), "--batch_size", "2",
            "--output_dir", str(tmp_path / "o"), *FAST]
    cli_fails(capsys, main, argv, rf"2 unreadable sample\(s\) in the train split: .*{victims[0].name}.*; "
                                  rf".*{victims[1].name}")


def test_checkpoint_of_another_architecture(encoder_ckpt: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--data_path", str(BREAST_NPZ), "--finetune", str(encoder_ckpt), "--model", "test_vim",
            "--output_dir", str(tmp_path), *FAST]
    cli_fails(capsys, main, argv, r"holds a 'test_vit' encoder.*--model is 'test_vim'")
    # a foreign checkpoint (no encoder.json) whose tensors do not fit the named model
    ckpt = tmp_path / "mae_pretrain.pth"
    _mae_layout_checkpoint(ckpt)
    argv = ["--data_path", str(BREAST_NPZ), "--finetune", str(ckpt), "--model", "vit_tiny_patch16",
            "--output_dir", str(tmp_path / "o"), *FAST]
    cli_fails(capsys, main, argv, r"mae_pretrain.pth.*pos_embed")


def test_foreign_checkpoint_needs_model_and_pickles_are_refused(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "mae_pretrain.pth"
    _mae_layout_checkpoint(ckpt)
    argv = ["--data_path", str(BREAST_NPZ), "--finetune", str(ckpt), "--output_dir", str(tmp_path), *FAST]
    cli_fails(capsys, main, argv, r"mae_pretrain.pth: no encoder.json.*pass --model")
    pickled = tmp_path / "with_args.pth"
    _mae_layout_checkpoint(pickled, with_pickled_args=True)
    argv = ["--data_path", str(BREAST_NPZ), "--finetune", str(pickled), "--model", "test_vit",
            "--output_dir", str(tmp_path / "o"), *FAST]
    cli_fails(capsys, main, argv, r"with_args.pth: refused to load")


# -- losses, flags -----------------------------------------------------------------------------------------
def test_class_weights() -> None:
    y = np.load(BREAST_NPZ)["train_labels"].reshape(-1)
    w = inverse_frequency_weights(y, 2)
    assert float(w[torch.from_numpy(y.astype(np.int64))].sum()) == pytest.approx(len(y))  # balanced: each class carries half the weight
    from sklearn.utils.class_weight import compute_class_weight
    np.testing.assert_allclose(w.numpy(), compute_class_weight("balanced", classes=np.array([0, 1]), y=y), rtol=1e-6)
    multi = np.array([[1, 0], [1, 0], [1, 1], [0, 0]])
    np.testing.assert_allclose(positive_weights(multi).numpy(), [1 / 3, 3.0], rtol=1e-6)


@pytest.mark.parametrize("multilabel,mixup", [(False, False), (False, True), (True, False)])
def test_class_weighted_losses_move_with_the_criterion(multilabel: bool, mixup: bool) -> None:
    # The weights are computed on the CPU; finetune moves the criterion to the model's device (the GPU run failed
    # with the weight left on the CPU). The meta device stands in for a GPU here.
    loss = build_loss(multilabel, mixup, 0.1, torch.tensor([0.5, 2.0])).to("meta")
    tensors = list(loss.buffers())
    assert len(tensors) == 1 and tensors[0].device.type == "meta"
    logits, targets = torch.randn(4, 2, device="meta"), torch.rand(4, 2, device="meta")
    assert loss(logits, targets if multilabel or mixup else targets[:, 0].long()).device.type == "meta"


def test_runs_as_a_script_with_mae_flags_and_defaults() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "finetune" / "main.py"), "--help"], cwd=REPO / "finetune",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--layer_decay", "--drop_path", "--mixup", "--cutmix", "--smoothing", "--reprob", "--aa",
                 "--clip_grad", "--blr", "--epochs", "--warmup_epochs", "--model_ema", "--class_weighted_loss",
                 "--multilabel", "--cls_token", "--global_pool", "--dist_eval"):
        assert flag in proc.stdout, flag
    from common.transfer.cli import parse_transfer_config
    from finetune.config import FinetuneConfig

    cfg = parse_transfer_config(FinetuneConfig, "finetune", "", [])
    assert (cfg.batch_size, cfg.epochs, cfg.blr, cfg.layer_decay, cfg.weight_decay, cfg.drop_path,
            cfg.warmup_epochs, cfg.smoothing, cfg.reprob, cfg.aa, cfg.min_lr, cfg.global_pool) == \
        (64, 50, 1e-3, 0.75, 0.05, 0.1, 5, 0.1, 0.25, "rand-m9-mstd0.5-inc1", 1e-6, None)
    # not given: average pooling, MAE's fine-tuning default
    assert resolve_spec("test_vit", None, None, 1, 2, cfg.global_pool, None, "avg").kwargs["global_pool"] == "avg"


def test_resume_with_ema_continues_where_it_stopped(encoder_ckpt: Path, tmp_path: Path) -> None:
    base = ["--data_path", str(BREAST_NPZ), "--finetune", str(encoder_ckpt), "--batch_size", "128",
            "--model_ema", "--model_ema_decay", "0.5", "--output_dir", str(tmp_path), *FAST]
    main([*base, "--epochs", "1"])
    last = torch.load(tmp_path / "checkpoint-last.pt", weights_only=True)
    assert last["epoch"] == 0 and {"model", "ema", "optimizer"} <= set(last)
    main([*base, "--epochs", "2", "--resume", str(tmp_path / "checkpoint-last.pt")])
    from common.logging import read_jsonl

    assert [rec["epoch"] for rec in read_jsonl(tmp_path / "log.jsonl")] == [0, 1]
    assert torch.load(tmp_path / "checkpoint-last.pt", weights_only=True)["epoch"] == 1


def test_resume_from_another_models_run_is_a_short_error(encoder_ckpt: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    main(["--data_path", str(BREAST_NPZ), "--finetune", str(encoder_ckpt), "--batch_size", "128", "--epochs", "1",
          "--output_dir", str(tmp_path / "vit"), *FAST])
    argv = ["--data_path", str(BREAST_NPZ), "--model", "test_medmamba", "--input_size", "32", "--batch_size", "128",
            "--epochs", "2", "--resume", str(tmp_path / "vit" / "checkpoint-last.pt"), "--output_dir",
            str(tmp_path / "mm"), *FAST]
    cli_fails(capsys, main, argv, r"checkpoint-last.pt was written by another run \(classifier:test_vit\); this run "
                                  r"is classifier:test_medmamba")


def test_eval_of_a_checkpoint_for_another_class_count_is_an_error(encoder_ckpt: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = kermany_multilabel_csv(tmp_path / "findings.csv", {"train": 6, "val": 3, "test": 3})
    main(["--data_path", str(csv_path), "--finetune", str(encoder_ckpt), "--multilabel", "--batch_size", "6",
          "--epochs", "1", "--output_dir", str(tmp_path / "ml"), *FAST])
    argv = ["--data_path", str(BREAST_NPZ), "--finetune", str(encoder_ckpt), "--eval", "--resume",
            str(tmp_path / "ml" / "checkpoint-best.safetensors"), "--output_dir", str(tmp_path / "e"), *FAST]
    cli_fails(capsys, main, argv, r"ml/checkpoint-best.safetensors: does not fit")


def test_pretraining_checkpoint_directory_is_understood(tmp_path: Path) -> None:
    """``RUN/checkpoints/step_N/`` (accelerate's model.safetensors of the MAE wrapper + train_state.json)."""
    import json

    from safetensors.torch import save_file

    import models

    torch.manual_seed(5)
    mae = models.create_model("mae_test_vit", in_chans=1)
    step = tmp_path / "run" / "checkpoints" / "step_00000003"
    step.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in mae.state_dict().items()}, str(step / "model.safetensors"))
    (step / "train_state.json").write_text(json.dumps({"model": "mae_test_vit", "step": 3}))
    (tmp_path / "run" / "encoder.json").write_text(json.dumps({"normalization": {"mean": [0.4], "std": [0.2]}}))
    spec = resolve_spec(None, str(step), None, None, 2, True, None)
    assert (spec.model, spec.in_chans, spec.input_size, spec.mean, spec.std) == ("test_vit", 1, 32, [0.4], [0.2])
    encoder = build_model(spec)
    own = mae.encoder.state_dict()
    for key, value in encoder.state_dict().items():
        if not key.startswith(("head.", "fc_norm.")):
            torch.testing.assert_close(value, own[key], msg=key)


@pytest.mark.parametrize("save_every_s, writes", [("0", [0, 1, 2]), ("3600", [2])])
def test_the_last_checkpoint_is_written_by_time_and_after_the_final_epoch(
        encoder_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, save_every_s: str,
        writes: list[int]) -> None:
    """Short epochs do not each pay for a full model + optimizer copy; the final state is always on disk."""
    import common.transfer.loop as loop

    written: list[int] = []
    real = loop.save_last

    def counting(path, parts, accelerator, epoch, state):
        written.append(epoch)
        real(path, parts, accelerator, epoch, state)

    monkeypatch.setattr(loop, "save_last", counting)
    main(["--data_path", str(BREAST_NPZ), "--finetune", str(encoder_ckpt), "--batch_size", "128", "--epochs", "3",
          "--save_every_s", save_every_s, "--output_dir", str(tmp_path), *FAST])
    assert written == writes
    assert torch.load(tmp_path / "checkpoint-last.pt", weights_only=True)["epoch"] == 2


def test_the_fused_optimizer_updates_like_the_default_one() -> None:
    """finetune uses fused AdamW on CUDA; same groups, same update as the default implementation."""
    import models
    from finetune.config import FinetuneConfig
    from finetune.train import build_optimizer

    cfg = FinetuneConfig(layer_decay=0.75, weight_decay=0.05)
    models_, steps = [], []
    for fused in (False, True):
        torch.manual_seed(0)
        model = models.create_model("test_vit", img_size=32, in_chans=1, num_classes=2)
        opt = build_optimizer(model, cfg, 1e-3, fused=fused)
        assert opt.defaults.get("fused") is (True if fused else None)
        torch.manual_seed(1)
        model(torch.randn(4, 1, 32, 32)).sum().backward()
        opt.step()
        models_.append(model)
        steps.append([g["lr_scale"] if "lr_scale" in g else g["lr"] for g in opt.param_groups])
    assert steps[0] == steps[1]
    for a, b in zip(models_[0].parameters(), models_[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
