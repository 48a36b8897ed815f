"""Shared pytest setup. Keep minimal: every engineer's tests load this."""

from __future__ import annotations

import os


def pytest_configure(config) -> None:
    # Triton decides compiled-vs-interpreted when `triton` and each @triton.jit kernel are imported, so
    # this must happen before collection imports anything. Only machines without CUDA are affected:
    # there Triton kernels can only run under the interpreter (GPU runs stay compiled).
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
