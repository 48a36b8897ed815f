"""Triton backend of the selective scan: the fused kernels as torch.library custom ops with autograd.

``scanmae::selective_scan_fwd`` and ``scanmae::selective_scan_bwd`` wrap the launchers of
kernels/triton_scan_fwd.py and _bwd.py; the backward is registered as the forward's autograd formula. Custom ops
are opaque to torch.compile: dynamo records them in the graph (shapes from the fake implementations below)
instead of breaking the graph at a Python autograd.Function, so a compiled Vim block fuses the projections,
norms and gates around the scan. Launch configurations cross the op boundary as int lists
(block_d, chunk, maxnreg or 0, prefetch, index of the kernel variant); an empty backward list means "the defaults for this device",
resolved when the backward runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from kernels.strides import with_strides
from kernels.triton_launch import ceil_div, next_power_of_2
from kernels.triton_scan_bwd import selective_scan_bwd_launch
from kernels.triton_scan_common import (
    FORWARD_ONLY_VARIANTS,
    SCAN_VARIANTS,
    SEQUENCE_STRIDED_VARIANTS,
    ScanLaunchConfig,
    default_launch_config,
    default_segments,
    dim_major,
    is_channel_last,
    is_sequence_layout,
    position_major,
)
from kernels.triton_scan_fwd import selective_scan_fwd_launch


def _as_grouped(bc: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, N, L) or (batch, g, N, L) -> (batch, groups, N, L); differentiable (torch ops). Not copied: the
    launchers read B and C through their strides where they can (``position_major``)."""
    if bc.dim() == 3:
        bc = bc.unsqueeze(1)
    if bc.shape[1] != groups:
        bc = bc.repeat_interleave(groups // bc.shape[1], dim=1)
    return bc


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``; itself without a torch call when it already is (L=50 is bound by the host's time per
    torch call, even for no-op conversions)."""
    return t if t.dtype == dtype else t.to(dtype)


def _optional_contiguous(t: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    if t is None:
        return None
    if dtype is not None:
        t = _as_dtype(t, dtype)
    return t if t.is_contiguous() else t.contiguous()


# Where config_to_ints puts the variant's index: read straight from the list on the eager hot path.
VARIANT_INT = 4


def config_to_ints(config: ScanLaunchConfig | None) -> list[int]:
    """A launch config as the op's int list; None -> [] (device defaults)."""
    if config is None:
        return []
    return [config.block_d, config.chunk, config.maxnreg or 0, int(config.prefetch),
            SCAN_VARIANTS.index(config.variant), config.segments, config.block_l, config.tile_l,
            int(config.tile_io), int(config.transpose_io), int(config.tile_grads), int(config.bf16_states)]


def config_from_ints(values: Sequence[int]) -> ScanLaunchConfig | None:
    if not values:
        return None
    return _config_from_ints(tuple(values))


@functools.lru_cache(maxsize=256)  # a ScanLaunchConfig costs microseconds to build, once per scan call otherwise
def _config_from_ints(values: tuple[int, ...]) -> ScanLaunchConfig:
    (block_d, chunk, maxnreg, prefetch, variant, segments, block_l, tile_l, tile_io, transpose_io, tile_grads,
     bf16_states) = values
    return ScanLaunchConfig(block_d=block_d, chunk=chunk, maxnreg=maxnreg or None, prefetch=bool(prefetch),
                            variant=SCAN_VARIANTS[variant], segments=segments, block_l=block_l, tile_l=tile_l,
                            tile_io=bool(tile_io), transpose_io=bool(transpose_io), tile_grads=bool(tile_grads),
                            bf16_states=bool(bf16_states))


@functools.cache
def multiprocessor_count(device: torch.device) -> int | None:
    """The CUDA device's multiprocessor count (None off CUDA), looked up once per device."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


@functools.lru_cache(maxsize=1024)
def launch_configs(
    n_state: int, length: int, fwd_config: ScanLaunchConfig | None, bwd_config: ScanLaunchConfig | None,
    rows: int | None = None, multiprocessors: int | None = None, channel_last: bool = False,
) -> tuple[ScanLaunchConfig, ScanLaunchConfig]:
    """Fill in default tile configs (``rows`` = batch * dim and the device's ``multiprocessors`` pick the
    backward's tiles: default_launch_config); the backward must use the forward's chunk length, and a forward-only
    variant (v4) cannot be the backward's."""
    if bwd_config is not None and bwd_config.variant in FORWARD_ONLY_VARIANTS:
        raise ValueError(f"selective_scan: variant {bwd_config.variant!r} has no backward kernel; give a v1 or v2 "
                         f"backward config (its forward saves the chunk states they read)")
    n_pad = next_power_of_2(n_state)
    fwd = fwd_config or default_launch_config(n_pad, length, backward=False, channel_last=channel_last)
    bwd = bwd_config or default_launch_config(n_pad, length, backward=True, rows=rows,
                                              multiprocessors=multiprocessors)
    if bwd.chunk != fwd.chunk:
        if bwd_config is not None:
            raise ValueError(f"selective_scan: backward chunk {bwd.chunk} must equal forward chunk {fwd.chunk}")
        bwd = dataclasses.replace(bwd, chunk=fwd.chunk)
    return fwd, bwd


# The v4 forward's default tiles (kernels/triton_scan_fwd4.py): 8 channels per program, so that each saved chunk
# state row is a 32-byte write, and spans of 128 positions (a multiple of every chunk the defaults use). Not yet
# timed on a GPU: bench.scan --sweep times the alternatives.
V4_BLOCK_D, V4_BLOCK_L = 8, 128


@functools.lru_cache(maxsize=1024)
def variant_configs(variant: str, n_state: int, length: int, rows: int,
                    device: torch.device) -> tuple[ScanLaunchConfig, ScanLaunchConfig]:
    """The default tiles for ``rows`` = batch * dim sequences of ``length`` on ``device`` in kernel ``variant``;
    v3 takes block_d 32 (one lane per channel, a warp per 32 channels) and splits the sequences of grids too
    small for the device into segments (default_segments). v4 is a forward only: its default tiles are v4 block_d 8
    with spans of V4_BLOCK_L positions, and its backward falls back to the v2 backward with v2's default tiles
    (both read the chunk states every variant saves)."""
    sms = multiprocessor_count(device)
    fwd, bwd = launch_configs(n_state, length, None, None, rows=rows, multiprocessors=sms)
    if variant == "v4":
        return (dataclasses.replace(fwd, variant="v4", block_d=V4_BLOCK_D, block_l=V4_BLOCK_L),
                dataclasses.replace(bwd, variant="v2", chunk=fwd.chunk))
    if variant != "v3":
        return (dataclasses.replace(fwd, variant=variant), dataclasses.replace(bwd, variant=variant, chunk=fwd.chunk))
    programs, n_chunks = ceil_div(rows, 32), ceil_div(length, fwd.chunk)
    return tuple(dataclasses.replace(cfg, variant=variant, block_d=32, chunk=fwd.chunk,
                                     segments=default_segments(programs, n_chunks, backward, sms))
                 for cfg, backward in ((fwd, False), (bwd, True)))


def backward_config(bwd_config: list[int], chunk: int, u: Tensor, n_state: int) -> ScanLaunchConfig:
    """The backward's tiles: given, or the defaults for this device and grid (batch * dim rows); the chunk is
    always the forward's, whose saved states the backward reads."""
    return _backward_config(tuple(bwd_config), chunk, u.device, u.shape[-1], u.shape[0] * u.shape[1], n_state)


@functools.lru_cache(maxsize=1024)  # dataclasses.replace alone costs about 10 us per call
def _backward_config(bwd_config: tuple[int, ...], chunk: int, device: torch.device, length: int, rows: int,
                     n_state: int) -> ScanLaunchConfig:
    config = config_from_ints(bwd_config)
    if config is None:
        _, config = launch_configs(n_state, length, None, None, rows=rows, multiprocessors=multiprocessor_count(device))
    return dataclasses.replace(config, chunk=chunk)


def _empty_f32(like: Tensor) -> Tensor:
    return like.new_empty((0,), dtype=torch.float32)


def _scan_fwd(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, delta_softplus: bool, reverse: bool, store_states: bool,
    fwd_config: list[int], bwd_config: list[int],
) -> tuple[Tensor, Tensor, Tensor]:
    """out, float32 last state, float32 chunk states (empty unless ``store_states``). ``bwd_config`` is not
    used here: it travels with the forward's inputs so the autograd formula can hand it to the backward."""
    out, last_state, chunk_states = selective_scan_fwd_launch(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, store_states, config_from_ints(fwd_config))
    return out, last_state, chunk_states if chunk_states is not None else _empty_f32(u)


selective_scan_fwd_op = torch.library.custom_op("scanmae::selective_scan_fwd", _scan_fwd, mutates_args=())


@selective_scan_fwd_op.register_fake
def _selective_scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, store_states,
                             fwd_config, bwd_config):
    batch, dim, length = u.shape
    n_state = A.shape[1]
    chunk = fwd_config[1]
    out = torch.empty_like(u)
    last_state = u.new_empty((batch, dim, n_state), dtype=torch.float32)
    if not store_states:
        return out, last_state, _empty_f32(u)
    n_chunks = (length + chunk - 1) // chunk
    states_dtype = config_from_ints(fwd_config).saved_state_dtype(u.dtype)
    return out, last_state, u.new_empty((batch, n_chunks, n_state, dim), dtype=states_dtype)


def _scan_bwd(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, dout: Tensor, chunk_states: Tensor, dlast: Tensor | None, delta_softplus: bool,
    reverse: bool, chunk: int, bwd_config: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, each in its input's dtype (B/C grouped, contiguous); the
    gradient of an absent optional input is an empty tensor. dB and dC share one buffer (one cast from the
    float32 sums), as do dA, dD and ddelta_bias (one fill): fine for autograd, not for a custom op
    (``_scan_bwd_unaliased``)."""
    grads = selective_scan_bwd_launch(u, delta, A, B, C, D, z, delta_bias, dout, chunk_states, dlast,
                                      delta_softplus, reverse, backward_config(bwd_config, chunk, u, A.shape[1]))
    dB, dC = torch.empty((2, *B.shape), dtype=B.dtype, device=B.device).copy_(grads["BC"]).unbind(0)
    return (grads["u"], grads["delta"], _as_dtype(grads["A"], A.dtype), dB, dC,
            _as_dtype(grads["D"], D.dtype) if D is not None else _empty_f32(u),
            grads["z"] if z is not None else _empty_f32(u),
            _as_dtype(grads["delta_bias"], delta_bias.dtype) if delta_bias is not None else _empty_f32(u))


def _scan_bwd_unaliased(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, dout: Tensor, chunk_states: Tensor, dlast: Tensor | None, delta_softplus: bool,
    reverse: bool, chunk: int, bwd_config: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``_scan_bwd`` with no two outputs sharing storage, as a custom op's must: dC, dD and ddelta_bias copied
    out of the buffers they share with dB and dA (small; under torch.compile only)."""
    du, ddelta, dA, dB, dC, dD, dz, dbias = _scan_bwd(u, delta, A, B, C, D, z, delta_bias, dout, chunk_states,
                                                      dlast, delta_softplus, reverse, chunk, bwd_config)
    return du, ddelta, dA, dB, dC.clone(), dD.clone(), dz, dbias.clone()


selective_scan_bwd_op = torch.library.custom_op("scanmae::selective_scan_bwd", _scan_bwd_unaliased,
                                                mutates_args=())


@selective_scan_bwd_op.register_fake
def _selective_scan_bwd_fake(u, delta, A, B, C, D, z, delta_bias, dout, chunk_states, dlast, delta_softplus,
                             reverse, chunk, bwd_config):
    # dB / dC are contiguous whatever B / C's strides (one fresh buffer in _scan_bwd)
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), B.new_empty(B.shape),
            C.new_empty(C.shape), torch.empty_like(D) if D is not None else _empty_f32(u),
            torch.empty_like(u, dtype=z.dtype) if z is not None else _empty_f32(u),
            torch.empty_like(delta_bias) if delta_bias is not None else _empty_f32(u))


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, _store, fwd_config, bwd_config = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.delta_softplus, ctx.reverse = delta_softplus, reverse
    ctx.chunk, ctx.bwd_config = fwd_config[1], bwd_config
    ctx.set_materialize_grads(False)


