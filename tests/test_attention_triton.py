"""Packed-projection attention in Triton (kernels/triton_attention.py): values and the packed gradient against the
explicit float64 softmax, through the autograd.Function and the custom ops; interpreted on CPU, compiled on CUDA."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from kernels.triton_attention import (  # noqa: E402
    AttentionLaunch,
    attention_launch,
    check_packed_qkv,
    packed_attention_ref,
    packed_attention_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}
pytestmark = pytest.mark.usefixtures("triton_kernels_run")


def packed(batch: int, tokens: int, heads: int, head_dim: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A packed projection as the attention block makes it: a view of (batch, tokens, 3 * heads * head_dim)."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randn(batch, tokens, 3 * heads * head_dim, generator=gen, dtype=torch.float64) * 1.5
    return flat.to(DEVICE, dtype).view(batch, tokens, 3, heads, head_dim)


def check_against_reference(qkv: torch.Tensor) -> None:
    rtol, atol = TOLERANCES[qkv.dtype]
    qkv = qkv.detach().requires_grad_(True)
    exact = qkv.detach().double().requires_grad_(True)
    out = packed_attention_triton(qkv)
    want = packed_attention_ref(exact)
    assert out.shape == want.shape and out.dtype == qkv.dtype and out.is_contiguous()
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=atol)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (dqkv,) = torch.autograd.grad(out, qkv, dout.to(DEVICE, qkv.dtype))
    (want_dqkv,) = torch.autograd.grad(want, exact, dout.to(DEVICE))
    assert dqkv.shape == qkv.shape
    # q, k and v gradients separately, so a failure names which one is off.
    for part, name in enumerate("qkv"):
        torch.testing.assert_close(dqkv[:, :, part].double(), want_dqkv[:, :, part], rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"d{name}: {m}")


# Token counts: inside one block, one past a block, the encoders' 50, whole blocks only (64: the one-tile backward;
# 96 / 128: no partial block for the forward's 32-key tiles, none at all at 128), and the MAE decoder's 197 (several
# query and key blocks, the last partial).
@pytest.mark.parametrize("tokens", [1, 17, 33, 50, 64, 96, 128, 197])
def test_matches_explicit_softmax_float32(tokens):
    check_against_reference(packed(2, tokens, 2, 16, torch.float32, seed=tokens))


def test_matches_explicit_softmax_wide_heads():
    """head_dim 128 (8 warps by default)."""
    check_against_reference(packed(1, 40, 2, 128, torch.float32, seed=128))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("tokens", [50, 70])  # one tile (the one-kernel backward), two
def test_matches_explicit_softmax_half(dtype, head_dim, tokens):
    check_against_reference(packed(2, tokens, 2, head_dim, dtype, seed=head_dim + tokens))


@pytest.mark.parametrize("tokens", [1, 17, 50, 64])
def test_one_tile_backward_equals_the_split_kernels(tokens):
    """Sequences that fit one tile take the one-kernel backward; the split dq and dk / dv kernels (single_tile=False)
    compute the same gradient."""
    from kernels.triton_attention import packed_attention_bwd, packed_attention_fwd

    qkv = packed(2, tokens, 3, 16, torch.float32, seed=20 + tokens)
    dout = torch.randn(2, tokens, 3, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    out, lse = packed_attention_fwd(qkv)
    launch = attention_launch(tokens, 16)
    split = AttentionLaunch(launch.block_m, launch.block_n, launch.num_warps, launch.num_stages, single_tile=False)
    torch.testing.assert_close(packed_attention_bwd(qkv, out, lse, dout), packed_attention_bwd(qkv, out, lse, dout, split),
                               rtol=1e-5, atol=1e-5)


def test_equals_sdpa_on_head_first_views():
    qkv = packed(2, 40, 3, 16, torch.float32, seed=3)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    want = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    torch.testing.assert_close(packed_attention_triton(qkv), want, rtol=2e-5, atol=2e-5)


def test_large_scores_stay_finite():
    """Scores far beyond exp's range: the running maximum keeps the softmax finite, as the reference's."""
    qkv = packed(1, 50, 1, 16, torch.float32, seed=5) * 40.0
    qkv = qkv.detach().requires_grad_(True)
    out = packed_attention_triton(qkv)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(qkv.grad).all()
    torch.testing.assert_close(out.double(), packed_attention_ref(qkv.detach().double()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tokens", [50, 70])  # the one-tile backward; the split kernels with a partial last block
def test_padded_keys_cannot_overflow_into_the_gradients(tokens):
    """Every score of every row far below zero, so the base-2 log-sum-exp is under -128: a padded key (zero k)
    would get probability exp2(-lse) = inf. Its rows are never stored and dq zeroes it, so the gradients stay finite
    and match the reference (to float32's conditioning at scores this large)."""
    gen = torch.Generator().manual_seed(11)
    q = 6.0 + 0.3 * torch.randn(1, tokens, 1, 16, generator=gen, dtype=torch.float64)
    k = -6.0 + 0.3 * torch.randn(1, tokens, 1, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(1, tokens, 1, 16, generator=gen, dtype=torch.float64)
    exact = torch.stack([q, k, v], dim=2).requires_grad_(True)
    scores = (q[0, :, 0] @ k[0, :, 0].T) / 4.0 * math.log2(math.e)
    assert scores.max() < -150  # lse < -128 on every row
    qkv = exact.detach().float().to(DEVICE).requires_grad_(True)
    out = packed_attention_triton(qkv)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (dqkv,) = torch.autograd.grad(out, qkv, dout.to(DEVICE, torch.float32))
    want = packed_attention_ref(exact)
    (want_dqkv,) = torch.autograd.grad(want, exact, dout)
    assert torch.isfinite(dqkv).all()
    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-3, atol=1e-3)  # the reference ran on the CPU
    torch.testing.assert_close(dqkv.double().cpu(), want_dqkv, rtol=1e-3, atol=1e-3)


def test_empty_batch():
    qkv = packed(0, 50, 2, 16, torch.float32, seed=0).requires_grad_(True)
    out = packed_attention_triton(qkv)
    out.sum().backward()
    assert out.shape == (0, 50, 2, 16) and qkv.grad.shape == qkv.shape


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="head_dim must be one of"):
        check_packed_qkv(torch.zeros(1, 4, 3, 2, 24))
    with pytest.raises(ValueError, match=r"\(batch, tokens, 3, heads, head_dim\)"):
        check_packed_qkv(torch.zeros(1, 4, 2, 2, 16))
    with pytest.raises(ValueError, match="innermost"):
        check_packed_qkv(torch.zeros(1, 4, 3, 16, 2).transpose(-1, -2))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        packed_attention_triton(torch.zeros(1, 4, 3, 1, 16))


