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
    if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
        # The test command runs 3 xdist workers on CI's 2 cores, and every torch process (workers and the CLI
        # subprocesses they start) would take one OpenMP thread per core: oversubscribed OpenMP threads spin
        # against each other (a 4 s MambaMIC test took 99 s in the full suite). One thread per process: the
        # suite went from 660-690 to 549-609 s on 2 cores. The subprocesses inherit the variable.
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def require_triton_kernels() -> None:
    """Fails the calling test where the Triton kernels can run neither compiled (no CUDA) nor interpreted."""
    import torch

    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton fixes compiled-vs-interpreted when it is imported; pytest_configure above sets this early.
        pytest.fail("no CUDA and TRITON_INTERPRET is not 1: run through pytest with tests/conftest.py")


@pytest.fixture
def triton_kernels_run() -> None:
    """For test modules of Triton kernels (``pytestmark = pytest.mark.usefixtures("triton_kernels_run")``)."""
    require_triton_kernels()


@pytest.fixture(scope="module")
def triton_scan():
    """The Triton scan backend (kernels.selective_scan_triton), compiled on CUDA or interpreted on CPU."""
    require_triton_kernels()
    return importlib.import_module("kernels.selective_scan_triton")
