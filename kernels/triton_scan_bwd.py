"""Fused Triton backward kernel of the selective scan, and its launcher.

Walks the chunks in the opposite order of the forward. Per chunk it recomputes the forward states from
the saved state entering the chunk, then runs the adjoint recurrence

    g[l] = dy[l] * C[l] + a[l'] * g[l']        (l' = the position scanned after l in the forward)

as a reversed associative scan, the gradient with respect to the carried state flowing across chunks.
With a[l] * x[l-1] = x[l] - b[l] the decay gradient needs neither a division nor a shifted state.
Per-channel gradients (du, ddelta, dz) are stored directly; reductions over channels (dB, dC per group)
and over batch and positions (dA, dD, ddelta_bias) are summed in float32 with atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_scan_common import ScanLaunchConfig, column, linear_recurrence_combine, softplus


@triton.jit
def _selective_scan_bwd_kernel(
    U, DELTA, A, B, C, D, Z, DELTA_BIAS, DOUT, CHUNK_STATES, DLAST,
    DU, DDELTA, DZ, DA, DB, DC, DD, DDELTA_BIAS,
    dim, length, dim_per_group, n_groups, n_chunks, n_state,
    N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, HAS_DLAST: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_bg = tl.program_id(1)
    batch_idx = pid_bg // n_groups
    group = pid_bg % n_groups

    offs_in_group = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_in_group < dim_per_group
    offs_d = group * dim_per_group + offs_in_group
    offs_n = tl.arange(0, N_PAD)
    n_mask = offs_n < n_state
    offs_t = tl.arange(0, CHUNK)
    dn_mask = d_mask[:, None] & n_mask[None, :]

    A_2d = tl.load(A + offs_d[:, None] * n_state + offs_n[None, :], mask=dn_mask, other=0.0)
    A_tile = A_2d[:, :, None]
    if HAS_D:
        D_vec = tl.load(D + offs_d, mask=d_mask, other=0.0)
    if HAS_BIAS:
        bias = tl.load(DELTA_BIAS + offs_d, mask=d_mask, other=0.0)

    row = (batch_idx * dim + offs_d).to(tl.int64)
    seq_row = row * length
    bc_row = ((batch_idx * n_groups + group) * n_state + offs_n).to(tl.int64) * length

    # Adjoint of the state that leaves the scan: the last state's incoming gradient, or zero.
    if HAS_DLAST:
        g_carry = tl.load(DLAST + row[:, None] * n_state + offs_n[None, :], mask=dn_mask, other=0.0)
    else:
        g_carry = tl.zeros((BLOCK_D, N_PAD), dtype=tl.float32)
    dA_acc = tl.zeros((BLOCK_D, N_PAD), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)

    for i in range(n_chunks):
        if REVERSE:
            chunk_idx = i
            offs_next = chunk_idx * CHUNK + offs_t - 1
        else:
            chunk_idx = n_chunks - 1 - i
            offs_next = chunk_idx * CHUNK + offs_t + 1
        offs_l = chunk_idx * CHUNK + offs_t
        l_mask = offs_l < length
        dl_mask = d_mask[:, None] & l_mask[None, :]
        ptrs = seq_row[:, None] + offs_l[None, :]

        u = tl.load(U + ptrs, mask=dl_mask, other=0.0).to(tl.float32)
        dt_raw = tl.load(DELTA + ptrs, mask=dl_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt_raw += bias[:, None]
        if SOFTPLUS:
            dt = softplus(dt_raw)
        else:
            dt = dt_raw
        dt = tl.where(dl_mask, dt, 0.0)

        # Decay of the position the forward scanned right after each l (identity past either end).
        next_mask = d_mask[:, None] & (offs_next >= 0)[None, :] & (offs_next < length)[None, :]
        dt_next = tl.load(DELTA + seq_row[:, None] + offs_next[None, :], mask=next_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt_next += bias[:, None]
        if SOFTPLUS:
            dt_next = softplus(dt_next)
        dt_next = tl.where(next_mask, dt_next, 0.0)

        bc_ptrs = bc_row[:, None] + offs_l[None, :]
        nl_mask = n_mask[:, None] & l_mask[None, :]
        B_tile = tl.load(B + bc_ptrs, mask=nl_mask, other=0.0).to(tl.float32)
        C_tile = tl.load(C + bc_ptrs, mask=nl_mask, other=0.0).to(tl.float32)
        state_ptrs = ((batch_idx * n_chunks + chunk_idx) * n_state + offs_n[None, :]).to(tl.int64) * dim
        h_in = tl.load(CHUNK_STATES + state_ptrs + offs_d[:, None], mask=dn_mask, other=0.0)

        # Recompute this chunk's forward states.
        decay = tl.exp(dt[:, None, :] * A_tile)
        dtu = dt * u
        drive = dtu[:, None, :] * B_tile[None, :, :]
        decay_cum, h_local = tl.associative_scan(
            (decay, drive), axis=2, combine_fn=linear_recurrence_combine, reverse=REVERSE
        )
        states = h_local + decay_cum * h_in[:, :, None]

        dout = tl.load(DOUT + ptrs, mask=dl_mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(Z + ptrs, mask=dl_mask, other=0.0).to(tl.float32)
            y = tl.sum(states * C_tile[None, :, :], axis=1)
            if HAS_D:
                y += D_vec[:, None] * u
            sig_z = tl.sigmoid(z)
            dz = dout * y * sig_z * (1.0 + z * (1.0 - sig_z))
            tl.store(DZ + ptrs, dz.to(DZ.dtype.element_ty), mask=dl_mask)
            dy = dout * z * sig_z
        else:
            dy = dout

        # Adjoint scan, in the opposite direction of the forward.
        decay_next = tl.exp(dt_next[:, None, :] * A_tile)
        emit = dy[:, None, :] * C_tile[None, :, :]
        g_cum, g_local = tl.associative_scan(
            (decay_next, emit), axis=2, combine_fn=linear_recurrence_combine, reverse=not REVERSE
        )
        grad_states = g_local + g_cum * g_carry[:, :, None]

        decayed_prev = states - drive  # = a[l] * x[previous position]
        g_dot_B = tl.sum(grad_states * B_tile[None, :, :], axis=1)
        ddt = u * g_dot_B + tl.sum(grad_states * decayed_prev * A_tile, axis=1)
        du = dt * g_dot_B
        if HAS_D:
            du += D_vec[:, None] * dy
            dD_acc += tl.sum(dy * u, axis=1)
        dA_acc += tl.sum(grad_states * decayed_prev * dt[:, None, :], axis=2)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(dt_raw)
        ddt = tl.where(dl_mask, ddt, 0.0)
        if HAS_BIAS:
            dbias_acc += tl.sum(ddt, axis=1)
        tl.store(DU + ptrs, du.to(DU.dtype.element_ty), mask=dl_mask)
        tl.store(DDELTA + ptrs, ddt.to(DDELTA.dtype.element_ty), mask=dl_mask)

        dB_part = tl.sum(grad_states * dtu[:, None, :], axis=0)
        dC_part = tl.sum(states * dy[:, None, :], axis=0)
        tl.atomic_add(DB + bc_ptrs, dB_part, mask=nl_mask)
        tl.atomic_add(DC + bc_ptrs, dC_part, mask=nl_mask)

        if REVERSE:
            g_carry = column(grad_states, offs_t, CHUNK - 1)
        else:
            g_carry = column(grad_states, offs_t, 0)

    tl.atomic_add(DA + offs_d[:, None] * n_state + offs_n[None, :], dA_acc, mask=dn_mask)
    if HAS_D:
        tl.atomic_add(DD + offs_d, dD_acc, mask=d_mask)
    if HAS_BIAS:
        tl.atomic_add(DDELTA_BIAS + offs_d, dbias_acc, mask=d_mask)


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
) -> dict[str, torch.Tensor | None]:
    """Gradients of every input on contiguous tensors; B, C are (batch, groups, N, L).

    ``config.chunk`` must equal the forward's (the saved chunk states are per chunk). du, ddelta, dz
    come back in u's dtype; dA, dD, ddelta_bias, dB, dC in float32 (the caller casts).
    """
    batch, dim, length = u.shape
    n_groups, n_state = B.shape[1], B.shape[2]
    dim_per_group = dim // n_groups
    n_chunks = chunk_states.shape[1]
    if n_chunks != triton.cdiv(length, config.chunk):
        raise ValueError("selective_scan backward: chunk size differs from the forward's")
    f32 = dict(device=u.device, dtype=torch.float32)
    grads: dict[str, torch.Tensor | None] = {
        "u": torch.empty_like(u),
        "delta": torch.empty_like(delta),
        "z": torch.empty_like(z) if z is not None else None,
        "A": torch.zeros(dim, n_state, **f32),
        "B": torch.zeros(batch, n_groups, n_state, length, **f32),
        "C": torch.zeros(batch, n_groups, n_state, length, **f32),
        "D": torch.zeros(dim, **f32) if D is not None else None,
        "delta_bias": torch.zeros(dim, **f32) if delta_bias is not None else None,
    }
    placeholder = grads["A"]
    grid = (triton.cdiv(dim_per_group, config.block_d), batch * n_groups)
    _selective_scan_bwd_kernel[grid](
        u, delta, A, B, C,
        D if D is not None else placeholder,
        z if z is not None else u,
        delta_bias if delta_bias is not None else placeholder,
        dout, chunk_states,
        dlast if dlast is not None else placeholder,
        grads["u"], grads["delta"],
        grads["z"] if z is not None else grads["u"],
        grads["A"], grads["B"], grads["C"],
        grads["D"] if D is not None else placeholder,
        grads["delta_bias"] if delta_bias is not None else placeholder,
        dim, length, dim_per_group, n_groups, n_chunks, n_state,
        N_PAD=triton.next_power_of_2(n_state), BLOCK_D=config.block_d, CHUNK=config.chunk,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, REVERSE=reverse, HAS_DLAST=dlast is not None,
        num_warps=config.num_warps,
    )
    return grads
