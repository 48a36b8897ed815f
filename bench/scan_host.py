"""Host time of the Triton scan's Python path, on the CPU, with the Triton kernels replaced by no-ops.

    python -m bench.scan_host [--iters 2000] [--backends triton triton_v2 triton_v3]

At short sequences (L=50, batch 128) a forward+backward on the GPU takes less time than the host needs to
launch it, so the wall clock there is the host's: argument handling, launch configuration, allocations and the
small torch ops around the kernels. This measures that path without a GPU: tiny CPU tensors (the torch ops'
work is negligible next to their dispatch) and every Triton kernel stubbed, so the number is what the project's
own Python costs per call, not Triton's launcher nor CUDA's. Compare revisions on the same machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from kernels.testing import make_scan_inputs

# Modules holding the @triton.jit kernels the launchers call, by attribute name.
KERNEL_MODULES = ("kernels.triton_scan_fwd", "kernels.triton_scan_bwd", "kernels.triton_scan_segments")


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid: object) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@contextmanager
def stubbed_kernels() -> Iterator[list[str]]:
    """Every Triton kernel of the scan launchers replaced by a no-op; yields the names replaced."""
    import importlib

    from triton.runtime.jit import KernelInterface

    saved: list[tuple[object, str, object]] = []
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if isinstance(value, KernelInterface):  # @triton.jit, compiled or interpreted
                saved.append((module, name, value))
    for module, name, _ in saved:
        setattr(module, name, _NoLaunch())
    try:
        yield [f"{m.__name__}.{n}" for m, n, _ in saved]
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def host_us(fn: Callable[[], object], iters: int) -> float:
    """Median of 5 rounds of ``iters`` calls, microseconds per call."""
    for _ in range(max(10, iters // 20)):
        fn()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        rounds.append((time.perf_counter() - start) / iters * 1e6)
    return sorted(rounds)[2]


def measure(backend: str, iters: int, length: int = 50) -> dict[str, float]:
    """Host microseconds of a bf16 forward (no grad) and forward+backward in a Mamba block's configuration."""
    from kernels import selective_scan_fn

    inputs = make_scan_inputs(2, 32, length, 16, groups=None, dtype=torch.bfloat16, seed=0, requires_grad=True)
    leaves = [t for t in inputs.values() if t is not None]
    dout = torch.randn_like(inputs["u"])

    def forward() -> None:
        with torch.no_grad():
            selective_scan_fn(**inputs, delta_softplus=True, backend=backend)

    def forward_backward() -> None:
        for t in leaves:
            t.grad = None
        selective_scan_fn(**inputs, delta_softplus=True, backend=backend).backward(dout)

    with stubbed_kernels():
        return {"fwd_us": host_us(forward, iters), "fwd_bwd_us": host_us(forward_backward, iters)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--backends", nargs="+", default=["triton", "triton_v2", "triton_v3"])
    args = parser.parse_args(argv)
    print(f"host time per call, kernels stubbed, torch {torch.__version__} on the CPU, L=50, bf16")
    print("| backend | fwd us | fwd+bwd us |\n|---|---|---|")
    for backend in args.backends:
        row = measure(backend, args.iters)
        print(f"| {backend} | {row['fwd_us']:.1f} | {row['fwd_bwd_us']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
