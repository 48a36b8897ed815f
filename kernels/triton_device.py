"""Where the Triton kernels can run, and what the attention kernels take, asked without importing Triton."""

from __future__ import annotations

import os

import torch

# The packed-projection attention kernels (kernels/triton_attention.py): head sizes (one tl.dot operand dimension, a
# power of two >= 16) and projection dtypes.
ATTENTION_HEAD_DIMS = (16, 32, 64, 128)
ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_runs_on(is_cuda: bool) -> bool:
    """Whether the Triton kernels run on tensors of this kind: CUDA tensors, or CPU tensors while Triton's
    interpreter is on (``TRITON_INTERPRET=1``, fixed when Triton is first imported)."""
    return is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
