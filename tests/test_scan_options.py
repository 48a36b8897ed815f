"""The scan kernels' layout and parallelism options against the float64 reference: v2's chunk tiles (tile_io), the
backward on channel-last copies (transpose_io, tile_grads), and sequence segments (segments) of v2 and v3.

On a machine without CUDA the kernels run under the Triton interpreter (tests/conftest.py); with CUDA the same cases
run compiled, plus the ``gpu``-marked ones.
"""

from __future__ import annotations

import pytest
import torch

from kernels.testing import check_against_reference, make_scan_inputs, with_channel_last_sequences

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# v2 with chunk tiles (ScanLaunchConfig.tile_io): (L, dim, N, groups, dtype, with_optional, reverse, block_d, chunk,
# forward tiles, backward tiles, prefetch). One position, a partial last chunk, many chunks, channel blocks past
# the group's end, no z, reverse, tiles on one side only, and bf16.
TILE_IO_CASES = [
    (1, 6, 4, None, torch.float32, True, False, 8, 4, True, True, False),
    (19, 10, 4, 2, torch.float32, True, True, 8, 4, True, True, True),
    (29, 16, 16, None, torch.float32, False, False, 16, 4, True, True, True),
    (13, 6, 3, None, torch.float32, True, True, 4, 2, True, False, False),
    (21, 12, 16, 2, torch.float32, True, False, 16, 8, False, True, True),
    (37, 32, 16, None, torch.bfloat16, True, True, 8, 4, True, True, False),
]


@pytest.mark.parametrize("length,dim,n_state,groups,dtype,with_optional,reverse,block_d,chunk,fwd_tiles,bwd_tiles,"
                         "prefetch", TILE_IO_CASES)
def test_triton_v2_tile_io(triton_scan, length, dim, n_state, groups, dtype, with_optional, reverse, block_d, chunk,
                           fwd_tiles, bwd_tiles, prefetch):
    from kernels.triton_scan_common import ScanLaunchConfig

    fwd = ScanLaunchConfig(block_d, chunk, variant="v2", tile_io=fwd_tiles)
    bwd = ScanLaunchConfig(block_d, chunk, prefetch=prefetch, variant="v2", tile_io=bwd_tiles)
    check_against_reference(triton_scan, device=DEVICE, batch=2, dim=dim, length=length, n_state=n_state,
                            groups=groups, dtype=dtype, with_optional=with_optional, softplus=True,
                            reverse=reverse, seed=length + 3 * dim, config=(fwd, bwd))


# The backward on channel-last copies of contiguous inputs (ScanLaunchConfig.transpose_io), v1 and v2:
# (L, dim, groups, dtype, with_optional, reverse, block_d, prefetch, variant).
# tile_grads: the v2 kernel on the copies writes the gradients contiguous as chunk tiles (v1 copies them back).
TRANSPOSE_IO_CASES = [
    (1, 6, None, torch.float32, True, False, 8, False, "v2", False),
    (23, 10, 2, torch.float32, True, True, 16, True, "v2", False),
    (37, 12, None, torch.bfloat16, False, False, 8, False, "v2", False),
    (19, 6, 2, torch.float32, True, False, 4, True, "v1", False),
    (1, 6, None, torch.float32, True, True, 8, False, "v2", True),
    (23, 10, 2, torch.float32, True, True, 16, True, "v2", True),
    (30, 12, None, torch.bfloat16, False, False, 8, False, "v2", True),
    (19, 6, 2, torch.float32, True, False, 4, True, "v1", True),
]


@pytest.mark.parametrize("length,dim,groups,dtype,with_optional,reverse,block_d,prefetch,variant,tile_grads",
                         TRANSPOSE_IO_CASES)
def test_triton_backward_on_channel_last_copies(triton_scan, length, dim, groups, dtype, with_optional, reverse,
                                                block_d, prefetch, variant, tile_grads):
    from kernels.triton_scan_common import ScanLaunchConfig

    fwd = ScanLaunchConfig(8, 4, variant=variant, tile_io=variant == "v2")
    bwd = ScanLaunchConfig(block_d, 4, prefetch=prefetch, variant=variant, transpose_io=True, tile_grads=tile_grads)
    check_against_reference(triton_scan, device=DEVICE, batch=2, dim=dim, length=length, n_state=4,
                            groups=groups, dtype=dtype, with_optional=with_optional, softplus=True,
                            reverse=reverse, seed=length + 5 * dim, config=(fwd, bwd))


# v3 with sequence segments (kernels/triton_scan_segments.py): (L, chunk, forward segments, backward segments,
# groups, with_optional, softplus, reverse, prefetch, dtype). Segment counts that divide the chunks evenly, leave
# a short last segment, exceed the chunk count (capped: one chunk each), differ between forward and backward,
# and one segment (the plain kernel) on one side only.
SEGMENT_CASES = [
    (29, 4, 2, 2, None, True, True, False, False, torch.float32),
    (29, 4, 4, 8, 2, True, True, True, True, torch.float32),
    (37, 2, 8, 1, None, False, False, False, False, torch.float32),
    (13, 4, 1, 4, 2, True, False, True, False, torch.float32),
    (9, 1, 16, 16, None, True, True, False, True, torch.bfloat16),
    (3, 4, 4, 4, None, True, True, True, False, torch.float32),
]


