"""Causal depthwise conv1d: fast path vs explicit taps, causality, gradients, errors."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from kernels.causal_conv1d import causal_conv1d_fn, causal_conv1d_ref


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_matches_explicit_taps_with_grads(width, activation, with_bias, reverse):
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(2, 5, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, width, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True) if with_bias else None
    got = causal_conv1d_fn(x, w, b, activation, backend="torch", reverse=reverse)
    want = causal_conv1d_ref(x, w, b, activation, reverse=reverse)
    torch.testing.assert_close(got, want)
    if reverse:
        # The anti-causal conv is the causal conv of the reversed sequence, reversed back.
        torch.testing.assert_close(got, causal_conv1d_ref(x.flip(-1), w, b, activation).flip(-1))
    g = torch.randn_like(got)
    inputs = [t for t in (x, w, b) if t is not None]
    for a, r in zip(torch.autograd.grad((got * g).sum(), inputs), torch.autograd.grad((want * g).sum(), inputs)):
        torch.testing.assert_close(a, r)


def test_output_is_causal_and_equals_cropped_symmetric_conv():
    x = torch.randn(1, 3, 9)
    w = torch.randn(3, 4)
    out = causal_conv1d_fn(x, w)
    full = F.conv1d(x, w.unsqueeze(1), padding=3, groups=3)[..., :9]
    torch.testing.assert_close(out, full)
    x2 = x.clone()
    x2[..., 6:] += 100.0  # changing the future must not change the past
    torch.testing.assert_close(causal_conv1d_fn(x2, w)[..., :6], out[..., :6])


def test_reverse_output_sees_only_itself_and_the_future():
    x = torch.randn(1, 3, 9)
    w = torch.randn(3, 4)
    out = causal_conv1d_fn(x, w, reverse=True)
    x2 = x.clone()
    x2[..., :3] += 100.0  # changing the past must not change positions 3 onwards
    torch.testing.assert_close(causal_conv1d_fn(x2, w, reverse=True)[..., 3:], out[..., 3:])
    assert not torch.allclose(causal_conv1d_fn(x2, w, reverse=True)[..., :3], out[..., :3])


def test_bad_inputs_raise():
    x = torch.randn(1, 3, 9)
    with pytest.raises(ValueError, match="weight must be"):
        causal_conv1d_fn(x, torch.randn(4, 4))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_fn(x, torch.randn(3, 4), activation="gelu")
    with pytest.raises(ValueError, match="needs CUDA"):
        causal_conv1d_fn(x, torch.randn(3, 4), backend="causal_conv1d")


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_triton_kernels_match_explicit_taps_with_grads(width, activation, with_bias, reverse):
    """The Triton forward and backward (interpreted on the CPU, compiled on CUDA) against the float64 taps, on a
    length that spans two position tiles and a channel count that is no multiple of the channel tile."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("no CUDA and TRITON_INTERPRET is not 1: run through pytest with tests/conftest.py")
    gen = torch.Generator().manual_seed(10 + width)
    x = torch.randn(2, 19, 70, generator=gen, dtype=torch.float64)
    w = torch.randn(19, width, generator=gen, dtype=torch.float64)
    b = torch.randn(19, generator=gen, dtype=torch.float64) if with_bias else None
    g = torch.randn(2, 19, 70, generator=gen, dtype=torch.float64)
    for dtype, tol in ((torch.float32, {"rtol": 1e-5, "atol": 1e-5}), (torch.bfloat16, {"rtol": 2e-2, "atol": 5e-2})):
        leaves = [t.to(device, dtype).requires_grad_(True) if t is not None else None for t in (x, w, b)]
        got = causal_conv1d_fn(*leaves, activation, backend="triton", reverse=reverse)
        assert got.dtype == dtype
        ref_leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
        want = causal_conv1d_ref(*ref_leaves, activation, reverse=reverse)
        torch.testing.assert_close(got.double().cpu(), want, **tol)
        inputs = [t for t in leaves if t is not None]
        grads = torch.autograd.grad((got * g.to(device, dtype)).sum(), inputs)
        ref_grads = torch.autograd.grad((want * g).sum(), [t for t in ref_leaves if t is not None])
        scale = {"rtol": tol["rtol"], "atol": tol["atol"] * 10}  # dw, db sum 140 products
        for a, r in zip(grads, ref_grads):
            torch.testing.assert_close(a.double().cpu(), r, **scale)
