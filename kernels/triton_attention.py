"""Multi-head self-attention on a packed q / k / v projection, in Triton (forward and backward).

The ViT and MAE-decoder attention blocks compute ``qkv = x @ W`` as one (batch, tokens, 3, heads, head_dim) tensor.
These kernels read q, k and v out of it through its strides and write the output as (batch, tokens, heads, head_dim),
so the block needs no head-first copies either way: the backward writes dq / dk / dv straight into one gradient of
the packed projection's layout (``scaled_dot_product_attention`` on head-first views leaves autograd to stack its
three gradients into it).

Flash-attention structure (an online softmax over key blocks; the backward recomputes the probabilities from the
saved log-sum-exp): the forward, one program per (query block, batch x head); the backward, one program per (query
block, batch x head) for dq, which also stores its rows' rowsum(dout * out), then one per (key block, batch x head)
for dk / dv, so nothing is accumulated with atomics (deterministic). A sequence that fits one tile (the ViT encoders'
50 tokens) takes one backward program per batch x head instead, which computes the probabilities and their gradient
once for dq, dk and dv together. Softmax in base 2: scores are scaled by log2(e) / sqrt(head_dim) once and
exponentiated with exp2.

Layering as the scan's: kernels, launchers, an autograd.Function, custom ops for torch.compile, the public function
``packed_attention_triton``; the reference is ``packed_attention_ref`` (plain torch, float64-capable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton_device import ATTENTION_DTYPES, ATTENTION_HEAD_DIMS, triton_runs_on
from kernels.triton_launch import ceil_div, compiled_launcher

LOG2E = 1.4426950408889634


@triton.jit
def _mma(a, b, PRECISION: tl.constexpr):
    """a @ b accumulated in float32. PRECISION "upcast" (bf16 under the interpreter, whose bf16 tl.dot multiplies the
    raw bits): the operands as float32; a bf16 x bf16 product is exact in float32, so this is the tensor cores'
    arithmetic up to the order of the sums."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _head_coords(tokens, heads, sb, sh, BLOCK: tl.constexpr):
    """This program's (batch x head index, batch, head, offset of its q in the packed tensor, first row of its tile);
    k and v follow q at +s3 and +2 s3. A one-axis grid of batch x heads x tiles, tiles fastest: the tiles of one head
    run together (its k / v stay in L2) and batch x heads is not bound by the 65,535 programs of a grid's y axis."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(tokens, BLOCK)
    batch_head = pid // tiles
    batch = (batch_head // heads).to(tl.int64)
    head = (batch_head % heads).to(tl.int64)
    return batch_head, batch, head, batch * sb + head * sh, (pid % tiles) * BLOCK


@triton.jit
def _attn_fwd_kernel(QKV, OUT, LSE, tokens, heads, sb, sn, s3, sh, ob, on, oh, qk_scale,
                     HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    batch_head, batch, head, base, first = _head_coords(tokens, heads, sb, sh, BLOCK_M)
    offs_m = first + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    m_mask = offs_m < tokens
    q = tl.load(QKV + base + offs_m[:, None].to(tl.int64) * sn + offs_d[None, :], mask=m_mask[:, None], other=0.0)
    k_ptrs = QKV + base + s3 + offs_d[:, None]  # k read transposed: (HEAD_D, BLOCK_N)
    v_ptrs = QKV + base + 2 * s3 + offs_d[None, :]
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_D), tl.float32)
    for start in range(0, tokens, BLOCK_N):
        keys = start + offs_n
        n_mask = keys < tokens
        kt = tl.load(k_ptrs + keys[None, :].to(tl.int64) * sn, mask=n_mask[None, :], other=0.0)
        scores = _mma(q, kt, PRECISION) * qk_scale
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        p = tl.exp2(scores - new_max[:, None])
        rescale = tl.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        v = tl.load(v_ptrs + keys[:, None].to(tl.int64) * sn, mask=n_mask[:, None], other=0.0)
        acc = acc * rescale[:, None] + _mma(p.to(v.dtype), v, PRECISION)
        row_max = new_max
    acc = acc / row_sum[:, None]
    out_ptrs = OUT + batch * ob + head * oh + offs_m[:, None].to(tl.int64) * on
    tl.store(out_ptrs + offs_d[None, :], acc.to(OUT.dtype.element_ty), mask=m_mask[:, None])
    # The log-sum-exp of the scaled scores, base 2: the backward's probabilities are exp2(score - lse).
    tl.store(LSE + batch_head.to(tl.int64) * tokens + offs_m, row_max + tl.log2(row_sum), mask=m_mask)


@triton.jit
def _attn_bwd_dkdv_kernel(QKV, DOUT, LSE, ROWDOT, DQKV, tokens, heads, sb, sn, s3, sh, db, dn, dh,
                          gb, gn, g3, gh, qk_scale, sm_scale,
                          HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dk and dv of one key block: a walk over every query block, the probabilities recomputed transposed."""
    batch_head, batch, head, base, first = _head_coords(tokens, heads, sb, sh, BLOCK_N)
    offs_n = first + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    n_mask = offs_n < tokens
    keys = offs_n[:, None].to(tl.int64) * sn + offs_d[None, :]
    k = tl.load(QKV + base + s3 + keys, mask=n_mask[:, None], other=0.0)
    v = tl.load(QKV + base + 2 * s3 + keys, mask=n_mask[:, None], other=0.0)
    dk = tl.zeros((BLOCK_N, HEAD_D), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_D), tl.float32)
    stats = batch_head.to(tl.int64) * tokens
    for start in range(0, tokens, BLOCK_M):
        queries = start + offs_m
        m_mask = queries < tokens
        qt = tl.load(QKV + base + queries[None, :].to(tl.int64) * sn + offs_d[:, None], mask=m_mask[None, :],
                     other=0.0)  # (HEAD_D, BLOCK_M)
        lse = tl.load(LSE + stats + queries, mask=m_mask, other=0.0)
        # p^T (BLOCK_N, BLOCK_M); queries past the end get zero probability (their dout is zero too).
        pt = tl.exp2(_mma(k, qt, PRECISION) * qk_scale - lse[None, :])
        pt = tl.where(m_mask[None, :] & n_mask[:, None], pt, 0.0)
        dout = tl.load(DOUT + batch * db + head * dh + queries[:, None].to(tl.int64) * dn + offs_d[None, :],
                       mask=m_mask[:, None], other=0.0)
        dv += _mma(pt.to(dout.dtype), dout, PRECISION)
        rowdot = tl.load(ROWDOT + stats + queries, mask=m_mask, other=0.0)
        dpt = _mma(v, tl.trans(dout), PRECISION)
        dst = pt * (dpt - rowdot[None, :])
        dk += _mma(dst.to(qt.dtype), tl.trans(qt), PRECISION)
    grads = DQKV + batch * gb + head * gh + offs_n[:, None].to(tl.int64) * gn + offs_d[None, :]
    tl.store(grads + g3, (dk * sm_scale).to(DQKV.dtype.element_ty), mask=n_mask[:, None])
    tl.store(grads + 2 * g3, dv.to(DQKV.dtype.element_ty), mask=n_mask[:, None])


