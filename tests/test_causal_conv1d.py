"""Causal depthwise conv1d: fast path vs explicit taps, causality, gradients, errors."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from kernels.causal_conv1d import causal_conv1d_fn, causal_conv1d_ref, resolve_conv_backend


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
    with pytest.raises(ValueError, match="unknown backend"):
        causal_conv1d_fn(x, torch.randn(3, 4), backend="cudnn")


def test_auto_backend_is_triton_on_cuda_and_torch_elsewhere():
    """The Triton conv is the CUDA default (timed: the Vim-S step +25 %); a named backend is kept."""
    assert resolve_conv_backend("auto", is_cuda=True) == "triton"
    assert resolve_conv_backend("auto", is_cuda=False) == "torch"
    assert resolve_conv_backend("causal_conv1d", is_cuda=True) == "causal_conv1d"
    assert resolve_conv_backend("torch", is_cuda=True) == "torch"


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_triton_kernels_match_explicit_taps_with_grads(width, activation, with_bias, reverse):
    """The Triton forward and backward (interpreted on the CPU, compiled on CUDA) against the float64 taps, on a
    length that spans two position tiles and a channel count that is no multiple of the channel tile (contiguous x:
    the position tiles of kernels/triton_causal_conv1d_tiles.py)."""
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


@pytest.mark.parametrize("reverse", [False, True])
def test_triton_kernels_read_a_channel_last_view_in_place(reverse):
    """x as a Vim block hands it over: a (batch, dim, L) view into the channel-last input projection's output (half
    of its channels), and the gradient channel-last. The Triton conv reads both through their strides and writes the
    output and dx channel-last, no copy, with the values and gradients of the contiguous input (which runs the
    position tiles, not the chunk walk: equal up to rounding)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("no CUDA and TRITON_INTERPRET is not 1: run through pytest with tests/conftest.py")
    gen = torch.Generator().manual_seed(3)
    xz = torch.randn(2, 70, 2 * 19, generator=gen).to(device).requires_grad_(True)
    w = torch.randn(19, 4, generator=gen).to(device)
    b = torch.randn(19, generator=gen).to(device)
    g = torch.randn(2, 19, 70, generator=gen).to(device)
    x = xz.transpose(1, 2)[:, :19]
    assert not x.is_contiguous()

    class CountCopies(TorchDispatchMode):
        copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # (The interpreter's own host copies of every kernel argument are flat byte buffers: not counted.)
            if func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten.copy_) and args[0].dim() == 3:
                CountCopies.copies += 1
            return func(*args, **(kwargs or {}))

    g = g.transpose(1, 2).contiguous().transpose(1, 2)  # the gradient channel-last, as the x projection returns it
    with CountCopies():
        got = causal_conv1d_fn(x, w, b, "silu", backend="triton", reverse=reverse)
        (dx,) = torch.autograd.grad(got, [x], g, retain_graph=True)
    assert CountCopies.copies == 0
    assert got.transpose(1, 2).is_contiguous() and dx.transpose(1, 2).is_contiguous()  # written channel-last
    (dxz,) = torch.autograd.grad((got * g).sum(), [xz])
    plain = x.detach().contiguous().requires_grad_(True)
    want = causal_conv1d_fn(plain, w, b, "silu", backend="triton", reverse=reverse)
    (dplain,) = torch.autograd.grad((want * g).sum(), [plain])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dxz.transpose(1, 2)[:, :19], dplain, rtol=1e-5, atol=1e-5)
    assert dxz.transpose(1, 2)[:, 19:].abs().max() == 0


def test_contiguous_x_runs_the_position_tiles_unless_a_walk_is_asked_for():
    from kernels.triton_causal_conv1d import _takes_tiles, conv_launch

    x = torch.zeros(2, 19, 70)
    assert _takes_tiles(x, None)
    assert not _takes_tiles(x.transpose(1, 2).contiguous().transpose(1, 2), None)
    assert not _takes_tiles(x, conv_launch(2, 19, 70, channel_last=False))


