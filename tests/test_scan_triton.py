"""Triton selective scan vs the float64 reference: outputs, last state and every gradient.

On a machine without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before anything imports triton) at tiny sizes; with CUDA the same cases run
compiled, plus the larger ``gpu``-marked cases.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels.selective_scan_ref import selective_scan_ref
from kernels.testing import check_against_reference, make_scan_inputs

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

def _config(block_d, chunk, variant="v1"):
    from kernels.triton_scan_common import ScanLaunchConfig

    return ScanLaunchConfig(block_d=block_d, chunk=chunk, variant=variant)


def _default_configs(triton_scan, variant, n_state, length, rows):
    """The default tiles (as selective_scan_triton picks them on this device) in ``variant``; None for v1
    (the call then takes its own defaults). "v2t": v2's with chunk tiles (ScanLaunchConfig.tile_io); "v2x": v2's
    with the backward on channel-last copies (ScanLaunchConfig.transpose_io)."""
    if variant == "v1":
        return None
    if variant == "v2t":  # tiles both ways, no copies
        configs = triton_scan.variant_configs("v2", n_state, length, rows, torch.device(DEVICE))
        return tuple(dataclasses.replace(c, tile_io=True, transpose_io=False) for c in configs)
    if variant in ("v2x", "v2g"):  # v2g: and the gradients written as contiguous tiles (tile_grads)
        fwd, bwd = triton_scan.variant_configs("v2", n_state, length, rows, torch.device(DEVICE))
        return fwd, dataclasses.replace(bwd, transpose_io=True, tile_grads=variant == "v2g")
    return triton_scan.variant_configs(variant, n_state, length, rows, torch.device(DEVICE))


VARIANTS = ["v1", "v2", "v3"]


# (L, dim, N, groups, dtype, with_optional, softplus, reverse, block_d, chunk). Interpreter-sized: each
# case covers several of the axes (L=1, L % chunk != 0, L spanning several chunks, dim % block != 0,
# N in {1, 3, 4, 16}, groups 1/2, optional inputs on/off, softplus on/off, reverse on/off, dtypes) for the
# kernels at every lane split (block_d 4/8/16/32 = 8/4/2/1 lanes per channel) and the defaults
# (block_d None).
QUICK_CASES = [
    (1, 4, 1, None, torch.float32, True, True, True, 8, 1),
    (13, 6, 4, 2, torch.float32, True, True, True, 4, 4),
    (29, 10, 16, None, torch.float32, False, False, False, 8, 8),
    (20, 5, 3, None, torch.float32, True, False, True, 16, 8),
    (11, 40, 4, 2, torch.bfloat16, True, True, False, 32, 4),
    (9, 6, 16, None, torch.float16, True, True, False, 8, 2),
    (37, 4, 4, None, torch.float32, True, True, False, None, None),
    (37, 4, 4, 2, torch.float32, True, True, True, None, None),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("length,dim,n_state,groups,dtype,with_optional,softplus,reverse,block_d,chunk",
                         QUICK_CASES)
def test_triton_matches_reference(triton_scan, variant, length, dim, n_state, groups, dtype, with_optional,
                                  softplus, reverse, block_d, chunk):
    if block_d is None:
        config = _default_configs(triton_scan, variant, n_state, length, rows=2 * dim)
    else:
        config = _config(block_d, chunk, variant)
    check_against_reference(triton_scan, device=DEVICE, batch=2, dim=dim, length=length, n_state=n_state,
                            groups=groups, dtype=dtype, with_optional=with_optional, softplus=softplus,
                            reverse=reverse, seed=length * 7 + dim, config=config)


@pytest.mark.parametrize("fwd_block_d,bwd_block_d,fwd_variant,bwd_variant",
                         [(4, 8, "v1", "v1"), (16, 4, "v1", "v1"), (4, 8, "v2", "v1"), (16, 4, "v1", "v2"),
                          (32, 8, "v3", "v1"), (16, 32, "v2", "v3"), (64, 16, "v3", "v3"), (32, 64, "v3", "v3")])
def test_triton_forward_and_backward_tiles_differ(triton_scan, fwd_block_d, bwd_block_d, fwd_variant, bwd_variant):
    """The backward reads the forward's chunk-entry states whatever block_d and variant each direction uses."""
    config = (_config(fwd_block_d, 4, fwd_variant), _config(bwd_block_d, 4, bwd_variant))
    check_against_reference(triton_scan, device=DEVICE, batch=2, dim=6, length=19, n_state=4, groups=2,
                            dtype=torch.float32, with_optional=True, softplus=True,
                            reverse=fwd_block_d > bwd_block_d, seed=5, config=config)