@pytest.mark.parametrize("length,chunk,fwd_segments,bwd_segments,groups,with_optional,softplus,reverse,prefetch,dtype",
                         SEGMENT_CASES)
def test_triton_v3_segments(triton_scan, length, chunk, fwd_segments, bwd_segments, groups, with_optional, softplus,
                            reverse, prefetch, dtype):
    from kernels.triton_scan_common import ScanLaunchConfig

    fwd = ScanLaunchConfig(32, chunk, variant="v3", segments=fwd_segments)
    bwd = ScanLaunchConfig(32, chunk, prefetch=prefetch, variant="v3", segments=bwd_segments)
    check_against_reference(triton_scan, device=DEVICE, batch=2, dim=6, length=length, n_state=4,
                            groups=groups, dtype=dtype, with_optional=with_optional, softplus=softplus,
                            reverse=reverse, seed=3 * length + fwd_segments, config=(fwd, bwd))


# v2 with sequence segments: SEGMENT_CASES with (block_d, tile_io), chunk tiles on and off (the
# per-position forward starts each segment at its first position), one and two channel blocks per group.
@pytest.mark.parametrize("length,chunk,fwd_segments,bwd_segments,groups,with_optional,softplus,reverse,prefetch,dtype",
                         SEGMENT_CASES)
@pytest.mark.parametrize("block_d,tiles", [(8, True), (4, False)])
def test_triton_v2_segments(triton_scan, length, chunk, fwd_segments, bwd_segments, groups, with_optional, softplus,
                            reverse, prefetch, dtype, block_d, tiles):
    from kernels.triton_scan_common import ScanLaunchConfig

    fwd = ScanLaunchConfig(block_d, chunk, variant="v2", segments=fwd_segments, tile_io=tiles)
    bwd = ScanLaunchConfig(block_d, chunk, prefetch=prefetch, variant="v2", segments=bwd_segments, tile_io=tiles)
    check_against_reference(triton_scan, device=DEVICE, batch=2, dim=6, length=length, n_state=4,
                            groups=groups, dtype=dtype, with_optional=with_optional, softplus=softplus,
                            reverse=reverse, seed=5 * length + bwd_segments, config=(fwd, bwd))


def test_triton_v2_segments_need_contiguous_rows(triton_scan):
    """A v2 launch splits its sequences only where u / delta / z (/ dout) are (batch, dim, L)-contiguous: with
    channel-last inputs (a Vim block's) the same config runs one segment, with the same result."""
    from kernels.triton_scan_common import ScanLaunchConfig
    from kernels.triton_scan_segments import contiguous_segments

    inp = make_scan_inputs(2, 6, 29, 4, groups=None, dtype=torch.float32, seed=2, device=DEVICE)
    channel_last = inp["u"].transpose(1, 2).contiguous().transpose(1, 2)
    assert contiguous_segments(4, 8, inp["u"], inp["delta"], None) == (4, 2)
    assert contiguous_segments(4, 8, channel_last, channel_last, None) == (1, 8)
    assert contiguous_segments(1, 8, inp["u"]) == (1, 8)
    config = ScanLaunchConfig(8, 4, variant="v2", segments=4)
    split = triton_scan.selective_scan_triton(**inp, delta_softplus=True, fwd_config=config, bwd_config=config)
    kw = {**inp, "u": channel_last, "delta": inp["delta"].transpose(1, 2).contiguous().transpose(1, 2)}
    whole = triton_scan.selective_scan_triton(**kw, delta_softplus=True, fwd_config=config, bwd_config=config)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("fwd_segments,bwd_segments,reverse,tiles", [(8, 4, False, True), (16, 16, True, True),
                                                                     (4, 32, False, False)])
def test_triton_gpu_v2_segments(triton_scan, fwd_segments, bwd_segments, reverse, tiles):
    """v2 sequence segments compiled (the SEGMENTED kernels), as test_triton_gpu_v3_segments."""
    from kernels.triton_scan_common import ScanLaunchConfig

    fwd = ScanLaunchConfig(8, 4, variant="v2", segments=fwd_segments, tile_io=tiles)
    bwd = ScanLaunchConfig(8, 4, variant="v2", segments=bwd_segments, tile_io=tiles)
    check_against_reference(triton_scan, device=DEVICE, batch=2, dim=100, length=2001, n_state=16, groups=2,
                            dtype=torch.bfloat16, with_optional=True, softplus=True, reverse=reverse,
                            seed=bwd_segments, config=(fwd, bwd))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("fwd_segments,bwd_segments,reverse", [(8, 4, False), (16, 16, True), (4, 32, False)])
