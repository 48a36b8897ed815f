"""The "v4" forward (kernels/triton_scan_fwd4.py, parallel over positions) against the float64 reference and
against v1's forward: output, last state and every saved chunk state (compared directly, since the v1 / v2
backward kernels read them), then the gradients of a v4 forward behind which a v1 or v2 backward runs.

Under the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1), compiled on CUDA. Spans are kept
short (block_l 8-32) so that a few positions already cover several spans.
"""

from __future__ import annotations

import os

import pytest
import torch

from kernels.selective_scan_ref import selective_scan_ref
from kernels.testing import TOLERANCES, make_scan_inputs

pytest.importorskip("triton")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(scope="module", autouse=True)
def _interpreter_or_cuda():
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("no CUDA and TRITON_INTERPRET is not 1: run through pytest with tests/conftest.py")


def _forward(inp, groups, softplus, reverse, config):
    from kernels.selective_scan_triton import _as_grouped
    from kernels.triton_scan_fwd import selective_scan_fwd_launch

    B, C = _as_grouped(inp["B"], groups), _as_grouped(inp["C"], groups)
    return selective_scan_fwd_launch(inp["u"], inp["delta"], inp["A"], B, C, inp["D"], inp["z"], inp["delta_bias"],
                                     softplus, reverse, True, config)


# (L, dim, N, groups, dtype, with_optional, softplus, reverse, block_d, block_l, chunk): L=1, L a multiple of
# neither the span nor the chunk, L over several spans, spans shorter than the chunk (block_l 2 < chunk 4) and a
# chunk of 1, dim a multiple of no block, N 1 / 4 / 16 / a non-power of two, groups 1 and 2, the optional inputs
# and softplus on and off, both directions, every dtype.
CASES = [
    (1, 3, 1, None, torch.float32, True, True, False, 4, 8, 1),
    (1, 6, 4, 2, torch.float32, True, True, True, 4, 8, 4),
    (37, 6, 4, 2, torch.float32, True, True, False, 4, 16, 4),
    (37, 6, 4, 2, torch.float32, True, True, True, 4, 16, 4),
    (45, 5, 16, None, torch.float32, False, False, False, 2, 8, 2),
    (45, 5, 16, None, torch.float32, False, False, True, 8, 32, 8),
    (21, 7, 3, None, torch.float32, True, False, True, 4, 2, 4),
    (19, 10, 16, 2, torch.bfloat16, True, True, False, 4, 8, 4),
    (19, 10, 4, None, torch.bfloat16, True, True, True, 8, 16, 4),
    (26, 6, 16, None, torch.float16, True, True, True, 2, 8, 4),
    (26, 6, 1, 2, torch.float16, False, True, False, 4, 16, 1),
]


@pytest.mark.parametrize("length,dim,n_state,groups,dtype,with_optional,softplus,reverse,block_d,block_l,chunk",
                         CASES)
