"""Launching the scan's Triton kernels through their compiled handles.

``kernel[grid](*args)`` runs Triton's whole launch path every call: argument binding, specialisation of every
argument, a cache-key string built from the options, a dictionary look-up, launch metadata. For a scan of L=50 at
batch 128 the GPU work takes less time than the host needs to enqueue it, so that path is part of the wall clock.
``compiled_launcher(kernel)[grid](*args)`` does the same launch: the first call with a given specialisation goes
through Triton (compiling if needed) and keeps the compiled kernel it returns; later calls with the same
specialisation call that kernel's launcher directly.

The specialisation key here is at least as fine as Triton's own: every tensor's dtype and 16-byte alignment, every
integer's (== 1, divisible by 16, 32- or 64-bit) class, booleans, the keyword arguments (constexprs and launch
options) and the device. Two calls Triton would compile apart never share an entry, so a hit launches exactly the
kernel Triton would have chosen (``tests/test_scan_launch.py`` checks that on a GPU). Triton's process-wide
settings (``knobs``: debug, instrumentation, environment) are taken as fixed while a process runs.

Triton's path is kept whenever its launch hooks are set (profilers such as proton use them), off CUDA (the
interpreter, CPU tensors) and for anything that is not a ``triton.JITFunction`` (e.g. a test's stub).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

_INT32_MIN, _INT32_MAX, _INT64_MAX = -(2 ** 31), 2 ** 31 - 1, 2 ** 63 - 1


def argument_key(arg: Any) -> Any:
    """What of one kernel argument can change the kernel Triton compiles for it."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool):  # before int: a bool is an int
        return arg
    if isinstance(arg, int):
        return arg == 1, arg % 16 == 0, _INT32_MIN <= arg <= _INT32_MAX, arg <= _INT64_MAX
    if isinstance(arg, float):
        return float
    return arg  # None, or a value Triton treats as a constant


def hook_set(hook: Any) -> bool:
    """Whether a Triton launch hook would run: Triton keeps each as a chain of callables (empty unless a profiler
    added one); a plain callable assigned in its place counts as set."""
    return hook is not None and bool(getattr(hook, "calls", True))


class CompiledLaunch:
    """``kernel[grid](...)`` with Triton's per-call launch path replaced by a look-up of the compiled kernel."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.direct = isinstance(kernel, JITFunction)
        if self.direct:
            params = kernel.params
            self.names = tuple(p.name for p in params)
            self.defaults = {p.name: p.default for p in params if p.has_default}
        # specialisation key -> (launcher, CUfunction, packed metadata, constexpr values after the positionals)
        self.compiled: dict[tuple, tuple[Callable[..., Any], Any, Any, tuple[Any, ...]]] = {}

    def __getitem__(self, grid: Sequence[int]) -> Callable[..., None]:
        return functools.partial(self.launch, grid)

    def key(self, device: int, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple:
        return device, tuple(map(argument_key, args)), tuple(kwargs.items())

    def launch(self, grid: Sequence[int], *args: Any, **kwargs: Any) -> None:
        if (not self.direct or not getattr(args[0], "is_cuda", False) or hook_set(knobs.runtime.launch_enter_hook)
                or hook_set(knobs.runtime.launch_exit_hook)):
            self.kernel[grid](*args, **kwargs)
            return
        device = driver.active.get_current_device()
        key = self.key(device, args, kwargs)
        entry = self.compiled.get(key)
        if entry is None:
            compiled = self.kernel[grid](*args, **kwargs)  # Triton's own launch, compiling on a miss
            tail = tuple(kwargs[name] if name in kwargs else self.defaults[name] for name in self.names[len(args):])
            self.compiled[key] = (compiled.run, compiled.function, compiled.packed_metadata, tail)
            return
        run, function, metadata, tail = entry
        grid_y = grid[1] if len(grid) > 1 else 1
        grid_z = grid[2] if len(grid) > 2 else 1
        run(grid[0], grid_y, grid_z, driver.active.get_current_stream(device), function, metadata, None, None, None,
            *args, *tail)  # no launch metadata or hooks: none are set


# Host-side integer helpers for every launcher: triton.cdiv and triton.next_power_of_2 are constexpr functions
# (Triton 3.6 and 3.8) whose host calls cost about 5 us each on the development machine, against 0.07 us for the
# integer arithmetic; a scan's forward + backward computed a dozen, an attention block's three launches three.
def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.cache
def compiled_launcher(kernel: Any) -> CompiledLaunch:
    """The ``CompiledLaunch`` of a kernel, one per kernel object (its compiled handles live as long as it does)."""
    return CompiledLaunch(kernel)
