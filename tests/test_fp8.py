"""Float8 linear layers (models/fp8.py, ``--fp8``): the arithmetic against an emulation, the error against bfloat16 /
float32, which layers convert, and a pretraining run with the flag. ``torch._scaled_mm`` runs on the CPU too."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pretrain_runs import args, curate_xrays
from torch import nn

import models
from common.checkpoint import load_weights
from common.config import load_yaml
from common.logging import read_jsonl
from models.fp8 import E4M3, E5M2, Float8Linear, convert_to_float8, to_float8
from pretrain.main import main as pretrain_main

DEVICE = "cuda" if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9) else "cpu"


def _dequantised(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x8, inv = to_float8(x, dtype)
    return x8.float() * inv


def _pair(seed: int, in_features: int = 64, out_features: int = 96) -> tuple[nn.Linear, Float8Linear]:
    torch.manual_seed(seed)
    plain = nn.Linear(in_features, out_features).to(DEVICE)
    fp8 = Float8Linear(in_features, out_features).to(DEVICE)
    fp8.load_state_dict(plain.state_dict())
    return plain, fp8


def test_to_float8_scales_the_maximum_onto_the_format_range() -> None:
    x = torch.tensor([[-3.0, 0.5], [1e-3, 2.0]], device=DEVICE)
    for dtype in (E4M3, E5M2):
        x8, inv = to_float8(x, dtype)
        assert x8.dtype == dtype and inv.dtype == torch.float32
        assert x8.float().abs().max() == torch.finfo(dtype).max  # -3.0 lands on the largest finite value
        torch.testing.assert_close(x8.float() * inv, x, rtol=0.13, atol=1e-4)  # e5m2: 2 mantissa bits
    zeros, inv = to_float8(torch.zeros(3, 3, device=DEVICE), E4M3)
    assert torch.isfinite(inv) and not zeros.float().any()


def test_products_are_the_float8_products() -> None:
    """The output and both gradients equal float32 products of the float8-rounded operands (e4m3 input and weight,
    e5m2 output gradient), to float32 summation order."""
    _, fp8 = _pair(0)
    x = torch.randn(5, 7, 64, device=DEVICE, requires_grad=True)
    grad = torch.randn(5, 7, 96, device=DEVICE)
    y = fp8(x)
    gx, gw, gb = torch.autograd.grad(y, [x, fp8.weight, fp8.bias], grad)
    x_q, w_q, g_q = _dequantised(x.detach(), E4M3), _dequantised(fp8.weight.detach(), E4M3), _dequantised(grad, E5M2)
    torch.testing.assert_close(y, x_q @ w_q.t() + fp8.bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, g_q @ w_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, g_q.reshape(-1, 96).t() @ x_q.reshape(-1, 64), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gb, grad.sum((0, 1)))


@pytest.mark.parametrize("autocast", [False, True])
def test_error_against_the_plain_layer_is_float8_sized(autocast: bool) -> None:
    plain, fp8 = _pair(1)
    x = torch.randn(8, 50, 64, device=DEVICE, requires_grad=True)
    grad = torch.randn(8, 50, 96, device=DEVICE)
    results = []
    for layer in (plain, fp8):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        results.append((y, *torch.autograd.grad(y, [x, layer.weight], grad.to(y.dtype))))
    (y_ref, gx_ref, gw_ref), (y, gx, gw) = results
    assert y.dtype == (torch.bfloat16 if autocast else torch.float32) and gx.dtype == x.dtype
    assert gw.dtype == torch.float32
    for got, ref, bound in ((y, y_ref, 0.05), (gx, gx_ref, 0.08), (gw, gw_ref, 0.08)):
        error = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        assert 1e-3 < error < bound  # float8's rounding: present, and of its size


def test_convert_keeps_names_and_leaves_outer_layers() -> None:
    vit = models.create_model("mae_test_vit", img_size=32, in_chans=1)
    keys = list(vit.state_dict())
    converted = convert_to_float8(vit)
    assert list(vit.state_dict()) == keys
    assert len(converted) == 4 * (2 + 2)  # qkv, proj, fc1, fc2 in 2 encoder and 2 decoder blocks
    assert all(name.rsplit(".", 1)[-1] in ("qkv", "proj", "fc1", "fc2") for name in converted)
    assert type(vit.decoder_pred) is nn.Linear and type(vit.decoder_embed) is nn.Linear
    vim = models.create_model("mae_test_vim", img_size=32, in_chans=1)
    names = convert_to_float8(vim)
    assert {name.rsplit(".", 1)[-1] for name in names} == {"in_proj", "out_proj", "qkv", "proj", "fc1", "fc2"}
    assert not any("x_proj" in name or "dt_proj" in name for name in names)
    odd = nn.Sequential(nn.Linear(24, 32))
    assert convert_to_float8(odd, within=(nn.Sequential,)) == []  # 24 columns: not a multiple of 16


def test_pretraining_with_fp8_learns(tmp_path: Path) -> None:
    """``--fp8`` through pretrain/main.py: the loss falls as fast as without it, on a curve of its own (the float8
    products are in the run), and the exported encoder is a plain one."""
    data = curate_xrays(tmp_path / "curated")
    curves = {}
    for name, flags in (("fp8", {"fp8": None}), ("plain", {})):
        out = tmp_path / name
        assert pretrain_main(args(data, out, batch_size=8, epochs=17, max_steps=30, **flags)) == 0
        curves[name] = [r["loss"] for r in read_jsonl(out / "log.jsonl") if "loss" in r]
    losses = curves["fp8"]
    assert len(losses) == 30 and all(map(math.isfinite, losses))
    assert sum(losses[-8:]) / 8 < 0.9 * sum(losses[:8]) / 8, losses
    assert losses != curves["plain"] and abs(sum(losses[-8:]) / sum(curves["plain"][-8:]) - 1) < 0.1
    assert load_yaml(tmp_path / "fp8" / "config.yaml")["fp8"] is True
    encoder = load_weights(tmp_path / "fp8" / "encoder.safetensors")
    assert encoder.keys() == load_weights(tmp_path / "plain" / "encoder.safetensors").keys()
