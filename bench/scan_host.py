"""Host time of the Triton scan's Python path, on the CPU, with the Triton kernels replaced by no-ops.

    python -m bench.scan_host [--iters 2000] [--backends triton triton_v1 triton_v3]
    python -m bench.scan_host --cuda [--backends ...]     (on a GPU: the real path at the benchmark's shape)
    python -m bench.scan_host --cuda --python-profile 25  (and the Python functions with the most own time)

At short sequences (L=50, batch 128) a forward+backward on the GPU takes less time than the host needs to
launch it, so the wall clock there is the host's: argument handling, launch configuration, allocations and the
small torch ops around the kernels. This measures that path without a GPU: tiny CPU tensors (the torch ops'
work is negligible next to their dispatch) and every Triton kernel stubbed, so the number is what the project's
own Python costs per call, not Triton's launcher nor CUDA's. Compare revisions on the same machine.

``--cuda`` measures the whole host path instead, real kernels included, at bench/scan.py's (128, 768, 16, L=50):
the time to enqueue a forward and a forward+backward (the GPU runs behind), whether anything synchronizes, and
the operations with the most host time per call from torch.profiler. That is where the gap between the
benchmark's wall clock and its GPU-busy column goes.
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


def scan_calls(backend: str, shape: tuple[int, int], length: int,
               device: str = "cpu") -> tuple[Callable[[], None], Callable[[], None]]:
    """A bf16 forward (no grad) and a forward+backward in a Mamba block's configuration, (batch, dim) = ``shape``,
    N=16, as two argument-less calls."""
    from kernels import selective_scan_fn

    inputs = make_scan_inputs(*shape, length, 16, groups=None, dtype=torch.bfloat16, seed=0, device=device,
                              requires_grad=True)
    leaves = [t for t in inputs.values() if t is not None]
    dout = torch.randn_like(inputs["u"])

    def forward() -> None:
        with torch.no_grad():
            selective_scan_fn(**inputs, delta_softplus=True, backend=backend)

    def forward_backward() -> None:
        for t in leaves:
            t.grad = None
        selective_scan_fn(**inputs, delta_softplus=True, backend=backend).backward(dout)

    return forward, forward_backward


def measure(backend: str, iters: int, length: int = 50) -> dict[str, float]:
    """Host microseconds of a bf16 forward (no grad) and forward+backward in a Mamba block's configuration."""
    forward, forward_backward = scan_calls(backend, (2, 32), length)
    with stubbed_kernels():
        return {"fwd_us": host_us(forward, iters), "fwd_bwd_us": host_us(forward_backward, iters)}


def measure_cuda(backend: str, iters: int, length: int = 50, top: int = 12, shape: tuple[int, int] = (128, 768),
                 device: str = "cuda") -> dict[str, object]:
    """Host microseconds to enqueue a bf16 forward and forward+backward with the real kernels on CUDA (median of
    ``iters`` calls, each timed without waiting for the GPU), the number of synchronizing calls seen with
    CUDA's sync debug mode, and the ``top`` operations by host time per forward+backward (torch.profiler).
    ``device`` "cpu" (tests, with stubbed kernels) skips the CUDA-only parts."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    forward, forward_backward = scan_calls(backend, shape, length, device)

    def enqueue_us(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(iters):
            synchronize()
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e6)
        return sorted(times)[len(times) // 2]

    for _ in range(5):  # compile and warm every path first
        forward()
        forward_backward()
    row: dict[str, object] = {"fwd_us": enqueue_us(forward), "fwd_bwd_us": enqueue_us(forward_backward)}
    synchronize()
    row["syncs"] = None
    if cuda:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                forward_backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # not the "debug mode is a prototype feature" notice that turning the mode on prints
        row["syncs"] = sum("called a synchronizing" in str(w.message) for w in caught)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            forward_backward()
    synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    row["top_ops"] = [(e.key, e.self_cpu_time_total / 20, e.count / 20) for e in events]
    return row


def python_profile(backend: str, top: int, iters: int = 200, length: int = 50,
                   shape: tuple[int, int] = (128, 768), device: str = "cuda") -> str:
    """cProfile of ``iters`` forward+backward calls on CUDA: the ``top`` functions by own time, per call. Shows how
    the host's time splits between the project's Python, Triton's launch path and torch's bindings (the torch
    profiler sees only torch operations and lumps the rest into the autograd nodes' self time). ``device`` "cpu":
    tests, with stubbed kernels."""
    import cProfile
    import io
    import pstats

    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    _, forward_backward = scan_calls(backend, shape, length, device)
    for _ in range(5):
        forward_backward()
    synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(iters):
        forward_backward()
    profiler.disable()
    synchronize()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    text.write(f"cProfile, {iters} forward+backward calls (times in the table are totals; divide by {iters})\n")
    stats.sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--backends", nargs="+", default=["triton", "triton_v1", "triton_v3"])  # triton: v2
    parser.add_argument("--cuda", action="store_true", help="real kernels on the GPU (see the module docstring)")
    parser.add_argument("--python-profile", type=int, default=0, metavar="TOP",
                        help="with --cuda: also print the TOP Python functions by own time (cProfile)")
    args = parser.parse_args(argv)
    if args.cuda:
        print(f"host time per call with the real kernels, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              "(128, 768, 16, L=50), bf16")
        for backend in args.backends:
            row = measure_cuda(backend, min(args.iters, 200))
            print(f"\n{backend}: enqueue fwd {row['fwd_us']:.1f} us, fwd+bwd {row['fwd_bwd_us']:.1f} us; "
                  f"synchronizing calls per fwd+bwd: {row['syncs']}")
            print("| op (host self time per fwd+bwd) | us | calls |\n|---|---|---|")
            for name, us, calls in row["top_ops"]:
                print(f"| {name} | {us:.1f} | {calls:g} |", flush=True)
            if args.python_profile:
                print(python_profile(backend, args.python_profile), flush=True)
        return
    print(f"host time per call, kernels stubbed, torch {torch.__version__} on the CPU, L=50, bf16")
    print("| backend | fwd us | fwd+bwd us |\n|---|---|---|")
    for backend in args.backends:
        row = measure(backend, args.iters)
        print(f"| {backend} | {row['fwd_us']:.1f} | {row['fwd_bwd_us']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
