"""kernels/triton_launch.py: the scan kernels launched through their compiled handles.

On the CPU the direct path runs against a stand-in for Triton's compiled kernel and driver: which calls reuse a
compiled kernel, which compile anew, and the exact arguments the launcher receives. On a GPU the real kernels
run both ways and must give the same results, and every cached entry must be the kernel Triton itself picks.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import kernels.triton_launch as triton_launch
from kernels.triton_launch import CompiledLaunch, argument_key

HAS_CUDA = torch.cuda.is_available()


class _FakeCompiled:
    def __init__(self, serial: int, calls: list) -> None:
        self.function = f"function-{serial}"
        self.packed_metadata = f"metadata-{serial}"
        self.run = lambda *args: calls.append(("direct", *args))


class _FakeKernel:
    """Triton's ``kernel[grid](...)``: launches (recorded) and returns a new compiled kernel each time it runs."""

    def __init__(self) -> None:
        self.calls: list = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(("triton", grid, args, kwargs))
            return _FakeCompiled(len(self.calls), self.calls)
        return launch


class _CudaLike:
    """A tensor argument as the launcher sees it: CUDA-resident, with a dtype and an address."""

    def __init__(self, dtype: torch.dtype, address: int) -> None:
        self.is_cuda, self.dtype, self.address = True, dtype, address


@pytest.fixture
def fake_launch(monkeypatch):
    monkeypatch.setattr(triton_launch, "driver", SimpleNamespace(active=SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda device: 1234)))
    monkeypatch.setattr(triton_launch, "argument_key", lambda arg: (
        (arg.dtype, arg.address % 16 == 0) if isinstance(arg, _CudaLike) else argument_key(arg)))
    kernel = _FakeKernel()
    launch = CompiledLaunch(kernel)
    launch.direct = True  # as for a triton.JITFunction
    launch.names = ("X", "Y", "n", "BLOCK", "FLAG")
    launch.defaults = {"FLAG": False}
    return kernel, launch


def test_argument_key_separates_what_triton_specialises_on():
    t32 = torch.zeros(8, dtype=torch.float32)
    assert argument_key(t32) == argument_key(torch.ones(8, dtype=torch.float32))
    assert argument_key(t32) != argument_key(torch.zeros(8, dtype=torch.bfloat16))
    assert argument_key(t32) != argument_key(t32[1:])  # 4 bytes off a 16-byte boundary
    assert argument_key(1) != argument_key(17)  # 1 is a constant to Triton
    assert argument_key(32) != argument_key(33)  # divisible by 16 or not
    assert argument_key(33) == argument_key(35)
    assert argument_key(2 ** 31 - 1) != argument_key(2 ** 31 + 1)  # i32 vs i64
    assert argument_key(2 ** 63 - 1) != argument_key(2 ** 63 + 1)  # i64 vs u64
    assert argument_key(True) != argument_key(1)
    assert argument_key(None) is None


def test_first_call_goes_through_triton_later_calls_launch_directly(fake_launch):
    kernel, launch = fake_launch
    x, y = _CudaLike(torch.bfloat16, 256), _CudaLike(torch.float32, 512)
    launch[(3, 2)](x, y, 48, BLOCK=8, num_warps=1)
    launch[(5,)](x, y, 64, BLOCK=8, num_warps=1)
    assert [c[0] for c in kernel.calls] == ["triton", "direct"]
    # grid padded to three dimensions, the current stream, the compiled handles of the first call, no launch
    # metadata or hooks, then every argument in signature order: positionals, constexprs, defaults
    assert kernel.calls[1] == ("direct", 5, 1, 1, 1234, "function-1", "metadata-1", None, None, None,
                               x, y, 64, 8, False)