def test_v4_forward_matches_reference_and_v1(length, dim, n_state, groups, dtype, with_optional, softplus, reverse,
                                             block_d, block_l, chunk):
    from kernels.triton_scan_common import ScanLaunchConfig

    inp = make_scan_inputs(2, dim, length, n_state, groups=groups, dtype=dtype, seed=length * 13 + dim,
                           device=DEVICE, with_optional=with_optional, delta_softplus=softplus)
    g = groups or 1
    out, last, states = _forward(inp, g, softplus, reverse,
                                 ScanLaunchConfig(block_d, chunk, variant="v4", block_l=block_l))
    out1, last1, states1 = _forward(inp, g, softplus, reverse, ScanLaunchConfig(4, chunk))
    ref, last_ref = selective_scan_ref(**{k: v.double() if v is not None else None for k, v in inp.items()},
                                       delta_softplus=softplus, return_last_state=True, reverse=reverse)
    rtol, atol = TOLERANCES[dtype]
    assert out.dtype == dtype and last.dtype == torch.float32 and states.dtype == torch.float32
    assert states.shape == states1.shape == (2, -(-length // chunk), n_state, dim)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(last.double(), last_ref, rtol=rtol, atol=atol)
    # Against v1 (the same float32 arithmetic in another order): the saved states are what the backward reads.
    torch.testing.assert_close(last, last1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states, states1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.float(), out1.float(), rtol=rtol, atol=atol)
    # The state entering the first chunk in scan order is zero.
    assert not states[:, -1 if reverse else 0].any()


def test_v4_saved_states_are_the_reference_states_at_chunk_entries():
    """Chunk c's saved state is the float64 reference's state entering it (scan order), both directions."""
    from kernels.triton_scan_common import ScanLaunchConfig

    length, chunk = 23, 4
    inp = make_scan_inputs(1, 3, length, 4, groups=None, dtype=torch.float32, seed=4, device=DEVICE)
    for reverse in (False, True):
        _, _, states = _forward(inp, 1, True, reverse, ScanLaunchConfig(2, chunk, variant="v4", block_l=8))
        dinp = {k: v.double().cpu() for k, v in inp.items() if v is not None}
        for c in range(states.shape[1]):
            # The state entering chunk c is the last state of the scan over the positions before it.
            before = slice(0, c * chunk) if not reverse else slice((c + 1) * chunk, length)
            part = {k: (v[..., before] if k in ("u", "delta", "z", "B", "C") else v) for k, v in dinp.items()}
            if part["u"].shape[-1] == 0:
                want = torch.zeros(1, 3, 4, dtype=torch.float64)
            else:
                _, want = selective_scan_ref(**part, delta_softplus=True, return_last_state=True, reverse=reverse)
            torch.testing.assert_close(states[:, c].transpose(-1, -2).double().cpu(), want, rtol=1e-5, atol=1e-5)


# (bwd variant, L, dim, N, groups, dtype, with_optional, softplus, reverse, block_l)
GRAD_CASES = [
    ("v1", 29, 6, 4, 2, torch.float32, True, True, False, 8),
    ("v1", 29, 6, 4, None, torch.float32, True, True, True, 16),
    ("v2", 19, 5, 16, None, torch.float32, False, False, True, 8),
    ("v2", 21, 8, 4, 2, torch.bfloat16, True, True, False, 16),
]


@pytest.mark.parametrize("bwd_variant,length,dim,n_state,groups,dtype,with_optional,softplus,reverse,block_l",
                         GRAD_CASES)
def test_v4_forward_with_v1_or_v2_backward_gradients(bwd_variant, length, dim, n_state, groups, dtype,
                                                    with_optional, softplus, reverse, block_l):
    from kernels.selective_scan_triton import selective_scan_triton
    from kernels.triton_scan_common import ScanLaunchConfig

    inp = make_scan_inputs(2, dim, length, n_state, groups=groups, dtype=dtype, seed=length + dim, device=DEVICE,
                           requires_grad=True, with_optional=with_optional, delta_softplus=softplus)
    fwd = ScanLaunchConfig(4, 4, variant="v4", block_l=block_l)
    bwd = ScanLaunchConfig(4, 4, variant=bwd_variant)
    kw = dict(delta_softplus=softplus, return_last_state=True, reverse=reverse)
    out, last = selective_scan_triton(**inp, **kw, fwd_config=fwd, bwd_config=bwd)
    ref_inp = {k: v.detach().double().requires_grad_() if v is not None else None for k, v in inp.items()}
    out_ref, last_ref = selective_scan_ref(**ref_inp, **kw)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), out_ref, rtol=rtol, atol=atol)
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    g_out = torch.randn(out.shape, generator=gen, device=DEVICE, dtype=torch.float64).to(dtype)
    g_last = torch.randn(last.shape, generator=gen, device=DEVICE, dtype=torch.float64).float()
    names = [k for k, v in inp.items() if v is not None]
    grads = torch.autograd.grad((out * g_out).sum() + (last * g_last).sum(), [inp[k] for k in names])
    want = torch.autograd.grad((out_ref * g_out.double()).sum() + (last_ref * g_last.double()).sum(),
                               [ref_inp[k] for k in names])
    # Tolerances as kernels.testing's GRAD_FACTORS / WEIGHT_TOL, at their largest.
    for name, got, ref in zip(names, grads, want):
        assert got.dtype == inp[name].dtype, name
        factor = 5 if name == "delta" else 2
        w_tol = (max(1e-3, rtol), max(5e-3, 5 * atol)) if name in ("A", "D", "delta_bias") else None
        r, a = w_tol if w_tol else (rtol * factor, atol * 2 * factor)
        torch.testing.assert_close(got.double(), ref, rtol=r, atol=a, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_v4_configs_and_defaults():
    from kernels.selective_scan_triton import (
        config_from_ints,
        config_to_ints,
        launch_configs,
        variant_configs,
    )
    from kernels.triton_scan_common import ScanLaunchConfig, launch_options

    cfg = ScanLaunchConfig(8, 4, variant="v4", block_l=256)
    assert config_from_ints(config_to_ints(cfg)) == cfg
    assert launch_options(cfg)["num_warps"] == 4
    assert launch_options(ScanLaunchConfig(8, 4, variant="v4", block_l=32))["num_warps"] == 1
    with pytest.raises(ValueError, match="power of two"):
        ScanLaunchConfig(8, 4, variant="v4", block_l=96)
    # v4 has no backward kernel: a v4 backward config is refused, and its defaults run the v2 backward.
    with pytest.raises(ValueError, match="no backward"):
        launch_configs(16, 100, cfg, cfg)
    fwd, bwd = variant_configs("v4", 16, 4096, 16 * 768, torch.device("cpu"))
    assert (fwd.variant, bwd.variant, fwd.chunk, bwd.chunk) == ("v4", "v2", 4, 4)
    assert fwd.block_l % fwd.chunk == 0
    # The defaults are DEFAULT_VARIANT's (v2), forward and backward; v4 is never chosen by default.
    assert [c.variant for c in launch_configs(16, 100, None, None)] == ["v2", "v2"]
