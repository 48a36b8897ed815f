"""Encoder export / import: our format, facebookresearch/mae layouts, timm ViT state dicts, refusals."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import models
from common.checkpoint import CheckpointError
from models.checkpoint import (
    checkpoint_filter_fn,
    export_encoder,
    load_exported_encoder,
    load_pretrained,
    read_export_config,
)
from models.layers import sincos_pos_embed_2d

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere (trainable weights only), so a wrong mapping cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 else 0.0))


def _mae_reference_layout(mae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our MAE weights under facebookresearch/mae's pretraining keys (no ``encoder.`` prefix)."""
    return {k.removeprefix("encoder."): v.clone() for k, v in mae.state_dict().items()}


def test_export_and_reload_reproduces_the_encoder(tmp_path: Path) -> None:
    mae = models.create_model("mae_test_vit", in_chans=1, img_size=(32, 48))
    _randomize(mae)
    norm = {"mean": [0.5], "std": [0.25]}
    weights, config_path = export_encoder(mae, tmp_path, normalization=norm, source={"run": "unit"})
    assert weights.name == "encoder.safetensors" and config_path.name == "encoder.json"
    config = json.loads(config_path.read_text())
    assert config["model"] == "test_vit" and config["in_chans"] == 1 and config["img_size"] == [32, 48]
    assert config["patch_size"] == 8 and config["normalization"] == norm and "fc_norm" not in config["kwargs"]
    assert read_export_config(tmp_path)["model"] == "test_vit"

    x = torch.randn(2, 1, 32, 48)
    expected = mae.encoder.eval().forward_features(x)
    again = models.create_model("test_vit", pretrained=tmp_path, in_chans=1, img_size=(32, 48)).eval()
    torch.testing.assert_close(again.forward_features(x), expected)
    rebuilt = load_exported_encoder(weights, num_classes=3).eval()
    torch.testing.assert_close(rebuilt.forward_features(x), expected)
    assert rebuilt(x).shape == (2, 3)


def test_export_loads_strictly_into_timm_and_gives_the_same_features(tmp_path: Path) -> None:
    """Users can take encoder.safetensors into their own timm code: same keys and shapes, same features."""
    from safetensors.torch import load_file

    mae = models.create_model("mae_test_vit", in_chans=1, img_size=(32, 48))
    _randomize(mae, seed=4)
    weights, _ = export_encoder(mae, tmp_path)
    tiny = {**TINY, "img_size": (32, 48)}
    reference = timm.models.vision_transformer.VisionTransformer(num_classes=0, in_chans=1, **tiny).eval()
    reference.load_state_dict(load_file(str(weights)), strict=True)
    x = torch.randn(2, 1, 32, 48)
    torch.testing.assert_close(reference.forward_features(x), mae.encoder.eval().forward_features(x),
                               rtol=1e-5, atol=1e-5)


def test_reload_at_another_size_recomputes_the_sincos_table(tmp_path: Path) -> None:
    mae = models.create_model("mae_test_vim", img_size=(32, 48))
    _randomize(mae)
    export_encoder(mae, tmp_path)
    bigger = load_exported_encoder(tmp_path, img_size=64)
    torch.testing.assert_close(bigger.pos_embed[0, 1:], sincos_pos_embed_2d(32, (8, 8)))
    torch.testing.assert_close(bigger.layers[1].mixer.A_b_log, mae.encoder.layers[1].mixer.A_b_log)


def test_load_facebookresearch_mae_pretraining_checkpoint(tmp_path: Path) -> None:
    source = models.create_model("mae_test_vit", **{k: v for k, v in TINY.items() if k != "img_size"})
    _randomize(source)
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": _mae_reference_layout(source)}, path)

    # Into a classifier with average pooling: decoder and token-wise norm dropped, fc_norm and head fresh.
    clf = models.create_model("test_vit", num_classes=5, global_pool="avg")
    report = load_pretrained(clf, path)
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert "decoder_embed.weight" in report.dropped and "norm.weight" in report.dropped
    torch.testing.assert_close(clf.blocks[1].mlp.fc2.weight, source.encoder.blocks[1].mlp.fc2.weight)
    torch.testing.assert_close(clf.cls_token, source.encoder.cls_token)

    # Into an MAE wrapper: both halves load (e.g. to continue pretraining).
    mae = models.create_model("mae_test_vit")
    report = load_pretrained(mae, path)
    torch.testing.assert_close(mae.decoder_pred.weight, source.decoder_pred.weight)
    torch.testing.assert_close(mae.mask_token, source.mask_token)
    x = torch.randn(1, 3, 32, 32)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    torch.testing.assert_close(mae.eval()(x, generator=g())[0], source.eval()(x, generator=g())[0])