def test_launch_per_shape():
    assert attention_launch(17, 16) == AttentionLaunch(32, 32, 2, 2)
    assert attention_launch(197, 32) == AttentionLaunch(64, 64, 4, 3)
    assert attention_launch(50, 64) == AttentionLaunch(64, 64, 4, 3)
    assert attention_launch(4097, 32) == AttentionLaunch(64, 64, 4, 3)
    assert attention_launch(197, 128) == AttentionLaunch(64, 64, 8, 2)
    # the forward's own tiles (thirty-sixth and thirty-eighth sessions' sweeps), up to head_dim 64
    assert attention_launch(197, 32, forward=True) == AttentionLaunch(64, 32, 4, 3)
    assert attention_launch(50, 64, forward=True) == AttentionLaunch(64, 32, 4, 3)
    assert attention_launch(1023, 32, forward=True) == AttentionLaunch(64, 32, 4, 3)
    assert attention_launch(1024, 32, forward=True) == AttentionLaunch(128, 64, 4, 3)
    assert attention_launch(4097, 64, forward=True) == AttentionLaunch(128, 64, 4, 3)
    assert attention_launch(197, 128, forward=True) == AttentionLaunch(64, 64, 8, 2)
    assert attention_launch(17, 16, forward=True) == AttentionLaunch(32, 32, 2, 2)


@pytest.mark.parametrize("launch", [AttentionLaunch(32, 64, 2, 1), AttentionLaunch(64, 32, 4, 3),
                                    AttentionLaunch(64, 64, 4, 2), AttentionLaunch(128, 64, 4, 3)])