@pytest.mark.parametrize("length,groups,reverse,chunk,variant", [
    (1, None, False, 1, "v1"), (23, 2, True, 4, "v1"), (37, None, False, 4, "v1"), (30, 2, True, 2, "v1"),
    (1, None, False, 1, "v2"), (23, 2, True, 4, "v2"), (1, None, False, 1, "v3"), (23, 2, True, 4, "v3"),
    (30, 2, True, 2, "v3")])  # more v2 prefetch in FULL_TILE_CASES
def test_triton_prefetch(triton_scan, length, groups, reverse, chunk, variant):
    """The backward that loads the next chunk's inputs ahead: one chunk, a partial last chunk, many chunks."""
    from kernels.triton_scan_common import ScanLaunchConfig

    block_d = 32 if variant == "v3" else 8  # v3: one lane per channel, 22 of 32 lanes masked at dim 10
    fwd = ScanLaunchConfig(block_d, chunk, variant=variant)
    bwd = ScanLaunchConfig(block_d, chunk, prefetch=True, variant=variant)
    check_against_reference(triton_scan, device=DEVICE, batch=2, dim=10, length=length, n_state=4,
                            groups=groups, dtype=torch.float32, with_optional=True, softplus=True,
                            reverse=reverse, seed=length + chunk, config=(fwd, bwd))


# The v3 forward reads u / delta / z and writes out as tiles of ``tile_l`` positions (ScanLaunchConfig.tile_l):
# (L, chunk, tile_l, forward segments, reverse). A tile of one chunk, of several chunks with a partial last tile,
# longer than the sequence, tiles that straddle segment ends (segments of 5 chunks in tiles of 2 or 4), reverse.
V3_TILE_CASES = [
    (19, 4, 4, 1, False), (45, 2, 8, 1, True), (7, 4, 32, 1, False), (37, 2, 4, 4, True), (37, 2, 8, 4, False),
]


@pytest.mark.parametrize("length,chunk,tile_l,fwd_segments,reverse", V3_TILE_CASES)
def test_triton_v3_forward_tiles(triton_scan, length, chunk, tile_l, fwd_segments, reverse):
    from kernels.triton_scan_common import ScanLaunchConfig

    fwd = ScanLaunchConfig(32, chunk, variant="v3", segments=fwd_segments, tile_l=tile_l)
    bwd = ScanLaunchConfig(32, chunk, variant="v3")
    check_against_reference(triton_scan, device=DEVICE, batch=2, dim=6, length=length, n_state=4, groups=2,
                            dtype=torch.float32, with_optional=True, softplus=True, reverse=reverse,
                            seed=length + tile_l, config=(fwd, bwd))


# v2 only: channel blocks that fill the group (EVEN_D) and N a power of two (EVEN_N), where the v2 kernels
# drop every channel / state mask; (L, dim, N, groups, dtype, with_optional, softplus, reverse, block_d, prefetch).
FULL_TILE_CASES = [
    (21, 16, 16, 2, torch.float32, True, True, False, 8, False),
    (10, 32, 4, None, torch.bfloat16, False, False, True, 16, True),
    (7, 8, 1, None, torch.float32, True, True, True, 4, False),
    (9, 64, 16, 2, torch.float32, True, True, True, 32, True),
]


