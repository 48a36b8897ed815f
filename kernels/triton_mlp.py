"""A transformer block's MLP (fc1 -> exact GELU -> fc2) with GELU and its derivative fused into the products.

Compiled, the plain MLP runs fc1 on cuBLAS, then a separate pass that reads fc1's output and writes the activation;
in the backward, fc2's input-gradient product writes d(activation), a pass reads it with fc1's output and writes
d(fc1 output), and a reduction reads both again for fc1's bias gradient. At MAE ViT-B's sizes those passes over the
(tokens, 4 x dim) hidden tensors took about 36 of the 276 ms of a batch-1536 step (one H100, thirty-fifth session's
profile). Here:

- forward: one Triton product ``pre = x @ W1^T + b1`` whose epilogue also writes ``act = gelu(pre)``; fc2 is
  cuBLAS (``addmm``);
- backward: one Triton product ``dy @ W2`` whose epilogue multiplies by gelu'(pre) and writes ``dpre``, with each
  row block's column sums (fc1's bias gradient, summed in a fixed order afterwards: deterministic); the weight and
  input gradients are cuBLAS products.

GELU is the exact (erf) one, as ``nn.GELU()``, computed in float32 from ``pre`` rounded to the output dtype, as the
unfused MLP does. The same tensors are saved as the unfused MLP saves (x, pre, act).

Layering as the attention kernels': kernels, launchers, custom ops (eager and torch.compile alike), the public
function ``mlp_triton``; the reference is ``mlp_ref``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from kernels.triton_device import MLP_DTYPES, triton_runs_on
from kernels.triton_launch import ceil_div, compiled_launcher
from kernels.triton_mma import dot_precision, mma

SQRT1_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row block, column block): a one-axis grid walked in groups of GROUP_M row blocks, column
    blocks slower, so the programs running together share their weight tiles and a group's rows in L2."""
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(blocks_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit
def _product(A, B, M, N, K, sam, sak, sbk, sbn, pid_m, pid_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) float32 tile (pid_m, pid_n) of A (M, K) @ B (K, N), both through their strides. Rows
    and columns past the ends are read wrapped around (modulo; their results are masked at the store), so only K
    needs a load mask, and none when BLOCK_K divides it (EVEN_K)."""
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows[:, None].to(tl.int64) * sam + offs_k[None, :] * sak
    b_ptrs = B + offs_k[:, None] * sbk + cols[None, :] * sbn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for start in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_mask = offs_k < K - start
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        acc += mma(a, b, PRECISION)
        a_ptrs += BLOCK_K * sak
        b_ptrs += BLOCK_K * sbk
    return acc


@triton.jit
def _linear_gelu_kernel(X, W, BIAS, PRE, ACT, M, N, K, sxm, sxk, swn, swk, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                        PRECISION: tl.constexpr):
    """pre = X (M, K) @ W (N, K)^T + BIAS, act = gelu(pre); PRE and ACT (M, N) contiguous."""
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _product(X, W, M, N, K, sxm, sxk, swk, swn, pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PRECISION)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    pre = (acc + tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]).to(PRE.dtype.element_ty)
    pre32 = pre.to(tl.float32)
    act = 0.5 * pre32 * (1.0 + tl.math.erf(pre32 * SQRT1_2))
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    mask = (rows < M)[:, None] & col_mask[None, :]
    tl.store(PRE + offs, pre, mask=mask)
    tl.store(ACT + offs, act.to(ACT.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_grad_kernel(DY, W, PRE, DPRE, DBIAS_PARTS, M, N, K, sdm, sdk, swk, swn, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                      PRECISION: tl.constexpr):
    """dpre = (DY (M, K) @ W (K, N)) * gelu'(PRE); DBIAS_PARTS[row block] = the column sums of this tile's dpre
    (float32, (cdiv(M, BLOCK_M), N))."""
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    dact = _product(DY, W, M, N, K, sdm, sdk, swk, swn, pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PRECISION)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    mask = (rows < M)[:, None] & col_mask[None, :]
    pre = tl.load(PRE + offs, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(pre * SQRT1_2))
    dpre = (dact * (cdf + pre * tl.exp(-0.5 * pre * pre) * INV_SQRT_2PI)).to(DPRE.dtype.element_ty)
    tl.store(DPRE + offs, dpre, mask=mask)
    # the sums of the rounded values: the gradient the unfused MLP's bias gets from the dpre it stores
    column_sums = tl.sum(tl.where(mask, dpre.to(tl.float32), 0.0), axis=0)
    tl.store(DBIAS_PARTS + pid_m * N + cols, column_sums, mask=col_mask)


@dataclass(frozen=True)
class MlpLaunch:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# A 128 x 128 output tile, the reduction in 64-wide steps.
DEFAULT_LAUNCH = MlpLaunch(128, 128, 64, 8, 8, 3)


def _launch(kernel, a: torch.Tensor, b_strides: tuple[int, int], args: tuple, m: int, n: int, k: int,
            launch: MlpLaunch | None) -> None:
    launch = launch or DEFAULT_LAUNCH
    grid = (ceil_div(m, launch.block_m) * ceil_div(n, launch.block_n),)
    compiled_launcher(kernel)[grid](
        *args, m, n, k, a.stride(0), a.stride(1), *b_strides, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
        BLOCK_K=launch.block_k, GROUP_M=launch.group_m, EVEN_K=k % launch.block_k == 0,
        PRECISION=dot_precision(a.dtype, a.is_cuda), num_warps=launch.num_warps, num_stages=launch.num_stages)


def linear_gelu_fwd(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, launch: MlpLaunch | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre, act): x (M, K) @ w1 (N, K)^T + b1 and its GELU, both (M, N) contiguous in x's dtype."""
    m, k = x.shape
    n = w1.shape[0]
    pre = x.new_empty((m, n))
    act = x.new_empty((m, n))
    if pre.numel():
        _launch(_linear_gelu_kernel, x, (w1.stride(0), w1.stride(1)), (x, w1, b1, pre, act), m, n, k, launch)
    return pre, act


def gelu_linear_grad(dy: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor, launch: MlpLaunch | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dpre, dbias): the gradient of fc1's output, (dy @ w2) * gelu'(pre), in dy's dtype, and its column sums
    (float32). dy (M, K), w2 (K, N) (fc2's weight), pre (M, N) contiguous."""
    m, k = dy.shape
    n = w2.shape[1]
    launch = launch or DEFAULT_LAUNCH
    dpre = dy.new_empty((m, n))
    parts = torch.empty((ceil_div(m, launch.block_m), n), device=dy.device, dtype=torch.float32)
    if dpre.numel():
        _launch(_gelu_grad_kernel, dy, (w2.stride(0), w2.stride(1)), (dy, w2, pre, dpre, parts), m, n, k, launch)
    return dpre, parts.sum(dim=0)


# Custom ops: dynamo cannot trace the launches, and one op per direction keeps the saved tensors explicit.
@torch.library.custom_op("scanmae::mlp_fwd", mutates_args=())
def mlp_fwd_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pre, act = linear_gelu_fwd(x, w1, b1)
    return torch.addmm(b2, act, w2.t()), pre, act


@mlp_fwd_op.register_fake
def _mlp_fwd_fake(x, w1, b1, w2, b2):
    hidden = x.new_empty((x.shape[0], w1.shape[0]))
    return x.new_empty((x.shape[0], w2.shape[0])), hidden, torch.empty_like(hidden)


@torch.library.custom_op("scanmae::mlp_bwd", mutates_args=())
def mlp_bwd_op(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor,
               act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dy = dy.contiguous()
    dpre, db1 = gelu_linear_grad(dy, w2, pre)
    return dpre @ w1, dpre.t() @ x, db1.to(dy.dtype), dy.t() @ act, dy.sum(dim=0, dtype=torch.float32).to(dy.dtype)


@mlp_bwd_op.register_fake
def _mlp_bwd_fake(dy, x, w1, w2, pre, act):
    return x.new_empty(x.shape), w1.new_empty(w1.shape), w1.new_empty(w1.shape[:1]), w2.new_empty(w2.shape), \
        w2.new_empty(w2.shape[:1])


def _mlp_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, w1, _, w2, _ = inputs
    _, pre, act = output
    ctx.save_for_backward(x, w1, w2, pre, act)


def _mlp_op_backward(ctx, dy, dpre, dact):  # noqa: ANN001, ANN202
    return mlp_bwd_op(dy, *ctx.saved_tensors)


mlp_fwd_op.register_autograd(_mlp_op_backward, setup_context=_mlp_setup_context)


# FLOP counts (torch.utils.flop_counter, what pretraining's MFU is computed from): the products' 2 x M x K x N each,
# two forward, four backward (the GELU terms are not counted, as for the unfused MLP).
@register_flop_formula(torch.ops.scanmae.mlp_fwd)
def _mlp_fwd_flops(x_shape, w1_shape, *args, **kwargs) -> int:  # noqa: ANN001, ANN002, ANN003
    return 2 * 2 * x_shape[0] * x_shape[1] * w1_shape[0]


@register_flop_formula(torch.ops.scanmae.mlp_bwd)
def _mlp_bwd_flops(dy_shape, x_shape, w1_shape, *args, **kwargs) -> int:  # noqa: ANN001, ANN002, ANN003
    return 4 * 2 * x_shape[0] * x_shape[1] * w1_shape[0]


def check_mlp_inputs(x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> None:
    """The kernels' requirements: half-precision inputs (after autocast) on a device Triton runs on."""
    if x.dtype not in MLP_DTYPES:
        raise ValueError(f"fused MLP: inputs must be one of {MLP_DTYPES} (or run under autocast), got {x.dtype}")
    if not triton_runs_on(x.is_cuda):
        raise ValueError("fused MLP: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    if any(w.device != x.device for w in weights):
        raise ValueError("fused MLP: the weights must be on the input's device")


def mlp_triton(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
               ) -> torch.Tensor:
    """fc2(gelu(fc1(x))) for x (..., dim), fc1 (hidden, dim) + (hidden,), fc2 (dim, hidden) + (dim,), differentiable
    in every argument. Under autocast, everything is cast to the autocast dtype first (as ``F.linear`` would) and
    the result has that dtype."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w1, b1, w2, b2 = (t.to(dtype) for t in (x, w1, b1, w2, b2))
    elif any(t.dtype != x.dtype for t in (w1, b1, w2, b2)):
        raise ValueError("fused MLP: the weights must have the input's dtype (or run under autocast)")
    check_mlp_inputs(x, (w1, b1, w2, b2))
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    return mlp_fwd_op(flat, w1, b1, w2, b2)[0].view(*x.shape[:-1], w2.shape[0])


def mlp_ref(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """The definition the kernels are tested against (plain torch, float64-capable)."""
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
