"""kernels/triton_transpose.py: the layout copies around the scan's backward (ScanLaunchConfig.transpose_io).

Under the Triton interpreter on a machine without CUDA (tests/conftest.py sets it), compiled with CUDA.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", [(2, 5, 7), (1, 64, 64), (3, 70, 130), (2, 1, 9), (1, 0, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_copies_equal_torch_and_invert_each_other(shape, dtype):
    from kernels.triton_transpose import channel_last_copies, contiguous_copies

    x = torch.randn(shape, device=DEVICE).to(dtype)
    (last,) = channel_last_copies([x])
    assert last.shape == x.shape and last.transpose(1, 2).is_contiguous()
    assert torch.equal(last, x)  # same values, channel-last memory
    (back,) = contiguous_copies([last])
    assert back.is_contiguous() and torch.equal(back, x)


@pytest.mark.parametrize("count", [1, 3, 4, 6])
def test_several_tensors_copy_in_one_launch_each_its_own(count):
    """transposed_copies: up to four tensors per launch (six: two launches), each copied into its own new tensor,
    dtypes mixed (each pointer pair has its own)."""
    from kernels.triton_transpose import contiguous_copies, transposed_copies

    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    xs = [torch.randn(3, 70, 130, device=DEVICE).to(dtypes[i % 3]) for i in range(count)]
    ys = transposed_copies(xs)
    assert len(ys) == count and len({y.data_ptr() for y in ys}) == count
    for x, y in zip(xs, ys):
        assert y.is_contiguous() and y.dtype == x.dtype and torch.equal(y, x.transpose(1, 2))
    backs = contiguous_copies([y.transpose(1, 2) for y in ys])
    for x, back in zip(xs, backs):
        assert back.is_contiguous() and torch.equal(back, x)


def test_transposed_copies_refuse_mixed_shapes():
    from kernels.triton_transpose import transposed_copies

    with pytest.raises(ValueError, match="one shape"):
        transposed_copies([torch.zeros(2, 3, 4, device=DEVICE), torch.zeros(2, 4, 3, device=DEVICE)])


def test_layout_copies_refuse_the_other_layout():
    from kernels.triton_transpose import channel_last_copies, contiguous_copies

    x = torch.randn(2, 4, 6, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        channel_last_copies([x.transpose(1, 2).contiguous().transpose(1, 2)])
    with pytest.raises(ValueError, match="channel-last"):
        contiguous_copies([x])


def test_backward_launch_returns_gradients_in_the_inputs_layout():
    """transpose_io (gradients copied back, or written as contiguous tiles: tile_grads): the same gradients as the
    kernel on the contiguous inputs, du / ddelta / dz contiguous."""
    from kernels.testing import make_scan_inputs
    from kernels.triton_scan_bwd import selective_scan_bwd_launch
    from kernels.triton_scan_common import ScanLaunchConfig
    from kernels.triton_scan_fwd import selective_scan_fwd_launch

    inp = make_scan_inputs(2, 6, 11, 4, groups=1, dtype=torch.float32, seed=3, device=DEVICE)  # B, C grouped
    config = ScanLaunchConfig(8, 4, variant="v2")
    _, _, states = selective_scan_fwd_launch(**inp, delta_softplus=True, reverse=False, store_states=True,
                                             config=config)
    dout = torch.randn_like(inp["u"])
    args = (inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"], inp["delta_bias"], dout,
            states, None, True, False)
    plain = selective_scan_bwd_launch(*args, config)
    for tile_grads in (False, True):
        copied = selective_scan_bwd_launch(*args, ScanLaunchConfig(8, 4, variant="v2", transpose_io=True,
                                                                   tile_grads=tile_grads))
        for name in ("u", "delta", "z"):
            assert copied[name].is_contiguous()
            torch.testing.assert_close(copied[name], plain[name], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(copied["A"], plain["A"], rtol=1e-5, atol=1e-6)


def test_every_benchmarked_tile_copies_exactly():
    """The tiles `python -m bench.transpose` sweeps (any may become the default) give torch's transpose."""
    from bench.transpose import TILES
    from kernels.triton_transpose import DEFAULT_TILE, transposed_copy

    assert TILES[0] == DEFAULT_TILE
    x = torch.randn(2, 70, 130, device=DEVICE).to(torch.bfloat16)
    for tile in TILES:
        assert torch.equal(transposed_copy(x, tile), x.transpose(1, 2)), tile
