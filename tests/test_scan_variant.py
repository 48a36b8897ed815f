"""The v2 scan kernels' building blocks (kernels/triton_scan_fast.py) against torch, under the Triton
interpreter on CPU (compiled on CUDA): the channel reduce-scatter at every (N_PAD, BLOCK_D) a kernel can
use, and the approximate-math formulas' portable forms."""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from kernels import triton_scan_fast  # noqa: E402  (after the skip: needs triton)


@triton.jit
def _scatter_kernel(X, OUT, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, LEVELS: tl.constexpr):
    offs_n = tl.arange(0, N_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    # A product of broadcast vectors, as the kernels' tiles are (Triton gives it the kernels' layout).
    x = tl.load(X + offs_n)[:, None] * tl.load(X + N_PAD + offs_d)[None, :]
    part = triton_scan_fast.channel_sum_scatter(x, offs_d, N_PAD, BLOCK_D, LEVELS)
    rows, owner = triton_scan_fast.scatter_rows(offs_d, N_PAD, BLOCK_D, LEVELS)
    # Every lane writes its copy at (its state, its channel), so that the copies are checked too.
    tl.store(OUT + rows * BLOCK_D + offs_d[None, :], part)
    tl.store(OUT + N_PAD * BLOCK_D + rows * BLOCK_D + offs_d[None, :], owner.to(tl.float32))


@triton.jit
def _math_kernel(X, OUT, FAST: tl.constexpr):
    x = tl.load(X + tl.arange(0, 64))
    tl.store(OUT + tl.arange(0, 64), triton_scan_fast.softplus2(x, FAST))
    tl.store(OUT + 64 + tl.arange(0, 64), triton_scan_fast.sigmoid2(x, FAST))


@pytest.fixture(scope="module", autouse=True)
def _interpreter_or_cuda():
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("no CUDA and TRITON_INTERPRET is not 1: run through pytest with tests/conftest.py")


@pytest.mark.parametrize("n_pad,block_d", [(16, 16), (16, 8), (16, 32), (16, 4), (4, 8), (1, 16), (2, 32)])
def test_channel_sum_scatter_matches_sum(n_pad, block_d):
    levels = triton_scan_fast.scatter_levels(n_pad, block_d)
    gen = torch.Generator(device=DEVICE).manual_seed(n_pad * block_d)
    x = torch.randn(n_pad + block_d, generator=gen, device=DEVICE)
    out = torch.full((2, n_pad, block_d), float("nan"), device=DEVICE)
    _scatter_kernel[(1,)](x, out, N_PAD=n_pad, BLOCK_D=block_d, LEVELS=levels, num_warps=1)
    want = (x[:n_pad, None] * x[None, n_pad:]).sum(1)
    # Exactly one lane owns (writes to memory) each state's sum, and every copy of it holds the full sum.
    assert (out[1] == 1).sum(1).tolist() == [1] * n_pad
    written = ~torch.isnan(out[0])
    for n in range(n_pad):
        got = out[0, n][written[n]]
        assert got.numel() >= 1
        torch.testing.assert_close(got, want[n].expand_as(got), rtol=1e-5, atol=1e-5)


def test_scatter_levels():
    scatter_levels = triton_scan_fast.scatter_levels
    # Halves are split while each thread holds several rows and channels are left to pair.
    assert scatter_levels(16, 16) == 3  # 2 lanes along N, 8 rows per thread
    assert scatter_levels(16, 8) == 2
    assert scatter_levels(16, 32) == 4
    assert scatter_levels(16, 4) == 1
    assert scatter_levels(4, 8) == 0
    assert scatter_levels(1, 16) == 0


def test_approximate_math_matches_torch():
    x = torch.linspace(-30.0, 30.0, 64, device=DEVICE)
    out = torch.empty(128, device=DEVICE)
    _math_kernel[(1,)](x, out, FAST=HAS_CUDA, num_warps=1)
    torch.testing.assert_close(out[:64], torch.nn.functional.softplus(x), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(out[64:], torch.sigmoid(x), rtol=2e-6, atol=1e-6)
