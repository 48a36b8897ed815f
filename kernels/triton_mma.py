"""The matrix product every tiled Triton kernel here uses, and the precision it runs in for a tensor's dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def mma(a, b, PRECISION: tl.constexpr):
    """a @ b accumulated in float32. PRECISION "upcast" (bf16 under the interpreter, whose bf16 tl.dot multiplies the
    raw bits): the operands as float32; a bf16 x bf16 product is exact in float32, so this is the tensor cores'
    arithmetic up to the order of the sums. ``acc += mma(a, b, P)`` compiles to an accumulating tensor-core product
    (Triton folds the add into the dot)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


def dot_precision(dtype: torch.dtype, is_cuda: bool) -> str:
    """``mma``'s PRECISION for operands of ``dtype``: float32 multiplies in full precision (tl.dot's default for it is
    TF32); half dtypes ignore it, except bf16 on the CPU (the interpreter)."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if dtype == torch.bfloat16 and not is_cuda else "tf32"