@pytest.mark.parametrize("length,dim,n_state,groups,dtype,with_optional,softplus,reverse,block_d,prefetch",
                         FULL_TILE_CASES)
def test_triton_v2_full_tiles(triton_scan, length, dim, n_state, groups, dtype, with_optional, softplus, reverse,
                              block_d, prefetch):
    from kernels.triton_scan_common import ScanLaunchConfig

    config = (ScanLaunchConfig(block_d, 4, variant="v2"), ScanLaunchConfig(block_d, 4, prefetch=prefetch, variant="v2"))
    check_against_reference(triton_scan, device=DEVICE, batch=2, dim=dim, length=length, n_state=n_state,
                            groups=groups, dtype=dtype, with_optional=with_optional, softplus=softplus,
                            reverse=reverse, seed=length + dim, config=config)


def test_triton_forward_only_and_no_last_state(triton_scan):
    inp = make_scan_inputs(2, 4, 10, 4, groups=None, dtype=torch.float32, seed=11, device=DEVICE)
    with torch.no_grad():
        out = triton_scan.selective_scan_triton(**inp, delta_softplus=True)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, selective_scan_ref(**inp, delta_softplus=True), rtol=6e-4, atol=2e-3)


def test_triton_rejects_mismatched_chunks(triton_scan):
    from kernels.triton_scan_common import ScanLaunchConfig

    inp = make_scan_inputs(1, 4, 10, 4, groups=None, dtype=torch.float32, seed=12, device=DEVICE)
    with pytest.raises(ValueError, match="backward chunk"):
        triton_scan.selective_scan_triton(**inp, fwd_config=ScanLaunchConfig(4, 8),
                                          bwd_config=ScanLaunchConfig(4, 4))
    with pytest.raises(ValueError, match="power of two"):
        ScanLaunchConfig(block_d=3, chunk=8)
    with pytest.raises(ValueError, match="power of two"):
        ScanLaunchConfig(block_d=8, chunk=0)
    with pytest.raises(ValueError, match="one warp per program"):
        ScanLaunchConfig(block_d=64, chunk=8)
    with pytest.raises(ValueError, match="one warp per program"):
        ScanLaunchConfig(block_d=256, chunk=8, variant="v3")
    with pytest.raises(ValueError, match="variant"):
        ScanLaunchConfig(block_d=8, chunk=4, variant="v5")