def _backward_with(scan_bwd, ctx, dout, dlast):
    u, delta, A, B, C, D, z, delta_bias, chunk_states = ctx.saved_tensors
    if chunk_states.numel() == 0:
        raise RuntimeError("selective_scan: backward through a forward that did not keep its states "
                           "(no input required grad when it ran)")
    dout = torch.zeros_like(u) if dout is None else with_strides(dout, u.stride())
    dlast = None if dlast is None else dlast.to(torch.float32)  # the launcher transposes it
    du, ddelta, dA, dB, dC, dD, dz, dbias = scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, dout, chunk_states, dlast, ctx.delta_softplus, ctx.reverse,
        ctx.chunk, ctx.bwd_config)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None, None, None, None, None, None)


def _backward(ctx, dout, dlast, _dstates):
    return _backward_with(selective_scan_bwd_op, ctx, dout, dlast)


def _in_kernel_layouts(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, store_states, fwd_config,
                       bwd_config):
    """The scan's arguments with (outside v3) B and C as position-major views (``position_major``, a copy unless
    they already are), so that both launchers find them ready: the backward then copies neither again. On the
    H100's host each such copy costs about 25 us, and L=50 is bound by the host. A likewise, with its channels
    adjacent (``dim_major``), once for both directions."""
    A = dim_major(A)
    if SCAN_VARIANTS[fwd_config[VARIANT_INT]] not in ("v3", "v4"):  # v3 pads B and C itself, v4 reads them L-major
        B, C, _ = position_major(B, C)
    return (u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, store_states, fwd_config, bwd_config)