def test_load_finetuned_layout_drops_a_head_of_another_class_count(tmp_path: Path) -> None:
    finetuned = models.create_model("test_vit", num_classes=1000, global_pool="avg")
    _randomize(finetuned)
    path = tmp_path / "mae_finetuned.pth"
    torch.save({"model": finetuned.state_dict()}, path)
    same = models.create_model("test_vit", num_classes=1000, global_pool="avg")
    assert load_pretrained(same, path).missing == []
    torch.testing.assert_close(same.head.weight, finetuned.head.weight)
    other = models.create_model("test_vit", num_classes=4, global_pool="avg")
    report = load_pretrained(other, path)
    assert report.missing == ["head.bias", "head.weight"] and "head.weight" in report.dropped
    torch.testing.assert_close(other.fc_norm.weight, finetuned.fc_norm.weight)


def test_timm_vit_state_dict_gives_the_same_features(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = timm.models.vision_transformer.VisionTransformer(num_classes=0, **TINY).eval()
    _randomize(reference, seed=1)
    path = tmp_path / "timm_vit.safetensors"
    save_file(reference.state_dict(), str(path))
    ours = models.create_model("test_vit", pretrained=path).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours.forward_features(x), reference.forward_features(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True),
                               reference.forward_head(reference.forward_features(x), pre_logits=True),
                               rtol=1e-5, atol=1e-5)

    # A learned position embedding at another size is resized bicubically.
    bigger = models.create_model("test_vit", img_size=48)
    report = load_pretrained(bigger, path)
    assert any("bicubic" in note for note in report.adapted)
    torch.testing.assert_close(bigger.pos_embed[:, 0], reference.pos_embed[:, 0])


def test_rgb_checkpoint_into_a_gray_model_sums_the_patch_projection(tmp_path: Path) -> None:
    rgb = models.create_model("test_vit").eval()
    _randomize(rgb)
    path = tmp_path / "rgb.pth"
    torch.save({"model": rgb.state_dict()}, path)
    gray = models.create_model("test_vit", in_chans=1, pretrained=path).eval()
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(gray.forward_features(x), rgb.forward_features(x.expand(-1, 3, -1, -1)),
                               rtol=1e-5, atol=1e-5)
    stacked = models.create_model("test_vit", in_chans=5)
    assert any("input channels 3 -> 5" in n for n in load_pretrained(stacked, path).adapted)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    source = models.create_model("mae_test_vit")
    path = tmp_path / "checkpoint-399.pth"
    # MAE's training checkpoints store the argparse Namespace next to the weights.
    torch.save({"model": _mae_reference_layout(source), "args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(CheckpointError, match="pickled"):
        load_pretrained(models.create_model("test_vit"), path)


def test_strict_loading_names_unexpected_and_mismatched_keys(tmp_path: Path) -> None:
    sd = models.create_model("test_vit").state_dict()
    sd["blocks.0.ls1.gamma"] = torch.ones(32)
    path = tmp_path / "extra.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"unexpected \['blocks.0.ls1.gamma'\]"):
        load_pretrained(models.create_model("test_vit"), path)
    report = load_pretrained(models.create_model("test_vit"), path, strict=False)
    assert report.unexpected == ["blocks.0.ls1.gamma"]

    del sd["blocks.0.ls1.gamma"]
    del sd["blocks.1.attn.qkv.weight"]
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"missing \['blocks.1.attn.qkv.weight'\]"):
        load_pretrained(models.create_model("test_vit"), path)

    wide = models.create_model("test_vit", embed_dim=64).state_dict()
    torch.save(wide, path)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_pretrained(models.create_model("test_vit"), path)
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(models.create_model("test_vit"), tmp_path / "nope.pth")


def test_non_square_checkpoint_needs_its_grid(tmp_path: Path) -> None:
    source = models.create_model("test_vit", img_size=(32, 48))
    _randomize(source)
    path = tmp_path / "rect.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(CheckpointError, match="source_grid"):
        load_pretrained(models.create_model("test_vit"), path)
    target = models.create_model("test_vit", img_size=(32, 48))
    load_pretrained(target, path, source_grid=(4, 6))
    torch.testing.assert_close(target.pos_embed, source.pos_embed)


def test_filter_fn_and_export_refusals(tmp_path: Path) -> None:
    mae = models.create_model("mae_test_vit")
    ddp_layout = {f"module.{k}": v for k, v in mae.state_dict().items()}
    filtered = checkpoint_filter_fn(ddp_layout, models.create_model("test_vit"))
    assert set(filtered) == set(mae.encoder.state_dict())
    with pytest.raises(ValueError, match="normalization"):
        export_encoder(mae, tmp_path, normalization={"mean": [0.5], "std": [0.5]})
    from models.vit import VisionTransformer

    with pytest.raises(ValueError, match="create_model"):
        export_encoder(VisionTransformer(**TINY), tmp_path)
