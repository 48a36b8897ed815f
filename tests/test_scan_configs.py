"""The scan's host-side choices, without running a kernel: default tiles from the grid and the device, v3
sequence segments, and the integer helpers the launchers use instead of Triton's."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the compiled kernels where a GPU is present


def test_default_segments_split_only_grids_too_small_for_the_device():
    from kernels.triton_scan_common import default_segments

    # The benchmark shapes on 132 multiprocessors: batch 128 x 768 channels = 3072 one-warp programs fill it;
    # batch 16 (384 programs) gets 8 forward / 4 backward segments.
    for length, batch, fwd, bwd in ((50, 128, 1, 1), (197, 128, 1, 1), (1024, 16, 8, 4), (4096, 16, 8, 4)):
        programs, n_chunks = batch * 768 // 32, -(-length // 4)
        assert default_segments(programs, n_chunks, False, 132) == fwd
        assert default_segments(programs, n_chunks, True, 132) == bwd
    # Segments stay at least 16 chunks long; no device, no segments.
    assert default_segments(1, 40, False, 132) == 2
    assert default_segments(384, 4096, True, None) == 1


def test_host_integer_helpers_match_triton():
    import triton

    from kernels.triton_launch import ceil_div, next_power_of_2

    for a in range(1, 600):
        assert next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 3, 4, 7, 8, 16, 32, 33):
            assert ceil_div(a, b) == triton.cdiv(a, b), (a, b)


def test_plan_segments_uses_whole_chunks_and_no_empty_segment():
    from kernels.triton_scan_segments import plan_segments

    assert plan_segments(8, 1) == (1, 8)
    assert plan_segments(8, 4) == (4, 2)
    assert plan_segments(7, 4) == (4, 2)  # 2 + 2 + 2 + 1
    assert plan_segments(9, 4) == (3, 3)  # 3 chunks each: 4 segments of 3 would leave one empty
    assert plan_segments(3, 16) == (3, 1)
    for n_chunks in range(1, 40):
        for segments in (1, 2, 4, 8, 16):
            n_seg, per = plan_segments(n_chunks, segments)
            assert n_seg <= segments and (n_seg - 1) * per < n_chunks <= n_seg * per


def test_default_config_tiles_follow_the_grid_size():
    from kernels.triton_scan_common import default_launch_config

    for length, rows in ((50, 128 * 768), (197, 128 * 768), (1024, 16 * 768), (4096, 16 * 768)):
        for backward in (False, True):
            cfg = default_launch_config(16, length, backward, rows=rows, multiprocessors=132)
            assert (cfg.maxnreg, cfg.chunk) == (None, 4)
    # The forward: block_d 8 without prefetch at every size.
    for length, rows in ((50, 128 * 768), (197, 128 * 768), (4096, 16 * 768)):
        fwd = default_launch_config(16, length, False, rows=rows, multiprocessors=132)
        assert (fwd.block_d, fwd.prefetch) == (8, False)
    # 6144 block_d-16 backward programs > 132 x 8 resident: block_d 16 with prefetch; 768 programs: block_d 8.
    crowded = default_launch_config(16, 197, True, rows=128 * 768, multiprocessors=132)
    assert (crowded.block_d, crowded.prefetch) == (16, True)
    small = default_launch_config(16, 1024, True, rows=16 * 768, multiprocessors=132)
    assert (small.block_d, small.prefetch) == (8, False)
    # The threshold follows the device: the same 768 programs crowd a 64-multiprocessor GPU.
    assert default_launch_config(16, 1024, True, rows=16 * 768, multiprocessors=64).block_d == 16
    # No device (the interpreter): the large-grid tiles.
    assert default_launch_config(16, 197, True, rows=128 * 768).block_d == 16
    assert default_launch_config(4, 1, True).chunk == 1


def test_layout_io_from_l128():
    """v2 everywhere; from L=128 chunk tiles (tile_io) in the forward and in the backward of grids below the
    device's residency, channel-last copies (transpose_io) in the large-grid backward (block_d 16, prefetch)."""
    from kernels.triton_scan_common import LAYOUT_IO_MIN_LENGTH, default_launch_config

    def pick(length, batch, backward, sms=132):
        cfg = default_launch_config(16, length, backward, rows=batch * 768, multiprocessors=sms)
        return cfg.variant, cfg.block_d, cfg.prefetch, cfg.tile_io, cfg.transpose_io

    assert LAYOUT_IO_MIN_LENGTH == 128
    assert pick(197, 128, False) == ("v2", 8, False, True, False)
    assert pick(197, 128, True) == ("v2", 16, True, False, True)
    assert pick(50, 128, False) == ("v2", 8, False, False, False)  # too short: the host's work decides L=50
    assert pick(50, 128, True) == ("v2", 16, True, False, False)
    assert pick(1024, 16, False) == ("v2", 8, False, True, False)
    assert pick(1024, 16, True) == ("v2", 8, False, True, False)
    assert pick(4096, 16, True) == ("v2", 8, False, True, False)
    assert pick(127, 16, True)[3:] == (False, False)
    # Without a device (the interpreter, a compiled forward's trace): by length alone, the backward's large-grid tiles.
    assert default_launch_config(16, 197, False).tile_io
    assert default_launch_config(16, 197, True).transpose_io


