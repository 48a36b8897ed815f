"""Where the Triton kernels can run, asked without importing Triton."""

from __future__ import annotations

import os


def triton_runs_on(is_cuda: bool) -> bool:
    """Whether the Triton kernels run on tensors of this kind: CUDA tensors, or CPU tensors while Triton's
    interpreter is on (``TRITON_INTERPRET=1``, fixed when Triton is first imported)."""
    return is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
