"""Backward kernel of the selective scan and its launcher.

One warp per program holding BLOCK_D channels of one (batch, group), as in the forward
(kernels/triton_scan_fwd.py). Chunks are walked in the opposite scan order. Per chunk the CHUNK forward
states and decays are recomputed from the saved chunk-entry state into registers (a statically unrolled
tuple, so CHUNK * N_PAD * BLOCK_D / 32 registers each), then the adjoint runs backwards over them:

    g = g_carry + C[l] * dy[l];  grads at l;  g_carry = a[l] * g

The chunk's u, delta, dout and z are read once (the adjoint reuses u and softplus'(dt_raw) from the
recompute), and with ScanLaunchConfig.prefetch one chunk ahead. dB and dC (sums over channels) are reduced
inside the warp per position, collected into (N, CHUNK) tiles and added with relaxed float32 atomics once
per chunk (one layout change per chunk, not per position); dA, dD and ddelta_bias are summed in registers
and added once per program.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from kernels.triton_launch import ceil_div, compiled_launcher, next_power_of_2
from kernels.triton_scan_bwd2 import _scan_bwd_kernel_v2
from kernels.triton_scan_bwd3 import _scan_bwd_kernel_v3
from kernels.triton_scan_common import (
    SEQ_UNSPECIALIZED,
    SEQUENCE_STRIDED_VARIANTS,
    UNSPECIALIZED,
    ScanLaunchConfig,
    backward_finish,
    backward_start,
    channel_block,
    channel_params,
    dim_major,
    launch_options,
    position_major,
    segment_walk,
    sequence_strides,
    softplus,
    tile_io,
)
from kernels.triton_scan_fast import scatter_levels
from kernels.triton_scan_fwd3 import padded_float32
from kernels.triton_scan_segments import contiguous_segments, plan_segments, segment_summaries
from kernels.triton_transpose import channel_last_copies, contiguous_copies


@triton.jit
def _bwd_chunk_loads(U, DELTA, Z, DOUT, B_seq, C_seq, CHUNK_STATES, seq_row, seq_sl, z_row, z_sl, offs_n, offs_d,
                     n_mask, d_mask,
                     nd_mask, batch_idx, chunk_idx, ok, length, n_chunks, n_state, dim,
                     CHUNK: tl.constexpr, HAS_Z: tl.constexpr, REVERSE: tl.constexpr):
    """The backward's per-channel reads for one chunk, as loaded (storage dtype): the saved entry state and,
    per position in scan order, u, delta, dout and z. Issued one chunk ahead (``ok`` False past the
    program's last chunk) so that their latency hides behind the current chunk's arithmetic. (B and C,
    N values per position, would not fit: carried too, they spill.)"""
    state_ptrs = ((batch_idx * n_chunks + chunk_idx) * n_state + offs_n[:, None]).to(tl.int64) * dim
    h_in = tl.load(CHUNK_STATES + state_ptrs + offs_d[None, :], mask=nd_mask & ok, other=0.0).to(tl.float32)
    base = chunk_idx * CHUNK
    loads = ()
    for s in tl.static_range(CHUNK):
        if REVERSE:
            pos = base + (CHUNK - 1 - s)
        else:
            pos = base + s
        valid = (pos < length) & ok
        m = d_mask & valid
        u = tl.load(U + seq_row + pos * seq_sl, mask=m, other=0.0)
        delta = tl.load(DELTA + seq_row + pos * seq_sl, mask=m, other=0.0)
        dout = tl.load(DOUT + seq_row + pos * seq_sl, mask=m, other=0.0)
        z = u
        if HAS_Z:
            z = tl.load(Z + z_row + pos * z_sl, mask=m, other=0.0)
        loads = loads + ((u, delta, dout, z),)
    return h_in, loads


@triton.jit(do_not_specialize=UNSPECIALIZED + SEQ_UNSPECIALIZED)  # see kernels/triton_scan_common.py
def _scan_bwd_kernel(
    U, DELTA, A, B, C, D, Z, DELTA_BIAS, DOUT, CHUNK_STATES, DLAST,
    DU, DDELTA, DZ, DA, DB, DC, DD, DDELTA_BIAS,
    dim, length, dim_per_group, n_groups, n_chunks, n_state, a_state_stride,
    bc_batch_stride, bc_group_stride, bc_pos_stride,
    seq_sb, seq_sd, seq_sl, z_sb, z_sd, z_sl,
    N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, HAS_DLAST: tl.constexpr, PREFETCH: tl.constexpr,
):
    batch_idx, group, offs_d, d_mask, offs_n, n_mask, nd_mask = channel_block(
        n_groups, dim_per_group, n_state, BLOCK_D, N_PAD)
    # Only A * log2(e) is kept (one tile fewer of registers); sums over A * x are scaled by ln(2) after.
    A2, D_vec, bias = channel_params(A, D, DELTA_BIAS, a_state_stride, offs_n, offs_d, nd_mask,
                                     d_mask, BLOCK_D, HAS_D, HAS_BIAS)
    offs_c = tl.arange(0, CHUNK)
    # u, delta, dout and the gradients du, ddelta, dz (seq_*: one layout) and z (z_*) through their strides.
    seq_row = batch_idx.to(tl.int64) * seq_sb + offs_d.to(tl.int64) * seq_sd
    z_row = batch_idx.to(tl.int64) * z_sb + offs_d.to(tl.int64) * z_sd
    # B and C come as (batch, groups, L, N) views (see the forward kernel); dB and dC are summed into
    # contiguous (batch, groups, L, N) float32 buffers.
    B_seq = B + batch_idx.to(tl.int64) * bc_batch_stride + group * bc_group_stride
    C_seq = C + batch_idx.to(tl.int64) * bc_batch_stride + group * bc_group_stride
    DB_seq = DB + (batch_idx * n_groups + group).to(tl.int64) * length * n_state
    DC_seq = DC + (batch_idx * n_groups + group).to(tl.int64) * length * n_state

    # Chunks in the opposite scan order: scan-order index n_chunks - 1 first.
    g, dA_acc, dD_acc, dbias_acc = backward_start(DLAST, batch_idx, dim, n_state, offs_n, offs_d, nd_mask, N_PAD,
                                                  BLOCK_D, HAS_DLAST)
    chunk_idx, _step, _count = segment_walk(0, n_chunks, n_chunks, REVERSE, True)
    h_in_zero = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
    ahead = (h_in_zero, ())
    if PREFETCH:
        ahead = _bwd_chunk_loads(U, DELTA, Z, DOUT, B_seq, C_seq, CHUNK_STATES, seq_row, seq_sl, z_row, z_sl,
                                 offs_n, offs_d, n_mask,
                                 d_mask, nd_mask, batch_idx, chunk_idx, True, length, n_chunks, n_state,
                                 dim, CHUNK, HAS_Z, REVERSE)
    for i in range(n_chunks):
        if REVERSE:
            chunk_idx = i
            next_idx = chunk_idx + 1
        else:
            chunk_idx = n_chunks - 1 - i
            next_idx = chunk_idx - 1
        base = chunk_idx * CHUNK
        if PREFETCH:
            h_in, loads = ahead
            # The next chunk's loads go out before this chunk's arithmetic.
            ahead = _bwd_chunk_loads(U, DELTA, Z, DOUT, B_seq, C_seq, CHUNK_STATES, seq_row, seq_sl, z_row, z_sl,
                                     offs_n, offs_d,
                                     n_mask, d_mask, nd_mask, batch_idx, next_idx, i + 1 < n_chunks, length,
                                     n_chunks, n_state, dim, CHUNK, HAS_Z, REVERSE)
        else:
            h_in, loads = _bwd_chunk_loads(U, DELTA, Z, DOUT, B_seq, C_seq, CHUNK_STATES, seq_row, seq_sl, z_row,
                                           z_sl, offs_n, offs_d,
                                           n_mask, d_mask, nd_mask, batch_idx, chunk_idx, True, length,
                                           n_chunks, n_state, dim, CHUNK, HAS_Z, REVERSE)

        # Recompute the chunk's states and decays, kept in registers (index s = scan order in the chunk),
        # with dt and softplus'(dt_raw) per position. B and C are read where they are used, not kept for
        # the chunk: kept, they cost 64 registers (254, and 145 spill instructions under maxnreg 168).
        h = h_in
        states = ()
        decays = ()
        steps = ()
        slopes = ()
        for s in tl.static_range(CHUNK):
            u = loads[s][0].to(tl.float32)
            dt_raw = loads[s][1].to(tl.float32)
            if HAS_BIAS:
                dt_raw += bias
            if SOFTPLUS:
                dt = softplus(dt_raw)
            else:
                dt = dt_raw
            if REVERSE:
                pos = base + (CHUNK - 1 - s)
            else:
                pos = base + s
            dt = tl.where(d_mask & (pos < length), dt, 0.0)
            a = tl.exp2(dt[None, :] * A2)
            B_col = tl.load(B_seq + pos * bc_pos_stride + offs_n, mask=n_mask & (pos < length), other=0.0).to(tl.float32)
            h = a * h + B_col[:, None] * (dt * u)[None, :]
            states = states + (h,)
            decays = decays + (a,)
            steps = steps + (dt,)
            if SOFTPLUS:
                # sigmoid(x) = exp(x - softplus(x)): one exp instead of an exp and a division.
                slopes = slopes + (tl.exp(dt_raw - dt),)
            else:
                slopes = slopes + (dt,)

        # Adjoint, backwards through the chunk.
        dB_chunk = tl.zeros((N_PAD, CHUNK), dtype=tl.float32)
        dC_chunk = tl.zeros((N_PAD, CHUNK), dtype=tl.float32)
        for r in tl.static_range(CHUNK):
            # Scan-order index CHUNK - 1 - r (written out: a constexpr cannot be rebound in the loop).
            if REVERSE:
                pos = base + r
            else:
                pos = base + (CHUNK - 1 - r)
            valid = pos < length
            m = d_mask & valid
            h = states[CHUNK - 1 - r]
            a = decays[CHUNK - 1 - r]
            dt = steps[CHUNK - 1 - r]
            u = loads[CHUNK - 1 - r][0].to(tl.float32)
            if CHUNK - 1 - r > 0:
                h_prev = states[CHUNK - 2 - r]
            else:
                h_prev = h_in
            B_col = tl.load(B_seq + pos * bc_pos_stride + offs_n, mask=n_mask & valid, other=0.0).to(tl.float32)
            C_col = tl.load(C_seq + pos * bc_pos_stride + offs_n, mask=n_mask & valid, other=0.0).to(tl.float32)
            dout = loads[CHUNK - 1 - r][2].to(tl.float32)
            if HAS_Z:
                z = loads[CHUNK - 1 - r][3].to(tl.float32)
                y = tl.sum(h * C_col[:, None], axis=0)
                if HAS_D:
                    y += D_vec * u
                sig_z = tl.sigmoid(z)
                dz = dout * y * sig_z * (1.0 + z * (1.0 - sig_z))
                tl.store(DZ + seq_row + pos * seq_sl, dz.to(DZ.dtype.element_ty), mask=m)
                dy = dout * z * sig_z
            else:
                dy = dout

            g = g + C_col[:, None] * dy[None, :]
            decayed_prev = a * h_prev
            g_dot_B = tl.sum(g * B_col[:, None], axis=0)
            ddt = u * g_dot_B + tl.sum(g * decayed_prev * A2, axis=0) * 0.6931471805599453
            du = dt * g_dot_B
            if HAS_D:
                du += D_vec * dy
                dD_acc += dy * u
            dA_acc += g * decayed_prev * dt[None, :]
            if SOFTPLUS:
                ddt = ddt * slopes[CHUNK - 1 - r]
            ddt = tl.where(m, ddt, 0.0)
            if HAS_BIAS:
                dbias_acc += ddt
            tl.store(DU + seq_row + pos * seq_sl, du.to(DU.dtype.element_ty), mask=m)
            tl.store(DDELTA + seq_row + pos * seq_sl, ddt.to(DDELTA.dtype.element_ty), mask=m)

            # Column r of the chunk's (N, CHUNK) dB / dC tiles (added once per chunk, below).
            dB_chunk = tl.where(offs_c[None, :] == r, tl.sum(g * (dt * u)[None, :], axis=1)[:, None], dB_chunk)
            dC_chunk = tl.where(offs_c[None, :] == r, tl.sum(h * dy[None, :], axis=1)[:, None], dC_chunk)
            g = a * g

        # One layout change and one atomic per element per chunk instead of one per position: fewer
        # barriers between the positions' reductions, so they can overlap.
        if REVERSE:
            chunk_pos = base + offs_c
        else:
            chunk_pos = base + (CHUNK - 1 - offs_c)
        bc_ptrs = chunk_pos[None, :] * n_state + offs_n[:, None]
        bc_mask = n_mask[:, None] & (chunk_pos < length)[None, :]
        tl.atomic_add(DB_seq + bc_ptrs, dB_chunk, mask=bc_mask, sem="relaxed")
        tl.atomic_add(DC_seq + bc_ptrs, dC_chunk, mask=bc_mask, sem="relaxed")

    backward_finish(DA, DD, DDELTA_BIAS, dA_acc, dD_acc, dbias_acc, offs_d, offs_n, n_state, d_mask, nd_mask,
                    HAS_D, HAS_BIAS)


# Bytes of dB / dC sums up to which dA, dD and ddelta_bias are handed back as views of the same buffer (pinning it
# for as long as a parameter's .grad holds them); beyond, they are copied out (``selective_scan_bwd_launch``).
PINNED_SUMS_LIMIT = 1 << 20


def _param_grads(param_sums: torch.Tensor, dim: int, n_state: int, has_d: bool,
                 has_bias: bool) -> dict[str, torch.Tensor | None]:
    """dA (dim, N), dD and ddelta_bias (dim,) as views of one float32 buffer of dim * (N + 2) sums."""
    return {"A": param_sums[:dim * n_state].view(dim, n_state),
            "D": param_sums[dim * n_state:dim * (n_state + 1)] if has_d else None,
            "delta_bias": param_sums[dim * (n_state + 1):] if has_bias else None}


def selective_scan_bwd_launch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    dout: torch.Tensor,
    chunk_states: torch.Tensor,
    dlast: torch.Tensor | None,
    delta_softplus: bool,
    reverse: bool,
    config: ScanLaunchConfig,
    grads_contiguous: bool = False,
) -> dict[str, torch.Tensor | None]:
    """Gradients of every input from the forward's saved chunk states: dB/dC per group, float32 dA, dD and
    ddelta_bias (summed over batch and L), the others in their input's dtype; du / ddelta / dz in u's layout, or
    (``grads_contiguous``, v2: the copied backward's ``tile_grads``) contiguous, written as chunk tiles."""
    if (config.transpose_io and config.variant in SEQUENCE_STRIDED_VARIANTS and u.is_contiguous()
            and delta.is_contiguous() and dout.is_contiguous()):
        # Channel-last copies in, the gradients of u / delta / z back to u's layout (ScanLaunchConfig.transpose_io):
        # copied, or written there by the kernel (tile_grads).
        tiled = config.tile_grads and config.variant == "v2"
        inputs = [u, delta, dout] + ([z.contiguous()] if z is not None else [])
        u_cl, delta_cl, dout_cl, *z_cl = channel_last_copies(inputs)  # one launch
        grads = selective_scan_bwd_launch(
            u_cl, delta_cl, A, B, C, D, z_cl[0] if z is not None else None, delta_bias, dout_cl,
            chunk_states, dlast, delta_softplus, reverse, dataclasses.replace(config, transpose_io=False),
            grads_contiguous=tiled)
        if not tiled:
            names = [name for name in ("u", "delta", "z") if grads[name] is not None]
            grads.update(zip(names, contiguous_copies([grads[name] for name in names])))  # one launch
        return grads
    batch, dim, length = u.shape
    A = dim_major(A)  # a no-op on the eager path, which converted it once for both directions
    n_groups, n_state = B.shape[1], B.shape[2]
    dim_per_group = dim // n_groups
    n_chunks = chunk_states.shape[1]
    if n_chunks != ceil_div(length, config.chunk):
        raise ValueError("selective_scan backward: chunk size differs from the forward's")
    f32 = dict(device=u.device, dtype=torch.float32)
    def new_grad(dtype: torch.dtype) -> torch.Tensor:  # u's layout, as the kernels write it, unless grads_contiguous
        if grads_contiguous:
            return torch.empty(u.shape, dtype=dtype, device=u.device)
        return torch.empty_like(u, dtype=dtype)

    grads: dict[str, torch.Tensor | None] = {
        "u": new_grad(u.dtype), "delta": new_grad(delta.dtype), "z": new_grad(z.dtype) if z is not None else None}
    n_pad = next_power_of_2(n_state)
    # dA, dD, ddelta_bias and the dB / dC sums are summed by atomics into one zero-filled buffer: one allocation and
    # one fill, since the host's time per torch call is what L=50 is bound by. The dB / dC sums start 128-byte
    # aligned, as a buffer of their own would.
    dbc_offset = ceil_div(dim * (n_state + 2), 32) * 32
    dbc_numel = batch * n_groups * length * 2 * (n_pad if config.variant == "v3" else n_state)
    sums = torch.zeros(dbc_offset + dbc_numel, **f32)
    param_sums, dbc_flat = sums[:dim * (n_state + 2)], sums[dbc_offset:]
    grads.update(_param_grads(param_sums, dim, n_state, D is not None, delta_bias is not None))
    placeholder = grads["A"]
    grid = (ceil_div(dim_per_group, config.block_d), batch * n_groups)
    inputs = (D if D is not None else placeholder, z if z is not None else u,
              delta_bias if delta_bias is not None else placeholder, dout, chunk_states,
              dlast.transpose(-1, -2).contiguous() if dlast is not None else placeholder)  # see backward_start
    sizes = (dim, length, dim_per_group, n_groups, n_chunks, n_state, A.stride(1))
    if config.variant == "v3":
        # B and C float32 and zero-padded to N_PAD; dB and dC summed side by side, (batch, groups, L, 2, N_PAD).
        B_arg, C_arg = padded_float32(B, n_pad), padded_float32(C, n_pad)
        dbc = dbc_flat.view(batch, n_groups, length, 2, n_pad)
        dbc_sums = dbc[..., :n_state].permute(3, 0, 1, 2, 4)  # (2, batch, groups, L, N)
        n_seg, chunks_per_seg = plan_segments(n_chunks, config.segments)
        seg_adjoints = seg_dtsum = placeholder
        if n_seg > 1:
            seg_adjoints, seg_dtsum = segment_summaries(u, delta, A, C_arg, delta_bias, dout, z, delta_softplus,
                                                        reverse, config, n_seg, chunks_per_seg, n_groups, n_state)
        kernel, outputs = _scan_bwd_kernel_v3, (grads["A"], dbc)
        inputs = inputs + (seg_adjoints, seg_dtsum)
        sizes = sizes + (n_seg, chunks_per_seg)
        grid = grid + (n_seg,)
        extra = dict(FAST=u.is_cuda, LEVELS=scatter_levels(2 * n_pad, config.block_d))
    else:
        # (batch, groups, L, N) like the kernel's B and C.
        B_arg, C_arg, bc_strides = position_major(B, C)
        dbc_sums = dbc_flat.view(2, batch, n_groups, length, n_state)
        dB_sums, dC_sums = dbc_sums.unbind(0)
        seq_strides = sequence_strides(u, delta, z, dout)
        kernel, outputs, extra = _scan_bwd_kernel, (grads["A"], dB_sums, dC_sums), {}
        if config.variant == "v2":
            # Approximate math needs inline PTX, which the interpreter (CPU tensors) cannot run.
            kernel = _scan_bwd_kernel_v2
            n_seg, chunks_per_seg = contiguous_segments(config.segments, n_chunks, u, delta, z, dout)
            seg_adjoints = seg_dtsum = placeholder
            if n_seg > 1:
                seg_adjoints, seg_dtsum = segment_summaries(u, delta, A, padded_float32(C, n_pad), delta_bias, dout,
                                                            z, delta_softplus, reverse, config, n_seg, chunks_per_seg,
                                                            n_groups, n_state)
            inputs = inputs + (seg_adjoints, seg_dtsum)
            sizes = sizes + (n_seg, chunks_per_seg)
            grid = grid + (n_seg,)
            extra = dict(EVEN_D=dim_per_group % config.block_d == 0, EVEN_N=n_state == n_pad, FAST=u.is_cuda,
                         LEVELS=scatter_levels(n_pad, config.block_d),
                         TILE_IO=tile_io(config, seq_strides), TILE_GRADS=grads_contiguous, SEGMENTED=n_seg > 1)
        sizes = sizes + bc_strides + seq_strides
    compiled_launcher(kernel)[grid](
        u, delta, A, B_arg, C_arg, *inputs,
        grads["u"], grads["delta"],
        grads["z"] if z is not None else grads["u"],
        *outputs,
        grads["D"] if D is not None else placeholder,
        grads["delta_bias"] if delta_bias is not None else placeholder,
        *sizes,
        N_PAD=n_pad, BLOCK_D=config.block_d, CHUNK=config.chunk,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, REVERSE=reverse, HAS_DLAST=dlast is not None,
        PREFETCH=config.prefetch, **extra, **launch_options(config),
    )
    if dbc_numel * 4 > PINNED_SUMS_LIMIT:
        # A parameter's .grad may be this very view and would keep the dB / dC sums alive with it: where those are
        # large (long sequences, bound by the GPU, not the host) the small parameter sums are copied out.
        grads.update(_param_grads(param_sums.clone(), dim, n_state, D is not None, delta_bias is not None))
    # dB and dC handed back together as one (2, batch, groups, N, L) view, so that the caller casts them in one copy.
    grads["BC"] = dbc_sums.transpose(-1, -2)
    return grads