def test_chunk_tiles_only_for_unit_position_strides():
    """The launchers read and write tiles only where u / delta / out and z have position stride 1: a Vim block's
    channel-last tensors take the per-position kernels whatever the config asks."""
    from kernels.triton_scan_common import ScanLaunchConfig, sequence_strides, tile_io

    u = torch.zeros(2, 8, 197)
    channel_last = torch.zeros(2, 197, 8).transpose(1, 2)
    z_channel_last = torch.zeros(2, 197, 16)[..., 8:].transpose(1, 2)
    tiled = ScanLaunchConfig(8, 4, variant="v2", tile_io=True)
    assert tile_io(tiled, sequence_strides(u, u, u))
    assert not tile_io(ScanLaunchConfig(8, 4, variant="v2"), sequence_strides(u, u, u))
    assert not tile_io(tiled, sequence_strides(channel_last, channel_last, channel_last))
    assert not tile_io(tiled, sequence_strides(u, u, z_channel_last))


def test_v3_forward_tile_is_a_power_of_two_of_at_least_one_chunk():
    from kernels.triton_scan_common import ScanLaunchConfig

    assert ScanLaunchConfig(32, 4, variant="v3").log2_tile() == 4  # the default 16 positions
    assert ScanLaunchConfig(32, 4, variant="v3", tile_l=2).log2_tile() == 2  # never shorter than the chunk
    assert ScanLaunchConfig(32, 8, variant="v3", tile_l=32).log2_tile() == 5
    with pytest.raises(ValueError, match="tile_l"):
        ScanLaunchConfig(32, 4, variant="v3", tile_l=12)


def test_channel_last_forward_takes_its_own_tiles():
    """A Vim block's channel-last u gets CHANNEL_LAST_FORWARD's forward (wider programs read whole sectors); the
    backward and every contiguous default stay as they were; the choice reaches the launch through is_channel_last."""
    from kernels.selective_scan_triton import launch_configs
    from kernels.testing import channel_last
    from kernels.triton_scan_common import CHANNEL_LAST_FORWARD, default_launch_config, is_channel_last

    variant, block_d = CHANNEL_LAST_FORWARD
    for length in (50, 197, 1024):
        fwd = default_launch_config(16, length, False, rows=512 * 768, multiprocessors=132, channel_last=True)
        assert (fwd.variant, fwd.block_d, fwd.chunk, fwd.tile_io) == (variant, block_d, 4, False)
        plain = default_launch_config(16, length, False, rows=512 * 768, multiprocessors=132)
        assert (plain.variant, plain.block_d) == ("v2", 8)
        assert default_launch_config(16, length, True, rows=512 * 768, multiprocessors=132, channel_last=True) == \
            default_launch_config(16, length, True, rows=512 * 768, multiprocessors=132)
    fwd, bwd = launch_configs(16, 50, None, None, channel_last=True)
    assert (fwd.variant, fwd.block_d, bwd.variant, bwd.chunk) == (variant, block_d, "v2", fwd.chunk)
    u = torch.zeros(2, 6, 5)
    assert is_channel_last(channel_last(u)) and not is_channel_last(u)
    assert not is_channel_last(channel_last(torch.zeros(2, 6, 1))) and not is_channel_last(torch.zeros(2, 1, 5))


@pytest.mark.parametrize("reverse", [False, True])
def test_channel_last_defaults_match_the_reference(triton_scan, reverse):
    """The defaults on channel-last inputs (the channel-last forward behind the v2 backward), 40 channels: one full
    and one partial 32-channel program."""
    from kernels.testing import check_against_reference

    check_against_reference(triton_scan, batch=2, dim=40, length=23, n_state=4, groups=None, dtype=torch.bfloat16,
                            with_optional=True, softplus=True, reverse=reverse, seed=11 + reverse,
                            channel_last=True, device=DEVICE)
