"""Argument validation shared by every selective-scan backend, so all of them fail the same way."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_scan_inputs(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
) -> None:
    """Raise ValueError naming the offending argument when shapes, dtypes or devices disagree."""
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L), got shape {_shape(u)}")
    batch, dim, length = u.shape
    if length < 1:
        raise ValueError("selective_scan: sequence length L must be at least 1")
    if u.dtype not in FLOAT_DTYPES:
        raise ValueError(f"selective_scan: u must be a floating tensor, got {u.dtype}")
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta must have u's shape {_shape(u)}, got {_shape(delta)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must have u's shape {_shape(u)}, got {_shape(z)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim={dim}, N), got {_shape(A)}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported (real A only)")
    n_state = A.shape[1]
    for name, bc in (("B", B), ("C", C)):
        if bc.dim() == 3:
            ok = bc.shape == (batch, n_state, length)
        elif bc.dim() == 4:
            groups = bc.shape[1]
            ok = bc.shape[0] == batch and bc.shape[2:] == (n_state, length) and groups >= 1 and dim % groups == 0
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"selective_scan: {name} must be (batch={batch}, N={n_state}, L={length}) or "
                f"(batch, groups, N, L) with groups dividing dim={dim}; got {_shape(bc)}"
            )
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None and vec.shape != (dim,):
            raise ValueError(f"selective_scan: {name} must be (dim={dim},), got {_shape(vec)}")
    tensors = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device != u.device:
            raise ValueError(f"selective_scan: {name} is on {t.device} but u is on {u.device}")
        if not t.is_floating_point():
            raise ValueError(f"selective_scan: {name} must be floating point, got {t.dtype}")
