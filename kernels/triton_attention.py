"""Multi-head self-attention on a packed q / k / v projection, in Triton (forward and backward).

The attention blocks compute ``qkv = x @ W`` as one (batch, tokens, 3, heads, head_dim) tensor. These kernels read
q, k and v through its strides, write the output as (batch, tokens, heads, head_dim) and the backward's dq / dk / dv
straight into one gradient of the packed layout: no head-first copies either way (``scaled_dot_product_attention``
on head-first views leaves autograd to stack its three gradients into it).

The kernels (flash-attention structure, no atomics, deterministic) are in ``kernels/triton_attention_kernels.py``.
Layering as the scan's: kernels, launchers, an autograd.Function, custom ops for torch.compile, the public function
``packed_attention_triton``; the reference is ``packed_attention_ref`` (plain torch, float64-capable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels.triton_attention_kernels import (
    attn_bwd_dkdv_kernel,
    attn_bwd_dq_kernel,
    attn_bwd_tile_kernel,
    attn_fwd_kernel,
)
from kernels.triton_device import ATTENTION_DTYPES, ATTENTION_HEAD_DIMS, triton_runs_on
from kernels.triton_launch import ceil_div, compiled_launcher

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttentionLaunch:
    """Tiles and launch options of the attention kernels (the backward's two kernels walk the same tiles; the
    forward's may differ, its log-sum-exp does not depend on them)."""

    block_m: int  # queries per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int  # Triton's software-pipelining depth of the key / query walks
    # the backward of a sequence that fits one tile of both sizes in one kernel (attn_bwd_tile_kernel); False: the
    # split dq and dk / dv kernels at every length (bench.attention's "split" launches, to time the two)
    single_tile: bool = True


def attention_launch(tokens: int, head_dim: int, forward: bool = False) -> AttentionLaunch:
    """Default tiles for a sequence length and head size, of the backward or (``forward``) the forward.

    32 x 32 at 2 warps for sequences that fit one. Up to head_dim 64 the backward walks 64 x 64 tiles at 4 warps in
    three stages, the forward 64 x 32 tiles in three (128 x 64 from 1,024 tokens); 64 x 64 at 8 warps in two
    from head_dim 128. One H100, attention alone, fwd+bwd (thirty-eighth session): three backward stages took 10 % off
    the MAE decoder's backward (197 tokens, 16 heads of 32) and 5 % off Vim-B's at 1,024 px (4,097 tokens), 128-query
    x 64 forward tiles 11 % off the latter's forward (6 % slower at 197 tokens); the thirty-sixth session's 32-key forward
    tiles were 12 % faster in the decoder, 4-8 % in the encoders (the backward on them took twice as long)."""
    if tokens <= 32:
        return AttentionLaunch(32, 32, 2, 2)
    if head_dim > 64:
        return AttentionLaunch(64, 64, 8, 2)
    if forward:
        return AttentionLaunch(128, 64, 4, 3) if tokens >= 1024 else AttentionLaunch(64, 32, 4, 3)
    return AttentionLaunch(64, 64, 4, 3)


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
    compiled_launcher(attn_fwd_kernel)[(ceil_div(tokens, block_m) * batch * heads,)](
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
        compiled_launcher(attn_bwd_tile_kernel)[(batch * heads,)](
            qkv, out, dout, lse, dqkv, tokens, heads, sb, sn, s3, sh, ob, on, oh, *grads,
            BLOCK=min(block_m, block_n), **options)
        return dqkv
    rowdot = torch.empty_like(lse)
    # dq first: its programs also store rowsum(dout * out), which the dk / dv programs read.
    compiled_launcher(attn_bwd_dq_kernel)[(ceil_div(tokens, block_m) * batch * heads,)](
        qkv, out, dout, lse, rowdot, dqkv, tokens, heads, sb, sn, s3, sh, ob, on, oh, *grads,
        BLOCK_M=block_m, BLOCK_N=block_n, **options)
    compiled_launcher(attn_bwd_dkdv_kernel)[(ceil_div(tokens, block_n) * batch * heads,)](
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