def test_conv_launch_tiles_the_vim_shapes():
    """A Vim-S encoder's conv runs one span per sequence in 4 even chunks; a long sequence at a small batch is split
    into spans until about MIN_PROGRAMS programs run, and the spans' chunks cover the sequence exactly once."""
    from kernels.triton_causal_conv1d import MIN_PROGRAMS, conv_launch

    vim_s = conv_launch(512, 768, 50, channel_last=True)
    assert (vim_s.block_d, vim_s.num_warps, vim_s.chunk, vim_s.spans, vim_s.span_chunks) == (128, 2, 13, 1, 4)
    assert conv_launch(512, 768, 50, channel_last=False).block_d == 64
    for batch, dim, length in ((16, 1536, 4096), (1, 768, 197), (2, 19, 70), (3, 5, 1)):
        launch = conv_launch(batch, dim, length, channel_last=True)
        programs = batch * -(-dim // launch.block_d) * launch.spans
        assert launch.chunk <= 16 and launch.span * (launch.spans - 1) < length <= launch.span * launch.spans
        assert programs >= MIN_PROGRAMS or launch.span_chunks == 1  # as many spans as chunks, or enough programs


@pytest.mark.parametrize("shape", [(2, 5, 0), (2, 0, 7), (0, 5, 7)])
def test_triton_kernels_take_empty_tensors(shape):
    """No positions, channels or sequences: an empty output and zero weight and bias gradients, as torch gives."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("no CUDA and TRITON_INTERPRET is not 1: run through pytest with tests/conftest.py")
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.randn(shape[1], 4, device=device, requires_grad=True)
    b = torch.randn(shape[1], device=device, requires_grad=True)
    out = causal_conv1d_fn(x, w, b, "silu", backend="triton")
    assert out.shape == shape
    dx, dw, db = torch.autograd.grad(out, [x, w, b], torch.ones_like(out))
    assert dx.shape == shape and not dw.any() and not db.any()


@pytest.mark.parametrize("channel_last", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_triton_kernels_over_spans_and_chunks(channel_last, reverse):
    """Several spans per sequence, several chunks per span (the last one cut by the sequence's end) and several
    channel blocks (the last one partial), through an explicit launch: values and every gradient against the
    float64 taps, with and without SiLU and bias, for width 4 and an odd width."""
    width = 4 if channel_last else 3
    from kernels.triton_causal_conv1d import causal_conv1d_triton_bwd, causal_conv1d_triton_fwd, conv_launch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("no CUDA and TRITON_INTERPRET is not 1: run through pytest with tests/conftest.py")
    batch, dim, length = 1, 19, 70  # one sequence: the programs' partial weight / bias sums still meet 9 ways
    launch = conv_launch(batch, dim, length, channel_last, block_d=8, num_warps=1, max_chunk=6, min_programs=9)
    assert (launch.chunk, launch.spans, launch.span_chunks) == (6, 3, 4)  # 72 positions for 70, 3 channel blocks
    gen = torch.Generator().manual_seed(20 + width)
    x = torch.randn(batch, dim, length, generator=gen, dtype=torch.float64)
    if channel_last:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    w = torch.randn(dim, width, generator=gen, dtype=torch.float64)
    g = torch.randn(batch, dim, length, generator=gen, dtype=torch.float64)
    for silu, b in ((True, torch.randn(dim, generator=gen, dtype=torch.float64)), (False, None)):
        ref_leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
        want = causal_conv1d_ref(*ref_leaves, "silu" if silu else None, reverse=reverse)
        want_grads = torch.autograd.grad((want * g).sum(), [t for t in ref_leaves if t is not None])
        on = [t.to(device, torch.float32) if t is not None else None for t in (x, w, b, g)]
        got = causal_conv1d_triton_fwd(on[0], on[1], on[2], silu, reverse, launch=launch)
        dx, dw, db = causal_conv1d_triton_bwd(on[0], on[1], on[2], on[3], silu, reverse, launch=launch)
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)
        got_grads = [dx, dw] + ([db] if b is not None else [])
        assert db is None or b is not None
        for a, r in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(a.double().cpu(), r, rtol=1e-5, atol=1e-4)


CONV_BUILD_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from kernels.triton_causal_conv1d import (SUM_BLOCK_C, SUM_BLOCK_R, _conv_bwd_kernel, _conv_fwd_kernel,
                                          _sum_partials_kernel, conv_launch)
from kernels.triton_causal_conv1d_tiles import (TILE_D, TILE_L, TILE_SPAN, _conv_tiles_bwd_kernel,
                                                _conv_tiles_fwd_kernel, tile_spans)

# A Vim-S block's x (channel-last view: channel stride 1) and a contiguous x, each with its launch, as the launcher
# hands them over: an integer argument equal to 1 becomes a constant, pointers and integers divisible by 16 carry
# that hint (with it the channel-last loads become vectors), both directions; then the partial sums' reduction.
layouts = (((76800, 1, 1536), (38400, 1, 768), True), ((38400, 50, 1), (38400, 50, 1), False))


def build(kernel, ints, consts, num_warps, pointer_types):
    signature, hints = {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, "*fp32")
            hints[(i,)] = [["tt.divisibility", 16]]
        elif ints[name] == 1:
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                hints[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(kernel, signature, consts, hints)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    print(kernel.__name__, sorted(ints.items())[:3], consts.get("REVERSE"), "built")


bf16 = {name: "*bf16" for name in ("x_ptr", "out_ptr", "dout_ptr", "dx_ptr")}
for strides, dense, channel_last in layouts:
    launch = conv_launch(512, 768, 50, channel_last)
    ints = dict(dim=768, length=50, n_spans=launch.spans)
    for prefix, values in (("x", strides), ("out", dense), ("dout", dense), ("dx", dense)):
        ints.update({f"{prefix}_stride_{axis}": value for axis, value in zip("bdl", values)})
    for kernel in (_conv_fwd_kernel, _conv_bwd_kernel):
        for reverse in (False, True):
            consts = dict(WIDTH=4, HAS_BIAS=True, SILU=True, REVERSE=reverse, BLOCK_D=launch.block_d,
                          CHUNK=launch.chunk, SPAN=launch.span)
            build(kernel, dict(ints), consts, launch.num_warps, bf16)
    if not channel_last:  # what a contiguous x runs by default: the position tiles
        ints["n_spans"] = tile_spans(50)
        for kernel in (_conv_tiles_fwd_kernel, _conv_tiles_bwd_kernel):
            for reverse in (False, True):
                consts = dict(WIDTH=4, HAS_BIAS=True, SILU=True, REVERSE=reverse, BLOCK_D=TILE_D, BLOCK_L=TILE_L,
                              SPAN=TILE_SPAN)
                build(kernel, dict(ints), consts, 4, bf16)
build(_sum_partials_kernel, dict(rows=512, dim=768), dict(WIDTH=4, HAS_BIAS=True, BLOCK_R=SUM_BLOCK_R,
                                                          BLOCK_C=SUM_BLOCK_C), 4, {})
"""


def test_triton_kernels_compile_for_sm90(tmp_path):
    """Triton's real compiler (not the interpreter) builds both conv kernels for sm_90, for a channel-last and a
    contiguous x, and the position tiles for the contiguous one: the interpreter accepts code the compiler rejects
    (tests/test_scan_sm90_build.py)."""
    pytest.importorskip("triton")
    from kernels.testing import run_compiled

    stdout = run_compiled(CONV_BUILD_SCRIPT, tmp_path / "cache")
    assert stdout.count("built") == 13, stdout


@pytest.mark.parametrize("reverse", [False, True])
def test_triton_conv_compiles_without_graph_breaks_and_matches_eager(reverse):
    """Under torch.compile the Triton conv runs as custom ops (fake implementations give the channel-last output
    layout): fullgraph tracing succeeds, forward and backward included, with eager's values and gradients."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("no CUDA and TRITON_INTERPRET is not 1: run through pytest with tests/conftest.py")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(5)
    xz = torch.randn(2, 33, 2 * 10, generator=gen).to(device).requires_grad_(True)
    w = torch.randn(10, 4, generator=gen).to(device).requires_grad_(True)
    b = torch.randn(10, generator=gen).to(device).requires_grad_(True)

    def fn(xz, w, b):
        x = xz.transpose(1, 2)[:, :10]
        out = causal_conv1d_fn(x, w, b, "silu", backend="triton", reverse=reverse)
        return (out.float() * 3).square().sum()

    torch._dynamo.reset()
    try:
        eager = fn(xz, w, b)
        eager_grads = torch.autograd.grad(eager, [xz, w, b])
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(xz, w, b)
        compiled_grads = torch.autograd.grad(compiled, [xz, w, b])
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_triton_conv_ops_pass_torch_library_checks():
    """Schemas, fake implementations and the autograd registration agree with the real ops."""
    from kernels.triton_causal_conv1d import conv_fwd_op

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("no CUDA and TRITON_INTERPRET is not 1: run through pytest with tests/conftest.py")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 9, 7, generator=gen).to(device).requires_grad_(True)
    w = torch.randn(7, 3, generator=gen).to(device).requires_grad_(True)
    for bias in (None, torch.randn(7, generator=gen).to(device).requires_grad_(True)):
        torch.library.opcheck(conv_fwd_op, (x.transpose(1, 2), w, bias, True, False))