@pytest.mark.parametrize("change", ["dtype", "alignment", "int_one", "int_divisibility", "constexpr", "option"])
def test_a_different_specialisation_compiles_anew(fake_launch, change):
    kernel, launch = fake_launch
    base = dict(x=_CudaLike(torch.bfloat16, 256), n=48, kwargs=dict(BLOCK=8, num_warps=1))
    changed = dict(base, kwargs=dict(base["kwargs"]))
    if change == "dtype":
        changed["x"] = _CudaLike(torch.float16, 256)
    elif change == "alignment":
        changed["x"] = _CudaLike(torch.bfloat16, 258)
    elif change == "int_one":
        changed["n"] = 1
    elif change == "int_divisibility":
        changed["n"] = 50
    elif change == "constexpr":
        changed["kwargs"]["BLOCK"] = 16
    else:
        changed["kwargs"]["num_warps"] = 2
    y = _CudaLike(torch.float32, 512)
    for args in (base, changed, base, changed):
        launch[(1,)](args["x"], y, args["n"], **args["kwargs"])
    assert [c[0] for c in kernel.calls] == ["triton", "triton", "direct", "direct"]
    assert kernel.calls[2][5] == "function-1" and kernel.calls[3][5] == "function-2"


def test_triton_path_kept_off_cuda_and_under_launch_hooks(fake_launch, monkeypatch):
    kernel, launch = fake_launch
    cpu = torch.zeros(4)
    for _ in range(2):
        launch[(1,)](cpu, cpu, 48, BLOCK=8)
    hooks = triton_launch.knobs.runtime.launch_enter_hook
    monkeypatch.setattr(hooks, "calls", [lambda metadata: None])  # as a profiler's hook.add(...)
    assert triton_launch.hook_set(hooks) and not triton_launch.hook_set(type(hooks)())
    x = _CudaLike(torch.bfloat16, 256)
    for _ in range(2):
        launch[(1,)](x, x, 48, BLOCK=8)
    assert [c[0] for c in kernel.calls] == ["triton"] * 4
    assert not launch.compiled


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["triton", "triton_v2", "triton_v3"])
@pytest.mark.parametrize("batch,length", [(4, 50), (2, 1100)])
def test_cached_launch_matches_triton_launch(backend, batch, length, monkeypatch):
    """Forward and backward through the cached handles give what Triton's own launches give, and every cached
    entry that gets launched is the kernel Triton's cache returns for those arguments."""
    from kernels import selective_scan_fn
    from kernels.testing import make_scan_inputs

    hits = []
    launch = CompiledLaunch.launch

    def checked_launch(self, grid, *args, **kwargs):
        entry = self.compiled.get(self.key(torch.cuda.current_device(), args, kwargs))
        if entry is not None and not triton_launch.hook_set(triton_launch.knobs.runtime.launch_enter_hook):
            assert self.kernel.warmup(*args, grid=grid, **kwargs).function == entry[1]
            hits.append(self.kernel)
        launch(self, grid, *args, **kwargs)

    monkeypatch.setattr(CompiledLaunch, "launch", checked_launch)
    inputs = make_scan_inputs(batch, 96, length, 16, groups=None, dtype=torch.bfloat16, seed=length, device="cuda",
                              requires_grad=True)
    dout = torch.randn_like(inputs["u"])

    def run() -> list[torch.Tensor]:
        for t in inputs.values():
            t.grad = None
        out = selective_scan_fn(**inputs, delta_softplus=True, backend=backend)
        out.backward(dout)
        return [out.detach().clone()] + [t.grad.clone() for t in inputs.values()]

    first, cached = run(), run()  # the second forward and backward launch through the cache
    assert len(hits) >= 2
    # Triton's own path: its launch hooks set, as a profiler would
    monkeypatch.setattr(triton_launch.knobs.runtime.launch_enter_hook, "calls", [lambda metadata: None])
    reference = run()
    for name, a, b, c in zip(["out", *inputs], first, cached, reference):
        # The backward sums dA, dB, dC, dD and ddelta_bias with float32 atomics, in no fixed order: the float32
        # sums may differ in their last bits, and dB / dC, cast to bfloat16, by one bfloat16 step.
        if name in ("out", "u", "delta", "z"):
            tol = dict(rtol=0, atol=0)
        elif c.dtype == torch.bfloat16:
            tol = dict(rtol=2 ** -7, atol=1e-5)
        else:
            tol = dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b, c, **tol, msg=name)
        torch.testing.assert_close(a, c, **tol, msg=name)
