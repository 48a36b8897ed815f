"""SS2D cross scan/merge and batching, Vim's backward direction, float32 SSM parameters, Triton vs reference."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

import models
import models.ss2d as ss2d_module
from kernels import selective_scan_ref
from models.ss2d import SS2D, cross_merge, cross_scan
from models.vim import BiMamba


def test_cross_scan_orders_and_merge_inverts_them() -> None:
    x = torch.arange(6.0).reshape(1, 1, 2, 3)  # [[0,1,2],[3,4,5]]
    xs = cross_scan(x)
    assert xs.shape == (1, 4, 1, 6)
    assert xs[0, :, 0].tolist() == [[0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5], [5, 4, 3, 2, 1, 0], [5, 2, 4, 1, 3, 0]]
    y = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(cross_merge(cross_scan(y), 4, 5), 4 * y.flatten(2))
    with pytest.raises(ValueError, match="cross_merge"):
        cross_merge(cross_scan(y), 5, 4 + 1)


def test_ss2d_runs_the_four_directions_in_one_scan_call_equal_to_separate_scans(monkeypatch) -> None:
    torch.manual_seed(0)
    layer = SS2D(d_model=8, d_state=4).eval()
    x = torch.randn(2, layer.d_inner, 3, 5)
    calls = []
    real_scan = ss2d_module.selective_scan_fn

    def counting_scan(*args, **kwargs):
        calls.append(args[0].shape)
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(ss2d_module, "selective_scan_fn", counting_scan)
    merged = layer.forward_core(x)
    assert calls == [torch.Size([2, 4 * layer.d_inner, 15])]

    # The same thing direction by direction with the explicit reference scan.
    d, n, r = layer.d_inner, layer.d_state, layer.dt_rank
    xs = cross_scan(x)
    outs = []
    for k in range(4):
        proj = torch.einsum("bdl,cd->bcl", xs[:, k], layer.x_proj_weight[k])
        dt, b_ssm, c_ssm = proj.split([r, n, n], dim=1)
        dt = torch.einsum("brl,dr->bdl", dt, layer.dt_projs_weight[k])
        outs.append(selective_scan_ref(xs[:, k], dt, -torch.exp(layer.A_logs[k * d:(k + 1) * d]), b_ssm, c_ssm,
                                       layer.Ds[k * d:(k + 1) * d], delta_bias=layer.dt_projs_bias[k],
                                       delta_softplus=True))
    expected = cross_merge(torch.stack(outs, dim=1), 3, 5)
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)
    assert layer(torch.randn(2, 3, 5, 8)).shape == (2, 3, 5, 8)


def test_vim_backward_direction_equals_scanning_the_flipped_sequence() -> None:
    torch.manual_seed(0)
    mixer = BiMamba(d_model=8, d_state=4).eval()
    x, z = torch.randn(2, mixer.d_inner, 7), torch.randn(2, mixer.d_inner, 7)
    with torch.no_grad():
        ours = mixer._direction(x, z, reverse=True)
        # Vim v2's formulation: flip, causal conv + forward scan with the *_b parameters, flip back.
        xf = F.silu(F.conv1d(F.pad(x.flip(-1), (3, 0)), mixer.conv1d_b.weight, mixer.conv1d_b.bias,
                             groups=mixer.d_inner))
        dbl = F.linear(xf.transpose(1, 2), mixer.x_proj_b.weight)
        dt, b_ssm, c_ssm = dbl.split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
        dt = F.linear(dt, mixer.dt_proj_b.weight).transpose(1, 2)
        flipped = selective_scan_ref(xf, dt, -torch.exp(mixer.A_b_log), b_ssm.transpose(1, 2),
                                     c_ssm.transpose(1, 2), mixer.D_b, z=z.flip(-1),
                                     delta_bias=mixer.dt_proj_b.bias, delta_softplus=True)
    torch.testing.assert_close(ours, flipped.flip(-1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["test_vim", "test_medmamba"])
def test_ssm_parameters_stay_float32_when_the_model_is_cast(name: str) -> None:
    model = models.create_model(name).bfloat16()
    kept = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    expected = {n for n, p in model.named_parameters() if getattr(p, "_keep_fp32", False)}
    assert kept == expected and kept
    assert any(n.endswith(("A_log", "A_logs")) for n in kept) and any(n.endswith(("D", "Ds")) for n in kept)
    assert any("dt_proj" in n and "bias" in n for n in kept)
    out = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert torch.isfinite(out.float()).all()
    assert model.float().forward_features(torch.randn(1, 3, 32, 32)).dtype == torch.float32


def test_vim_scan_inputs_in_autocast_dtype_params_float32(monkeypatch) -> None:
    import models.vim as vim_module

    model = models.create_model("test_vim", num_classes=2)
    dtypes = []
    real_scan = vim_module.selective_scan_fn

    def recording_scan(u, delta, A, B, C, D=None, **kwargs):
        assert u.dtype == delta.dtype == B.dtype == C.dtype == kwargs["z"].dtype
        dtypes.append({u.dtype, delta.dtype, A.dtype, B.dtype, C.dtype, D.dtype, kwargs["delta_bias"].dtype})
        return real_scan(u, delta, A, B, C, D, **kwargs)

    monkeypatch.setattr(vim_module, "selective_scan_fn", recording_scan)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    out.float().sum().backward()
    assert dtypes and all(d == {torch.bfloat16, torch.float32} for d in dtypes)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_vim_same_output_with_reference_and_triton_scan() -> None:
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and the Triton interpreter was not enabled before import (tests/conftest.py)")
    importlib.import_module("kernels.selective_scan_triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = models.create_model("test_vim", img_size=16, embed_dim=16, depth=1, num_classes=2).to(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    model.set_scan_backend("reference")
    ref = model(x)
    ref.square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_scan_backend("triton")
    out = model(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-3, atol=1e-4, msg=n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["mae_test_vit", "mae_test_vim"])
def test_mae_bf16_autocast_on_gpu(name: str) -> None:
    torch.manual_seed(0)
    mae = models.create_model(name, norm_pix_loss=True).cuda()
    imgs = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, pred, mask = mae(imgs, generator=torch.Generator(device="cuda").manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and pred.shape == (4, 16, 192)
    assert all(torch.isfinite(p.grad).all() for p in mae.parameters() if p.grad is not None)
    assert all(p.dtype == torch.float32 for p in mae.parameters())


def test_bimamba_on_the_triton_conv_and_scan_copies_nothing_full_size() -> None:
    """Full-size copies in one BiMamba forward+backward on the Triton conv and scan (bf16 autocast): x and z reach
    them as channel-last views of the input projection, the conv writes u channel-last, the scan reads u, delta and
    z and writes its output and gradients in that layout, so the projections around them read everything as it is.
    One copy is left: joining the x and z gradients into the projection's. (17 before the seventeenth session: the
    conv's input and saved input, z, dt and the output's gradient per direction, x_proj's and out_proj's inputs.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("no CUDA and TRITON_INTERPRET is not 1: run through pytest with tests/conftest.py")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    mixer = BiMamba(32).to(device)
    mixer.scan_backend, mixer.conv_backend = "triton", "triton"
    hidden = torch.randn(2, 20, 32, device=device, requires_grad=True)
    full = 2 * 20 * mixer.d_inner
    copying = (torch.ops.aten.clone, torch.ops.aten.copy_, torch.ops.aten.constant_pad_nd, torch.ops.aten.cat)

    class CountCopies(TorchDispatchMode):
        names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # (The interpreter's own host copies of kernel arguments are flat byte buffers: not counted.)
            if func.overloadpacket in copying and out.dtype != torch.uint8 and out.numel() >= full:
                CountCopies.names.append(str(func.overloadpacket))
            return out

    with torch.autocast(device, dtype=torch.bfloat16), CountCopies():
        mixer(hidden).float().sum().backward()
    assert CountCopies.names == ["aten.cat"]


def test_bimamba_gives_the_same_output_and_gradients_on_every_conv_backend() -> None:
    """The Triton conv's channel-last path (no copies) and torch's contiguous one compute the same block: output
    and every gradient, Triton scan on both, float32."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("no CUDA and TRITON_INTERPRET is not 1: run through pytest with tests/conftest.py")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(1)
    mixer = BiMamba(16).to(device)
    mixer.scan_backend = "triton"
    hidden = torch.randn(1, 12, 16, device=device)
    results = []
    for conv in ("torch", "triton"):
        mixer.zero_grad()
        mixer.conv_backend = conv
        x = hidden.clone().requires_grad_(True)
        out = mixer(x)
        out.square().sum().backward()
        results.append([out, x.grad] + [p.grad.clone() for p in mixer.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