def test_triton_gpu_v3_segments(triton_scan, fwd_segments, bwd_segments, reverse):
    """Sequence segments compiled, in bf16 at a Mamba block's settings over a long sequence (2001 positions:
    a short last segment)."""
    from kernels.triton_scan_common import ScanLaunchConfig

    fwd = ScanLaunchConfig(32, 4, variant="v3", segments=fwd_segments)
    bwd = ScanLaunchConfig(32, 4, prefetch=True, variant="v3", segments=bwd_segments)
    check_against_reference(triton_scan, device=DEVICE, batch=2, dim=100, length=2001, n_state=16, groups=2,
                            dtype=torch.bfloat16, with_optional=True, softplus=True, reverse=reverse,
                            seed=fwd_segments, config=(fwd, bwd))


# Chunk states saved in bfloat16 (ScanLaunchConfig.bf16_states) behind the forward of each variant and read by the
# backward of each: (variant fwd, variant bwd, L, groups, reverse, channel_last, backward on channel-last copies
# (transpose_io, the defaults' large-grid backward for contiguous inputs)). v4 is a forward only.
BF16_STATE_CASES = [
    ("v1", "v1", 23, None, False, False, False),
    ("v2", "v2", 29, 2, True, False, True),
    ("v2", "v2", 37, None, False, True, False),
    ("v3", "v3", 21, None, True, False, False),
    ("v4", "v2", 19, 2, False, False, False),
]


@pytest.mark.parametrize("fwd_variant,bwd_variant,length,groups,reverse,channel_last,transpose", BF16_STATE_CASES)
def test_bf16_saved_states_match_the_reference(triton_scan, fwd_variant, bwd_variant, length, groups, reverse,
                                               channel_last, transpose):
    from kernels.triton_scan_common import ScanLaunchConfig

    block_d = 32 if fwd_variant == "v3" else 8
    fwd = ScanLaunchConfig(block_d, 4, variant=fwd_variant, bf16_states=True, block_l=16,
                           tile_io=fwd_variant == "v2")
    bwd = ScanLaunchConfig(32 if bwd_variant == "v3" else 8, 4, variant=bwd_variant, prefetch=bwd_variant != "v3",
                           transpose_io=transpose)
    inp = make_scan_inputs(2, 16, length, 8, groups=groups, dtype=torch.bfloat16, seed=length, device=DEVICE,
                           requires_grad=True)
    if channel_last:  # a Vim block's layout: (batch, dim, L) views of (batch, L, dim) tensors, as leaves
        inp = {k: v.detach().requires_grad_() if v is not None else None
               for k, v in with_channel_last_sequences(inp).items()}
    leaves = [v for v in inp.values() if v is not None]
    grads = {}
    for saved in ("float32", "bfloat16"):
        fwd_cfg = fwd if saved == "bfloat16" else ScanLaunchConfig(block_d, 4, variant=fwd_variant, block_l=16,
                                                                   tile_io=fwd_variant == "v2")
        out = triton_scan.selective_scan_triton(**inp, delta_softplus=True, reverse=reverse, fwd_config=fwd_cfg,
                                                bwd_config=bwd)
        grads[saved] = (out, torch.autograd.grad(out.float().square().sum(), leaves))
    (out32, g32), (out16, g16) = grads["float32"], grads["bfloat16"]
    assert torch.equal(out16, out32)  # the saved states do not touch the output
    for a, b in zip(g16, g32):  # bfloat16's rounding of the entry states: small next to each gradient's scale
        assert (a.float() - b.float()).abs().max() <= 1e-2 * b.float().abs().max()
    assert any(not torch.equal(a, b) for a, b in zip(g16, g32))  # the backward did read the bfloat16 states
    check_against_reference(triton_scan, device=DEVICE, batch=2, dim=12, length=length, n_state=4, groups=groups,
                            dtype=torch.bfloat16, with_optional=True, softplus=True, reverse=reverse,
                            seed=length + 1, config=(fwd, bwd))


def test_bf16_states_only_for_bf16_inputs():
    from kernels.selective_scan_triton import _selective_scan_fwd_fake, config_to_ints
    from kernels.triton_scan_common import ScanLaunchConfig

    cfg = ScanLaunchConfig(8, 4, variant="v2", bf16_states=True)
    assert cfg.saved_state_dtype(torch.bfloat16) == torch.bfloat16
    assert cfg.saved_state_dtype(torch.float16) == torch.float32
    assert cfg.saved_state_dtype(torch.float32) == torch.float32
    assert ScanLaunchConfig(8, 4).saved_state_dtype(torch.bfloat16) == torch.float32
    for dtype in (torch.bfloat16, torch.float32):  # the compiled op's fake forward follows the launcher's rule
        inp = make_scan_inputs(1, 4, 9, 4, groups=None, dtype=dtype, seed=0, device="cpu")
        *_, states = _selective_scan_fwd_fake(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"],
                                              inp["z"], inp["delta_bias"], True, False, True, config_to_ints(cfg), [])
        assert states.shape == (1, 3, 4, 4) and states.dtype == cfg.saved_state_dtype(dtype)
