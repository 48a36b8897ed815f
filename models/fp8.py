"""Float8 matrix products for the transformer blocks' linear layers (opt-in, ``--fp8``).

H100 / H200 tensor cores multiply float8 at twice their bfloat16 rate. ``Float8Linear`` keeps its float32 master
weight and its state-dict names (it is an ``nn.Linear``); each call scales its input and weight into float8 e4m3
and the incoming gradient into e5m2 (wider range, as gradients need), one scale per tensor from the tensor's current
absolute maximum ("dynamic" scaling: nothing carried between steps, so resume and gradient accumulation need
nothing extra), and multiplies them with ``torch._scaled_mm``, which accumulates in float32 and writes bfloat16 (or the
input's float32). What the backward needs is saved in float8: half the bytes of the bfloat16 activations.

The three products of a linear layer, with x (M, K), w (N, K), g = dL/dy (M, N):
    y = x w^T,    dx = g w,    dw = g^T x
``_scaled_mm`` takes its first operand row-major and its second column-major, so the backward makes transposed
copies of the saved float8 tensors (torch.compile fuses them into the casts).
"""

from __future__ import annotations

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
# Matrix dimensions _scaled_mm takes on CUDA are multiples of 16; layers with others stay bfloat16.
FP8_DIM_MULTIPLE = 16


def to_float8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` scaled so that its absolute maximum lands on ``dtype``'s largest finite value, in ``dtype``, and the
    float32 scalar that multiplies it back (what ``_scaled_mm`` takes)."""
    amax = x.detach().abs().amax().float().clamp(min=1e-12)
    scale = torch.finfo(dtype).max / amax
    x8 = (x.float() * scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    return x8, scale.reciprocal()


def _mm(a: torch.Tensor, a_inv: torch.Tensor, b: torch.Tensor, b_inv: torch.Tensor,
        out_dtype: torch.dtype) -> torch.Tensor:
    """a (M, K) @ b (K, N) for float8 ``a`` row-major and ``b`` column-major, dequantised by their scales."""
    return torch._scaled_mm(a, b, scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype)


def _column_major(x: torch.Tensor) -> torch.Tensor:
    """The same matrix with column-major storage."""
    return x.t().contiguous().t()


class _Float8Matmul(torch.autograd.Function):
    """y = x w^T with float8 operands; x (M, K) in the autocast / input dtype, w (N, K) float32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x8, x_inv = to_float8(x, E4M3)
        w8, w_inv = to_float8(weight, E4M3)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.dtypes = (x.dtype, weight.dtype)
        return _mm(x8, x_inv, w8.t(), w_inv, out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        g8, g_inv = to_float8(grad.contiguous(), E5M2)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # (M, N) @ (N, K)
            grad_x = _mm(g8, g_inv, _column_major(w8), w_inv, x_dtype)
        if ctx.needs_input_grad[1]:  # (N, M) @ (M, K)
            grad_w = _mm(g8.t().contiguous(), g_inv, _column_major(x8), x_inv, torch.float32).to(w_dtype)
        return grad_x, grad_w, None


class Float8Linear(nn.Linear):
    """``nn.Linear`` whose product runs in float8 (module docstring); same parameters, names and initialisation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.get_autocast_dtype(x.device.type)
        else:
            out_dtype = x.dtype
        lead = x.shape[:-1]
        y = _Float8Matmul.apply(x.reshape(-1, x.shape[-1]), self.weight, out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        return y.view(*lead, self.out_features)


def float8_fits(linear: nn.Linear) -> bool:
    """Whether ``_scaled_mm`` takes the layer's shape (both dimensions multiples of FP8_DIM_MULTIPLE)."""
    return linear.in_features % FP8_DIM_MULTIPLE == 0 and linear.out_features % FP8_DIM_MULTIPLE == 0


def check_float8_device(device: torch.device) -> None:
    """Raises ValueError when ``device`` cannot multiply float8 (CUDA before compute capability 8.9: Ada, Hopper)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"--fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                         f"{torch.cuda.get_device_name(device)} is {torch.cuda.get_device_capability(device)}")


def convert_to_float8(model: nn.Module, within: tuple[type[nn.Module], ...] | None = None) -> list[str]:
    """Turn every ``nn.Linear`` inside a module of a type in ``within`` (default: the transformer and Vision Mamba
    blocks, encoder and decoder) into a ``Float8Linear`` in place, parameters kept, where its shape fits; returns
    the converted layers' names. The patch embedding and the layers outside the blocks (MAE's decoder embedding and
    prediction, classifier heads) stay in bfloat16, as float8 recipes keep the first and last layers; so do the Vim
    mixers' x_proj / dt_proj, which are not called as modules."""
    if within is None:
        from models.layers import Block
        from models.vim import VimBlock

        within = (Block, VimBlock)
    converted = []
    for block_name, block in model.named_modules():
        if not isinstance(block, within):
            continue
        for name, module in block.named_modules():
            if type(module) is nn.Linear and float8_fits(module):
                module.__class__ = Float8Linear
                converted.append(f"{block_name}.{name}")
    return converted