class _EagerScan(torch.autograd.Function):
    """The same forward, setup and backward as the custom ops, without the custom-op dispatch: in eager mode
    that dispatch costs tens of microseconds of host time per call (schema handling in Python), which is most of
    a short scan's time (L=50 is bound by the host). torch.compile sees the custom ops instead. The forward
    takes ``ctx`` itself: a separate ``setup_context`` makes every call bind default arguments through
    ``inspect``."""

    @staticmethod
    def forward(ctx, *inputs):
        inputs = _in_kernel_layouts(*inputs)
        output = _scan_fwd(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dout, dlast, _dstates):
        return _backward_with(_scan_bwd, ctx, dout, dlast)


selective_scan_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    reverse: bool = False,
    fwd_config: ScanLaunchConfig | None = None,
    bwd_config: ScanLaunchConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan through the fused Triton kernels (inputs already validated by the caller).

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``. ``fwd_config`` /
    ``bwd_config`` override the tile sizes (benchmarks and tuning); the backward must use the forward's chunk.
    """
    groups_b = 1 if B.dim() == 3 else B.shape[1]
    groups_c = 1 if C.dim() == 3 else C.shape[1]
    groups = math.lcm(groups_b, groups_c)
    compiling = torch.compiler.is_compiling()
    # The backward's default tiles depend on the device: resolved when the backward runs. Cached in eager mode;
    # dynamo traces the plain function (it warns about lru_cache wrappers).
    configs = launch_configs.__wrapped__ if compiling else launch_configs
    fwd, _ = configs(A.shape[1], u.shape[-1], fwd_config, bwd_config, channel_last=is_channel_last(u))
    if fwd.variant in SEQUENCE_STRIDED_VARIANTS and (bwd_config is None
                                                      or bwd_config.variant in SEQUENCE_STRIDED_VARIANTS):
        # The v1 / v2 kernels read u / delta in either dense layout and z through any strides: a Vim block's
        # channel-last tensors go in without a copy (sequence_strides).
        u = u if is_sequence_layout(u) else u.contiguous()
        delta = with_strides(delta, u.stride())
    else:
        u, delta, z = u.contiguous(), delta.contiguous(), _optional_contiguous(z)
    inputs = (u, delta, _as_dtype(A, torch.float32), _as_grouped(B, groups), _as_grouped(C, groups),
              _optional_contiguous(D, torch.float32), z, _optional_contiguous(delta_bias, torch.float32))
    # The chunk states cost memory: keep them only when a backward can follow.
    store_states = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if compiling:
        scan = selective_scan_fwd_op
    else:
        scan = _EagerScan.apply if store_states else _scan_fwd  # no autograd node without a backward to come
    out, last_state, _ = scan(*inputs, delta_softplus, reverse, store_states, config_to_ints(fwd),
                              config_to_ints(bwd_config))
    return (out, last_state) if return_last_state else out