@triton.jit
def _attn_bwd_dq_kernel(QKV, OUT, DOUT, LSE, ROWDOT, DQKV, tokens, heads, sb, sn, s3, sh, ob, on, oh, db, dn, dh,
                        gb, gn, g3, gh, qk_scale, sm_scale,
                        HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dq of one query block, a walk over every key block; first the block's rowsum(dout * out) (the softmax
    backward's correction, float32), which it also stores for the dk / dv kernel launched after it."""
    batch_head, batch, head, base, first = _head_coords(tokens, heads, sb, sh, BLOCK_M)
    offs_m = first + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    m_mask = offs_m < tokens
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(QKV + base + rows * sn + offs_d[None, :], mask=m_mask[:, None], other=0.0)
    dout = tl.load(DOUT + batch * db + head * dh + rows * dn + offs_d[None, :], mask=m_mask[:, None], other=0.0)
    out = tl.load(OUT + batch * ob + head * oh + rows * on + offs_d[None, :], mask=m_mask[:, None], other=0.0)
    rowdot = tl.sum(out.to(tl.float32) * dout.to(tl.float32), axis=1)
    stats = batch_head.to(tl.int64) * tokens
    tl.store(ROWDOT + stats + offs_m, rowdot, mask=m_mask)
    lse = tl.load(LSE + stats + offs_m, mask=m_mask, other=0.0)
    dq = tl.zeros((BLOCK_M, HEAD_D), tl.float32)
    for start in range(0, tokens, BLOCK_N):
        keys = start + offs_n
        n_mask = keys < tokens
        cols = keys[None, :].to(tl.int64) * sn + offs_d[:, None]  # (HEAD_D, BLOCK_N): k and v read transposed
        kt = tl.load(QKV + base + s3 + cols, mask=n_mask[None, :], other=0.0)
        vt = tl.load(QKV + base + 2 * s3 + cols, mask=n_mask[None, :], other=0.0)
        p = tl.exp2(_mma(q, kt, PRECISION) * qk_scale - lse[:, None])
        p = tl.where(n_mask[None, :], p, 0.0)
        ds = p * (_mma(dout, vt, PRECISION) - rowdot[:, None])
        dq += _mma(ds.to(kt.dtype), tl.trans(kt), PRECISION)
    tl.store(DQKV + batch * gb + head * gh + rows * gn + offs_d[None, :], (dq * sm_scale).to(DQKV.dtype.element_ty),
             mask=m_mask[:, None])


@triton.jit
def _attn_bwd_tile_kernel(QKV, OUT, DOUT, LSE, DQKV, tokens, heads, sb, sn, s3, sh, ob, on, oh, db, dn, dh,
                          gb, gn, g3, gh, qk_scale, sm_scale,
                          HEAD_D: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """dq, dk and dv of one head whose whole sequence fits one BLOCK-row tile: the probabilities and their gradient
    computed once (the split kernels recompute both, one pair of products each), five products instead of seven."""
    batch_head, batch, head, base, _ = _head_coords(tokens, heads, sb, sh, BLOCK)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_D)
    mask = offs < tokens
    rows = offs[:, None].to(tl.int64)
    tile = rows * sn + offs_d[None, :]
    q = tl.load(QKV + base + tile, mask=mask[:, None], other=0.0)
    k = tl.load(QKV + base + s3 + tile, mask=mask[:, None], other=0.0)
    v = tl.load(QKV + base + 2 * s3 + tile, mask=mask[:, None], other=0.0)
    dout = tl.load(DOUT + batch * db + head * dh + rows * dn + offs_d[None, :], mask=mask[:, None], other=0.0)
    out = tl.load(OUT + batch * ob + head * oh + rows * on + offs_d[None, :], mask=mask[:, None], other=0.0)
    rowdot = tl.sum(out.to(tl.float32) * dout.to(tl.float32), axis=1)
    lse = tl.load(LSE + batch_head.to(tl.int64) * tokens + offs, mask=mask, other=0.0)
    p = tl.exp2(_mma(q, tl.trans(k), PRECISION) * qk_scale - lse[:, None])
    p = tl.where(mask[:, None] & mask[None, :], p, 0.0)  # (queries, keys)
    grads = DQKV + batch * gb + head * gh + rows * gn + offs_d[None, :]
    dv = _mma(tl.trans(p.to(dout.dtype)), dout, PRECISION)
    tl.store(grads + 2 * g3, dv.to(DQKV.dtype.element_ty), mask=mask[:, None])
    ds = (p * (_mma(dout, tl.trans(v), PRECISION) - rowdot[:, None])).to(q.dtype)
    dq = _mma(ds, k, PRECISION)
    tl.store(grads, (dq * sm_scale).to(DQKV.dtype.element_ty), mask=mask[:, None])
    dk = _mma(tl.trans(ds), q, PRECISION)
    tl.store(grads + g3, (dk * sm_scale).to(DQKV.dtype.element_ty), mask=mask[:, None])


@dataclass(frozen=True)
class AttentionLaunch:
    """Tiles and launch options of the attention kernels (the backward's two kernels walk the same tiles; the
    forward's may differ, its log-sum-exp does not depend on them)."""

    block_m: int  # queries per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int  # Triton's software-pipelining depth of the key / query walks
    # the backward of a sequence that fits one tile of both sizes in one kernel (_attn_bwd_tile_kernel); False: the
    # split dq and dk / dv kernels at every length (bench.attention's "split" launches, to time the two)
    single_tile: bool = True


def attention_launch(tokens: int, head_dim: int, forward: bool = False) -> AttentionLaunch:
    """Default tiles for a sequence length and head size, of the backward or (``forward``) the forward: 64 x 64 (a
    short sequence such as the MAE decoder's 197 tokens wastes less padding than with 128) at 4 warps, 8 from
    head_dim 128, two pipeline stages; 32-row tiles at 2 warps for sequences that fit one. The forward walks 32-key
    tiles in three stages up to head_dim 64: at the MAE shapes (one H100, thirty-sixth session, the attention alone)
    it was 12 % faster in the 197-token decoder and 4-8 % in the 50-token encoders than on 64 x 64, where the backward
    on 32-key tiles took twice as long. Offline sm_90 with the GPU image's Triton 3.6 at the MAE decoder's shape on 64 x
    64, strides divisible by 16 as at a real launch: forward 96 registers, dk / dv 154, dq 96; no spills. At head_dim
    64 (ViT-B's encoder): 111 / 188 / 122."""
    if tokens <= 32:
        return AttentionLaunch(32, 32, 2, 2)
    if forward and head_dim <= 64:
        return AttentionLaunch(64, 32, 4, 3)
    return AttentionLaunch(64, 64, 4 if head_dim <= 64 else 8, 2)


def check_packed_qkv(qkv: torch.Tensor) -> None:
    """The kernels' requirements on the packed projection (batch, tokens, 3, heads, head_dim)."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"packed attention: qkv must be (batch, tokens, 3, heads, head_dim), got {tuple(qkv.shape)}")
    if qkv.shape[-1] not in ATTENTION_HEAD_DIMS:
        raise ValueError(f"packed attention: head_dim must be one of {ATTENTION_HEAD_DIMS}, got {qkv.shape[-1]}")
    if qkv.stride(-1) != 1:
        raise ValueError("packed attention: head_dim must be the innermost (unit-stride) dimension")
    if qkv.dtype not in ATTENTION_DTYPES:
        raise ValueError(f"packed attention: unsupported dtype {qkv.dtype}")


def _precision(qkv: torch.Tensor) -> str:
    """float32 inputs multiply in full precision (tl.dot's default for them is TF32); half inputs ignore it, except
    bf16 on the CPU (the interpreter), see ``_mma``."""
    if qkv.dtype == torch.float32:
        return "ieee"
    return "upcast" if qkv.dtype == torch.bfloat16 and not qkv.is_cuda else "tf32"


def _launch_options(qkv: torch.Tensor, launch: AttentionLaunch | None, forward: bool
                    ) -> tuple[AttentionLaunch, dict]:
    """The launch (default: ``attention_launch`` of the direction) and the keyword arguments every tiled kernel
    takes."""
    launch = launch or attention_launch(qkv.shape[1], qkv.shape[-1], forward)
    return launch, dict(HEAD_D=qkv.shape[-1], PRECISION=_precision(qkv), num_warps=launch.num_warps,
                        num_stages=launch.num_stages)


def _scales(head_dim: int) -> tuple[float, float]:
    sm_scale = 1.0 / math.sqrt(head_dim)
    return sm_scale * LOG2E, sm_scale


def packed_attention_fwd(qkv: torch.Tensor, launch: AttentionLaunch | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (batch, tokens, heads, head_dim) contiguous in qkv's dtype, lse (batch * heads, tokens) float32 base 2);
    ``launch`` defaults to ``attention_launch(tokens, head_dim, forward=True)``."""
    batch, tokens, _, heads, head_dim = qkv.shape
    out = qkv.new_empty((batch, tokens, heads, head_dim))
    lse = torch.empty((batch * heads, tokens), device=qkv.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    launch, options = _launch_options(qkv, launch, forward=True)
    block_m, block_n = launch.block_m, launch.block_n
    qk_scale, _ = _scales(head_dim)
    sb, sn, s3, sh, _ = qkv.stride()
    ob, on, oh, _ = out.stride()
    compiled_launcher(_attn_fwd_kernel)[(ceil_div(tokens, block_m) * batch * heads,)](
        qkv, out, lse, tokens, heads, sb, sn, s3, sh, ob, on, oh, qk_scale,
        BLOCK_M=block_m, BLOCK_N=block_n, **options)
    return out, lse


def packed_attention_bwd(qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                         launch: AttentionLaunch | None = None) -> torch.Tensor:
    """The gradient of the packed projection, (batch, tokens, 3, heads, head_dim) contiguous in qkv's dtype."""
    batch, tokens, _, heads, head_dim = qkv.shape
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    if dqkv.numel() == 0:
        return dqkv
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    launch, options = _launch_options(qkv, launch, forward=False)
    block_m, block_n = launch.block_m, launch.block_n
    qk_scale, sm_scale = _scales(head_dim)
    sb, sn, s3, sh, _ = qkv.stride()
    ob, on, oh, _ = out.stride()
    db, dn, dh, _ = dout.stride()
    gb, gn, g3, gh, _ = dqkv.stride()
    grads = (db, dn, dh, gb, gn, g3, gh, qk_scale, sm_scale)
    if launch.single_tile and tokens <= min(block_m, block_n):
        compiled_launcher(_attn_bwd_tile_kernel)[(batch * heads,)](
            qkv, out, dout, lse, dqkv, tokens, heads, sb, sn, s3, sh, ob, on, oh, *grads,
            BLOCK=min(block_m, block_n), **options)
        return dqkv
    rowdot = torch.empty_like(lse)
    # dq first: its programs also store rowsum(dout * out), which the dk / dv programs read.
    compiled_launcher(_attn_bwd_dq_kernel)[(ceil_div(tokens, block_m) * batch * heads,)](
        qkv, out, dout, lse, rowdot, dqkv, tokens, heads, sb, sn, s3, sh, ob, on, oh, *grads,
        BLOCK_M=block_m, BLOCK_N=block_n, **options)
    compiled_launcher(_attn_bwd_dkdv_kernel)[(ceil_div(tokens, block_n) * batch * heads,)](
        qkv, dout, lse, rowdot, dqkv, tokens, heads, sb, sn, s3, sh, *grads,
        BLOCK_M=block_m, BLOCK_N=block_n, **options)
    return dqkv


class PackedAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        out, lse = packed_attention_fwd(qkv)
        ctx.save_for_backward(qkv, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # noqa: ANN001, ANN205
        qkv, out, lse = ctx.saved_tensors
        return packed_attention_bwd(qkv, out, lse, dout)


# Custom ops for torch.compile (dynamo cannot trace the launches); eager calls take the autograd.Function above.
# The ops take tensors only (an op's schema has no AttentionLaunch), so they run the default launch.
def _attention_fwd(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return packed_attention_fwd(qkv)


def _attention_bwd(qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    return packed_attention_bwd(qkv, out, lse, dout)


attention_fwd_op = torch.library.custom_op("scanmae::packed_attention_fwd", _attention_fwd, mutates_args=())


@attention_fwd_op.register_fake
def _attention_fwd_fake(qkv):
    batch, tokens, _, heads, head_dim = qkv.shape
    return (qkv.new_empty((batch, tokens, heads, head_dim)),
            qkv.new_empty((batch * heads, tokens), dtype=torch.float32))


attention_bwd_op = torch.library.custom_op("scanmae::packed_attention_bwd", _attention_bwd, mutates_args=())


@attention_bwd_op.register_fake
def _attention_bwd_fake(qkv, out, lse, dout):
    return qkv.new_empty(qkv.shape)


def _attention_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(inputs[0], *output)


def _attention_op_backward(ctx, dout, dlse):  # noqa: ANN001, ANN202
    qkv, out, lse = ctx.saved_tensors
    return attention_bwd_op(qkv, out, lse, dout)


attention_fwd_op.register_autograd(_attention_op_backward, setup_context=_attention_setup_context)


def packed_attention_triton(qkv: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v for a packed (batch, tokens, 3, heads, head_dim) projection (CUDA, or CPU
    tensors under ``TRITON_INTERPRET=1``) -> (batch, tokens, heads, head_dim)."""
    check_packed_qkv(qkv)
    if not triton_runs_on(qkv.is_cuda):
        raise ValueError("packed attention: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    if torch.compiler.is_compiling():
        return attention_fwd_op(qkv)[0]
    return PackedAttentionTriton.apply(qkv)


def packed_attention_ref(qkv: torch.Tensor) -> torch.Tensor:
    """The definition the kernels are tested against: explicit scores and softmax, in qkv's dtype (float64 in the
    tests)."""
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (batch, heads, tokens, head_dim)
    scores = q @ k.transpose(-1, -2) / math.sqrt(qkv.shape[-1])
    return (scores.softmax(dim=-1) @ v).transpose(1, 2)
