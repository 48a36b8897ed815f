"""Reference and chunked selective scan: definition checks, gradcheck, and chunked-vs-reference parity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.selective_scan_chunked import selective_scan_chunked
from kernels.selective_scan_interface import resolve_backend, selective_scan_fn
from kernels.selective_scan_ref import selective_scan_ref
from kernels.testing import make_scan_inputs


def _closed_form(u, delta, A, B, C, D, z, delta_bias):
    """y[l] = sum_{s<=l} C[l] . (prod_{r=s+1..l} exp(dt[r] A)) dt[s] B[s] u[s]; written without recursion."""
    dt = F.softplus(delta + delta_bias[:, None])
    batch, dim, length = u.shape
    out = torch.zeros_like(u)
    for l_pos in range(length):
        for s in range(l_pos + 1):
            decay = torch.exp(dt[:, :, s + 1 : l_pos + 1, None] * A[None, :, None, :]).prod(dim=2)
            contrib = decay * (dt[:, :, s] * u[:, :, s])[..., None] * B[:, None, :, s]
            out[:, :, l_pos] += (contrib * C[:, None, :, l_pos]).sum(-1)
    out = out + u * D[:, None]
    return out * F.silu(z)


def test_reference_matches_closed_form():
    inp = make_scan_inputs(2, 3, 6, 4, groups=None, dtype=torch.float64, seed=1)
    got = selective_scan_ref(**inp, delta_softplus=True)
    want = _closed_form(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"], inp["delta_bias"])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("groups", [None, 2])
def test_reverse_is_forward_on_flipped_sequence(groups):
    inp = make_scan_inputs(2, 4, 7, 3, groups=groups, dtype=torch.float64, seed=2)
    out_r, last_r = selective_scan_ref(**inp, delta_softplus=True, return_last_state=True, reverse=True)
    flipped = {k: (v.flip(-1) if k in ("u", "delta", "z", "B", "C") else v) for k, v in inp.items()}
    out_f, last_f = selective_scan_ref(**flipped, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out_r, out_f.flip(-1))
    torch.testing.assert_close(last_r, last_f)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("groups", [None, 2])
def test_gradcheck_reference_float64(reverse, groups):
    inp = make_scan_inputs(1, 2, 4, 2, groups=groups, dtype=torch.float64, seed=3, requires_grad=True)
    names = list(inp)

    def fn(*tensors):
        kwargs = dict(zip(names, tensors))
        out, last = selective_scan_ref(**kwargs, delta_softplus=True, return_last_state=True, reverse=reverse)
        return out, last

    assert torch.autograd.gradcheck(fn, tuple(inp.values()), eps=1e-6, atol=1e-7)


CHUNKED_CASES = [
    # (L, chunk, groups, with_optional, softplus, reverse)
    (1, None, None, True, True, False),
    (1, None, 2, False, False, True),
    (13, 4, None, True, True, False),
    (13, 4, 2, True, False, True),
    (16, 16, None, False, True, True),
    (33, None, 2, True, True, False),
    (33, 5, None, True, True, True),
]


@pytest.mark.parametrize("length,chunk,groups,with_optional,softplus,reverse", CHUNKED_CASES)
def test_chunked_matches_reference_with_grads(length, chunk, groups, with_optional, softplus, reverse):
    inp = make_scan_inputs(2, 4, length, 4, groups=groups, dtype=torch.float64, seed=length,
                           requires_grad=True, with_optional=with_optional, delta_softplus=softplus)
    kw = dict(delta_softplus=softplus, return_last_state=True, reverse=reverse)
    out_ref, last_ref = selective_scan_ref(**inp, **kw)
    out_chk, last_chk = selective_scan_chunked(**inp, **kw, chunk=chunk)
    torch.testing.assert_close(out_chk, out_ref)
    torch.testing.assert_close(last_chk, last_ref)
    g_out = torch.randn_like(out_ref)
    g_last = torch.randn_like(last_ref)
    tensors = [t for t in inp.values() if t is not None]
    grads_ref = torch.autograd.grad((out_ref * g_out).sum() + (last_ref * g_last).sum(), tensors)
    grads_chk = torch.autograd.grad((out_chk * g_out).sum() + (last_chk * g_last).sum(), tensors)
    for name, a, b in zip([k for k, v in inp.items() if v is not None], grads_chk, grads_ref):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_dtype_follows_input_and_state_is_float32(dtype):
    inp = make_scan_inputs(1, 4, 9, 4, groups=None, dtype=dtype, seed=5)
    for backend in ("reference", "chunked"):
        out, last = selective_scan_fn(**inp, delta_softplus=True, return_last_state=True, backend=backend)
        assert out.dtype == dtype and last.dtype == torch.float32
    ref64 = selective_scan_ref(**{k: (v.double() if v is not None else None) for k, v in inp.items()},
                               delta_softplus=True)
    torch.testing.assert_close(out.double(), ref64, rtol=3e-2, atol=5e-2)


def test_auto_backend_on_cpu_is_chunked_and_matches_reference():
    assert resolve_backend("auto", torch.device("cpu")) == "chunked"
    inp = make_scan_inputs(2, 4, 10, 4, groups=None, dtype=torch.float32, seed=6)
    torch.testing.assert_close(selective_scan_fn(**inp), selective_scan_ref(**inp), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    inp = make_scan_inputs(2, 4, 10, 4, groups=None, dtype=torch.float32, seed=7)
    with pytest.raises(ValueError, match="unknown backend"):
        selective_scan_fn(**inp, backend="cuda_magic")
    with pytest.raises(ValueError, match="delta must have u's shape"):
        selective_scan_fn(**{**inp, "delta": inp["delta"][:, :, :5]})
    with pytest.raises(ValueError, match="groups dividing dim"):
        selective_scan_fn(**{**inp, "B": torch.randn(2, 3, 4, 10)})
    with pytest.raises(ValueError, match="A must be"):
        selective_scan_fn(**{**inp, "A": torch.randn(5, 4)})
    with pytest.raises(ValueError, match="L must be at least 1"):
        empty = make_scan_inputs(1, 4, 1, 4, groups=None, dtype=torch.float32, seed=8)
        selective_scan_fn(**{k: (v[..., :0] if v is not None and v.dim() == 3 else v) for k, v in empty.items()})


def test_optional_package_backends_say_what_is_missing(monkeypatch: pytest.MonkeyPatch):
    """mamba-ssm absent (as in CI, and forced here where it is present): the named backend says so, in eager code."""
    import kernels.selective_scan_interface as interface

    monkeypatch.setattr(interface, "mamba_ssm_available", lambda: False)
    inp = make_scan_inputs(1, 4, 6, 4, groups=None, dtype=torch.float32, seed=9)
    with pytest.raises(RuntimeError, match="mamba_ssm is not installed"):
        selective_scan_fn(**inp, backend="mamba_ssm")


def test_importing_kernels_leaves_dynamo_out():
    """Importing the kernels alone does not import torch._dynamo (about 1.7 s of a process's start here)."""
    import subprocess
    import sys

    code = "import sys, kernels; print('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