GPU_SHAPES = [
    # (batch, dim, L, N, groups)
    (2, 24, 1, 16, None),
    (2, 100, 197, 16, None),
    (2, 64, 1000, 4, 2),
    (1, 40, 4096, 16, None),
    (3, 48, 63, 1, 2),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,dim,length,n_state,groups", GPU_SHAPES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("variant", VARIANTS + ["v2t", "v2x", "v2g"])
def test_triton_gpu_shapes(triton_scan, dtype, batch, dim, length, n_state, groups, reverse, variant):
    """The default tiles in every dtype, in each kernel variant."""
    config = _default_configs(triton_scan, variant, n_state, length, rows=batch * dim)
    for with_optional, softplus in ((True, True), (False, False)):
        check_against_reference(triton_scan, device=DEVICE, batch=batch, dim=dim, length=length,
                                n_state=n_state, groups=groups, dtype=dtype, with_optional=with_optional,
                                softplus=softplus, reverse=reverse, seed=length + dim, config=config)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("fwd_block_d,block_d,chunk", [(4, 4, 4), (16, 4, 8), (32, 8, 4), (8, 8, 8), (32, 16, 4),
                                                       (32, 32, 2), (64, 64, 4)])
@pytest.mark.parametrize("variant,dim", [("v1", 100), ("v2", 100), ("v2", 128), ("v3", 100), ("v3", 128)])
def test_triton_gpu_tile_configs(triton_scan, fwd_block_d, block_d, chunk, variant, dim):
    """The tiles the benchmark sweeps (every forward block_d, every backward tile), compiled, in
    bf16 at a Mamba block's settings; v2 also with full channel blocks (dim 128). block_d 64 is v3's only:
    v1 / v2 programs are one warp, and their configuration refuses it."""
    if variant != "v3" and max(fwd_block_d, block_d) > 32:
        with pytest.raises(ValueError, match="block_d is at most 32"):
            _config(max(fwd_block_d, block_d), chunk, variant)
        return
    config = (_config(fwd_block_d, chunk, variant), _config(block_d, chunk, variant))
    check_against_reference(triton_scan, device=DEVICE, batch=2, dim=dim, length=300, n_state=16, groups=None,
                            dtype=torch.bfloat16, with_optional=True, softplus=True, reverse=False,
                            seed=block_d + chunk, config=config)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("maxnreg,reverse,prefetch,variant", [
    (168, True, False, "v1"), (128, False, False, "v1"), (None, True, True, "v1"), (200, False, True, "v1"),
    (None, True, True, "v2"), (None, False, False, "v2"), (200, False, True, "v2"), (None, True, True, "v3"),
    (None, False, False, "v3")])
def test_triton_gpu_register_caps_and_prefetch(triton_scan, maxnreg, reverse, prefetch, variant):
    """Register caps and the prefetching backward as the benchmark sweeps them, compiled, in bf16."""
    from kernels.triton_scan_common import ScanLaunchConfig

    block_d = 32 if variant == "v3" else 16
    fwd = ScanLaunchConfig(block_d, 4, variant=variant)
    bwd = ScanLaunchConfig(block_d, 4, maxnreg=maxnreg, prefetch=prefetch, variant=variant)
    check_against_reference(triton_scan, device=DEVICE, batch=2, dim=100, length=1000, n_state=16, groups=2,
                            dtype=torch.bfloat16, with_optional=True, softplus=True, reverse=reverse,
                            seed=maxnreg or 1, config=(fwd, bwd))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_public_auto_backend_uses_triton_on_cuda():
    from kernels.selective_scan_interface import resolve_backend, selective_scan_fn

    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    inp = make_scan_inputs(2, 64, 300, 16, groups=None, dtype=torch.bfloat16, seed=3, device="cuda")
    out = selective_scan_fn(**inp, delta_softplus=True)
    ref = selective_scan_fn(**inp, delta_softplus=True, backend="chunked")
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=5e-2)


@pytest.mark.parametrize("backend", ["triton_v2", "triton_v3", "triton_v4"])
def test_public_variant_backends_match_reference(triton_scan, backend):
    """selective_scan_fn(backend="triton_v2" / "triton_v3" / "triton_v4"): the opt-in kernel variants through the public
    function, forward and gradients against the float64 reference (on CPU under the interpreter)."""
    from kernels.selective_scan_interface import selective_scan_fn

    inp = make_scan_inputs(2, 40, 13, 4, groups=None, dtype=torch.float32, seed=21, device=DEVICE,
                           requires_grad=True)
    out = selective_scan_fn(**inp, delta_softplus=True, reverse=True, backend=backend)
    ref_inp = {k: v.detach().double().requires_grad_() for k, v in inp.items() if v is not None}
    ref = selective_scan_ref(**ref_inp, delta_softplus=True, reverse=True)
    torch.testing.assert_close(out.double(), ref, rtol=6e-4, atol=2e-3)
    grads = torch.autograd.grad(out.sum(), [inp["u"], inp["delta"], inp["B"]])
    grads_ref = torch.autograd.grad(ref.sum(), [ref_inp["u"], ref_inp["delta"], ref_inp["B"]])
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got.double(), want, rtol=3e-3, atol=2e-2)