def test_other_tiles_give_the_same_values(launch):
    """Explicit launches (bench.attention --launches): unequal query and key tiles, other warps and stages; 150
    tokens: full blocks and a partial one at every tile size (128 x 64: the long-sequence forward's default)."""
    from kernels.triton_attention import packed_attention_bwd, packed_attention_fwd

    qkv = packed(1, 150, 2, 16, torch.float32, seed=4)
    dout = torch.randn(1, 150, 2, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, lse = packed_attention_fwd(qkv)
    dqkv = packed_attention_bwd(qkv, out, lse, dout)
    other_out, other_lse = packed_attention_fwd(qkv, launch)
    torch.testing.assert_close(other_out, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other_lse, lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_attention_bwd(qkv, out, lse, dout, launch), dqkv, rtol=1e-5, atol=1e-5)


def test_compiles_without_graph_breaks_and_matches_eager():
    qkv = packed(2, 37, 2, 16, torch.float32, seed=11)

    def attend(t: torch.Tensor) -> torch.Tensor:
        return packed_attention_triton(t).sum(-1)

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    eager_in = qkv.detach().requires_grad_(True)
    compiled_in = qkv.detach().requires_grad_(True)
    eager_out, compiled_out = attend(eager_in), compiled(compiled_in)
    torch.testing.assert_close(compiled_out, eager_out)
    eager_out.sum().backward()
    compiled_out.sum().backward()
    torch.testing.assert_close(compiled_in.grad, eager_in.grad)


def test_ops_pass_torch_library_checks():
    from kernels.triton_attention import attention_fwd_op

    qkv = packed(1, 20, 2, 16, torch.float32, seed=2).requires_grad_(True)
    torch.library.opcheck(attention_fwd_op, (qkv,), test_utils=("test_schema", "test_faketensor",
                                                                 "test_autograd_registration"))


ATTENTION_BUILD_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget

from kernels import triton_attention as ta
from kernels import triton_attention_kernels as tak

POINTERS = {"QKV": "*bf16", "OUT": "*bf16", "DOUT": "*bf16", "DQKV": "*bf16", "LSE": "*fp32", "ROWDOT": "*fp32"}
# The MAE decoder's attention (197 tokens, 16 heads of 32) and, for the one-tile backward, ViT-B's encoder (50 tokens,
# 12 heads of 64); packed (b, n, 3, h, d) projections.
CASES = [(tak.attn_fwd_kernel, 197, 16, 32), (tak.attn_bwd_dq_kernel, 197, 16, 32),
         (tak.attn_bwd_dkdv_kernel, 197, 16, 32), (tak.attn_bwd_tile_kernel, 50, 12, 64)]
for kernel, tokens, heads, head_dim in CASES:
    ints = dict(tokens=tokens, heads=heads, sb=tokens * 3 * heads * head_dim, sn=3 * heads * head_dim,
                s3=heads * head_dim, sh=head_dim, ob=tokens * heads * head_dim, on=heads * head_dim, oh=head_dim,
                db=tokens * heads * head_dim, dn=heads * head_dim, dh=head_dim, gb=tokens * 3 * heads * head_dim,
                gn=3 * heads * head_dim, g3=heads * head_dim, gh=head_dim)
    launch = ta.attention_launch(tokens, head_dim, forward=kernel is tak.attn_fwd_kernel)
    # Specialised as a launch would be: pointers 16-byte aligned, integers divisible by 16 hinted so.
    signature, consts, hints = {}, {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
            hints[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                hints[(i,)] = [["tt.divisibility", 16]]
    consts.update({k: v for k, v in dict(HEAD_D=head_dim, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
                                          BLOCK=min(launch.block_m, launch.block_n),
                                          PRECISION="tf32").items() if k in kernel.arg_names})
    src = triton.compiler.ASTSource(kernel, signature, consts, hints)
    triton.compile(src, target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    print(kernel.__name__, "built")
"""


def test_kernels_compile_for_sm90(tmp_path):
    """Triton's real compiler (not the interpreter) builds the four kernels for sm_90 at the MAE shapes."""
    from kernels.testing import run_compiled

    stdout = run_compiled(ATTENTION_BUILD_SCRIPT, tmp_path / "cache")
    assert stdout.count("built") == 4, stdout


def test_attention_block_on_triton_equals_sdpa():
    """models.layers.Attention with attention_backend "triton" against the SDPA path: same output and the same
    gradients of the input and of both projections."""
    from models.layers import Attention

    torch.manual_seed(0)
    block = Attention(32, 2).to(DEVICE)
    x = torch.randn(2, 45, 32, device=DEVICE)
    results = []
    for backend in ("sdpa", "triton"):
        block.attention_backend = backend
        block.zero_grad()
        inp = x.clone().requires_grad_(True)
        out = block(inp)
        out.square().sum().backward()
        results.append((out, inp.grad, block.qkv.weight.grad.clone(), block.proj.weight.grad.clone()))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    block.train()
    block.attn_drop = 0.1
    with pytest.raises(ValueError, match="no attention dropout"):
        block(x)


def test_auto_backend_picks_our_kernels_on_cuda_where_they_apply(monkeypatch: pytest.MonkeyPatch):
    """"auto": triton on CUDA at any sequence length, for head sizes and dtypes the kernels take and without attention
    dropout, SDPA otherwise (the CPU included, interpreter or not); the block runs exactly the chosen path (bitwise
    equal to it), and a head size our kernels do not take (ViT-H's 80) runs SDPA instead of failing."""
    from models.layers import Attention, attention_kernel

    def rule(backend: str, is_cuda: bool = True, dropout: bool = False, head_dim: int = 64,
             dtype: torch.dtype = torch.bfloat16) -> str:
        return attention_kernel(backend, head_dim, dtype, is_cuda, dropout)

    assert rule("auto") == "triton"  # the encoders' 50 tokens as the decoder's 197
    with monkeypatch.context() as env:
        env.setenv("TRITON_INTERPRET", "1")
        assert rule("auto", is_cuda=False) == "sdpa"  # the interpreter is for tests, not speed
    assert rule("auto", dropout=True) == "sdpa"  # attention dropout
    assert rule("auto", head_dim=80) == "sdpa"  # ViT-H/14's heads
    assert rule("auto", head_dim=8) == "sdpa"
    assert rule("auto", dtype=torch.float64) == "sdpa"
    assert rule("auto", dtype=torch.float16) == rule("auto", dtype=torch.float32) == "triton"
    assert rule("triton", is_cuda=False) == "triton"  # a named backend is kept (the interpreter runs it)
    assert rule("sdpa") == "sdpa"

    torch.manual_seed(1)
    block = Attention(32, 2).to(DEVICE).eval()
    chosen = "triton" if torch.device(DEVICE).type == "cuda" else "sdpa"
    for tokens in (50, 130):
        x = torch.randn(1, tokens, 32, device=DEVICE)
        outs = {}
        with torch.no_grad():
            for backend in ("sdpa", "triton", "auto"):
                block.attention_backend = backend
                outs[backend] = block(x)
        other = "sdpa" if chosen == "triton" else "triton"
        assert torch.equal(outs["auto"], outs[chosen]) and not torch.equal(outs["auto"], outs[other])
    wide = Attention(160, 2).to(DEVICE).eval()  # heads of 80
    x = torch.randn(1, 130, 160, device=DEVICE)
    with torch.no_grad():
        wide.attention_backend = "sdpa"
        expected = wide(x)
        wide.attention_backend = "auto"
        assert torch.equal(wide(x), expected)
        wide.attention_backend = "triton"
        with pytest.raises(ValueError, match="head_dim must be one of"):
            wide(x)


def test_bench_attention_parses_launches():
    from bench.attention import BACKENDS, parse_launch

    assert parse_launch("64:32:4:2") == AttentionLaunch(64, 32, 4, 2)
    assert parse_launch("64:64:4:2:split") == AttentionLaunch(64, 64, 4, 2, single_tile=False)
    for bad in ("64:64:4", "64:64:4:2:fused"):
        with pytest.raises(argparse.ArgumentTypeError, match="BLOCK_M:BLOCK_N:WARPS:STAGES"):
            parse_launch(bad)
    assert "triton" in BACKENDS and "default" in BACKENDS


def test_bench_attention_parses_shapes():
    from bench.attention import parse_shape

    assert parse_shape("vim_b 1024px decoder:16:4097:512:16") == ("vim_b 1024px decoder", 16, 4097, 512, 16)
    for bad in ("x:16:4097:512", "x:16:4097:512:h"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME:BATCH:TOKENS:DIM:HEADS"):
            parse_shape(bad)


def test_bench_attention_alone_difference_flags_a_wrong_result(monkeypatch):
    """The sweep's per-launch check: small for our kernels at an explicit tiling, large once the output is off."""
    import bench.attention as bench_attention
    import kernels.triton_attention as triton_attention

    qkv = packed(2, 40, 2, 16, torch.float32, seed=11)
    dout = torch.randn(2, 40, 2, 16, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    reference = bench_attention.sdpa_reference(qkv, dout)
    out_diff, grad_diff = bench_attention.alone_difference(qkv, dout, AttentionLaunch(32, 16, 4, 2), reference)
    assert out_diff < 1e-4 and grad_diff < 1e-4

    real_fwd = triton_attention.packed_attention_fwd

    def shifted_fwd(qkv, launch=None):  # noqa: ANN001, ANN202
        out, lse = real_fwd(qkv, launch)
        return out + 0.5, lse

    monkeypatch.setattr(triton_attention, "packed_attention_fwd", shifted_fwd)
    out_diff, _ = bench_attention.alone_difference(qkv, dout, None, reference)
    assert out_diff == pytest.approx(0.5, abs=1e-4)
