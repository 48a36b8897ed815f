"""Shared pytest setup. Keep minimal: every engineer's tests load this."""

from __future__ import annotations

import importlib
import os

import pytest


def pytest_configure(config) -> None:
    # Triton decides compiled-vs-interpreted when `triton` and each @triton.jit kernel are imported, so
    # this must happen before collection imports anything. Only machines without CUDA are affected:
    # there Triton kernels can only run under the interpreter (GPU runs stay compiled).
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def triton_scan():
    """The Triton scan backend (kernels.selective_scan_triton), compiled on CUDA or interpreted on CPU."""
    import torch

    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton fixes compiled-vs-interpreted when it is imported; pytest_configure above sets this early.
        pytest.fail("no CUDA and TRITON_INTERPRET is not 1: run through pytest with tests/conftest.py")
    return importlib.import_module("kernels.selective_scan_triton")
