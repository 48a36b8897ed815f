"""fc1 + exact GELU of a transformer block's MLP, with the GELU derivative and fc1's bias gradient in one pass.

Compiled, the plain MLP's backward runs, after fc2's input-gradient product, a pass that reads d(act) and fc1's
output ``pre`` and writes d(pre), then a reduction that reads both again for fc1's bias gradient (inductor does not
fuse a column sum into the pointwise pass). At MAE ViT-B's sizes those reductions took 6.9 of the 276 ms of a
batch-1536 step (one H100, thirty-fifth session's profile). Here one Triton kernel reads d(act) and pre once, writes
d(pre) and each row block's column sums, which are summed in a fixed order afterwards (deterministic). The forward
is cuBLAS's ``addmm`` and torch's GELU; the products of the backward are cuBLAS's.

(Fusing GELU into the products themselves, Triton matrix products with the activation in their epilogue, was tried
first: at these shapes they reached 250-320 TFLOP/s against cuBLAS's 600-645 on an H100, so the fused MLP was 10-14 %
slower than the plain one; thirty-fifth session, docs/pretrain_benchmarks.md.)

GELU is the exact (erf) one, as ``nn.GELU()``; the kernel computes in float32 from the stored (rounded) tensors, as
the unfused pass does. The same tensors are saved as the unfused MLP saves (x, pre; fc2 saves act).

Layering as the attention kernels': kernel, launcher, custom ops (eager and torch.compile alike), the public
function ``linear_gelu_triton``; the reference is ``linear_gelu_ref``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from kernels.triton_device import MLP_DTYPES, triton_runs_on
from kernels.triton_launch import ceil_div, compiled_launcher

SQRT1_2 = tl.constexpr(1.0 / math.sqrt(2.0))  # globals a kernel reads must be constexpr
INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))


@triton.jit
def _gelu_grad_kernel(DACT, PRE, DPRE, DBIAS_PARTS, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dpre = DACT * gelu'(PRE) for a (BLOCK_M, BLOCK_N) tile of the (M, N) contiguous tensors; DBIAS_PARTS[row
    block] = its column sums (float32, (cdiv(M, BLOCK_M), N)), of the rounded values: the bias gradient the unfused
    MLP gets from the dpre it stores."""
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    dact = tl.load(DACT + offs, mask=mask, other=0.0).to(tl.float32)
    pre = tl.load(PRE + offs, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(pre * SQRT1_2))
    dpre = (dact * (cdf + pre * tl.exp(-0.5 * pre * pre) * INV_SQRT_2PI)).to(DPRE.dtype.element_ty)
    tl.store(DPRE + offs, dpre, mask=mask)
    tl.store(DBIAS_PARTS + pid_m * N + cols, tl.sum(dpre.to(tl.float32), axis=0), mask=col_mask)


GRAD_BLOCK_M, GRAD_BLOCK_N, GRAD_WARPS = 128, 128, 8


def gelu_grad(dact: torch.Tensor, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dpre, dbias): dact * gelu'(pre) in dact's dtype and its column sums (float32); dact, pre (M, N)."""
    dact, pre = dact.contiguous(), pre.contiguous()
    m, n = pre.shape
    dpre = torch.empty_like(dact)
    parts = torch.empty((ceil_div(m, GRAD_BLOCK_M), n), device=pre.device, dtype=torch.float32)
    if dpre.numel():
        compiled_launcher(_gelu_grad_kernel)[(parts.shape[0], ceil_div(n, GRAD_BLOCK_N))](
            dact, pre, dpre, parts, m, n, BLOCK_M=GRAD_BLOCK_M, BLOCK_N=GRAD_BLOCK_N, num_warps=GRAD_WARPS)
    return dpre, parts.sum(dim=0)


# Custom ops: dynamo cannot trace the launch, and one op per direction keeps the saved tensors explicit.
@torch.library.custom_op("scanmae::linear_gelu_fwd", mutates_args=())
def linear_gelu_fwd_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pre = torch.addmm(b1, x, w1.t())
    return F.gelu(pre), pre


@linear_gelu_fwd_op.register_fake
def _linear_gelu_fwd_fake(x, w1, b1):
    act = x.new_empty((x.shape[0], w1.shape[0]))
    return act, torch.empty_like(act)


@torch.library.custom_op("scanmae::linear_gelu_bwd", mutates_args=())
def linear_gelu_bwd_op(dact: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, pre: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dpre, db1 = gelu_grad(dact, pre)
    return dpre @ w1, dpre.t() @ x, db1.to(dpre.dtype)


@linear_gelu_bwd_op.register_fake
def _linear_gelu_bwd_fake(dact, x, w1, pre):
    return x.new_empty(x.shape), w1.new_empty(w1.shape), w1.new_empty(w1.shape[:1])


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, w1, _ = inputs
    ctx.save_for_backward(x, w1, output[1])


def _op_backward(ctx, dact, dpre):  # noqa: ANN001, ANN202
    return linear_gelu_bwd_op(dact, *ctx.saved_tensors)


linear_gelu_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


# FLOP counts (torch.utils.flop_counter, what pretraining's MFU is computed from): the products' 2 x M x K x N each,
# one forward, two backward (GELU is not counted, as for the unfused MLP).
@register_flop_formula(torch.ops.scanmae.linear_gelu_fwd)
def _fwd_flops(x_shape, w1_shape, *args, **kwargs) -> int:  # noqa: ANN001, ANN002, ANN003
    return 2 * x_shape[0] * x_shape[1] * w1_shape[0]


@register_flop_formula(torch.ops.scanmae.linear_gelu_bwd)
def _bwd_flops(dact_shape, x_shape, w1_shape, *args, **kwargs) -> int:  # noqa: ANN001, ANN002, ANN003
    return 2 * 2 * x_shape[0] * x_shape[1] * w1_shape[0]


def linear_gelu_triton(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """gelu(x @ w1^T + b1), the MLP's first half, for x (..., dim), w1 (hidden, dim), b1 (hidden,), differentiable
    in every argument; its backward runs the fused kernel. Under autocast, everything is cast to the autocast dtype
    first (as ``F.linear`` would) and the result has that dtype."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w1, b1 = (t.to(dtype) for t in (x, w1, b1))
    elif w1.dtype != x.dtype or b1.dtype != x.dtype:
        raise ValueError("fused MLP: the weights must have the input's dtype (or run under autocast)")
    if x.dtype not in MLP_DTYPES:
        raise ValueError(f"fused MLP: inputs must be one of {MLP_DTYPES} (or run under autocast), got {x.dtype}")
    if not triton_runs_on(x.is_cuda):
        raise ValueError("fused MLP: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    flat = x.reshape(-1, x.shape[-1])
    return linear_gelu_fwd_op(flat, w1, b1)[0].view(*x.shape[:-1], w1.shape[0])


def linear_gelu_ref(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """The definition the op is tested against (plain torch, float64-capable)."""
    return F.gelu(F.linear(x, w1, b1))
