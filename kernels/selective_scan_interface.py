"""Public selective scan: backend dispatch over the reference, chunked, Triton and mamba-ssm paths."""

from __future__ import annotations

import importlib.util

import torch

from kernels.selective_scan_checks import check_scan_inputs
from kernels.selective_scan_chunked import selective_scan_chunked
from kernels.selective_scan_ref import selective_scan_ref

# "triton_v1" / "triton_v2" / "triton_v3" / "triton_v4": the Triton kernels in that variant
# (kernels/triton_scan_common.py: ScanLaunchConfig); "triton" runs the default variant (DEFAULT_VARIANT, v2 since the
# nineteenth session). v4 is a forward only (parallel over positions); "triton_v4" runs it with the v2 backward.
BACKENDS = ("auto", "triton", "triton_v1", "triton_v2", "triton_v3", "triton_v4", "chunked", "reference",
            "mamba_ssm")


def mamba_ssm_available() -> bool:
    """Whether mamba-ssm's compiled selective scan can be imported."""
    return importlib.util.find_spec("mamba_ssm") is not None and importlib.util.find_spec("selective_scan_cuda") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to a concrete backend: triton on CUDA, the chunked torch path elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"selective_scan: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "chunked"
    return backend


def _mamba_ssm_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse):
    # Checked in eager code only: dynamo skips importlib (a graph break per call otherwise); without the package,
    # tracing the import below fails and eager code reports it.
    if not torch.compiler.is_compiling() and not mamba_ssm_available():
        raise RuntimeError("selective_scan: backend 'mamba_ssm' requested but mamba_ssm is not installed")
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_scan

    if reverse:
        # mamba-ssm has no reverse scan: this comparison backend flips (copies) the sequence instead.
        flip = lambda t: None if t is None else t.flip(-1)  # noqa: E731
        result = mamba_scan(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), delta_bias,
                            delta_softplus, return_last_state)
        if return_last_state:
            return result[0].flip(-1), result[1]
        return result.flip(-1)
    return mamba_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def selective_scan_fn(
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
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan (Mamba S6) matching ``mamba_ssm.selective_scan_fn`` where the arguments overlap.

    u, delta, z: (batch, dim, L); A: (dim, N) real; B, C: (batch, N, L) or (batch, groups, N, L);
    D, delta_bias: (dim,). Inputs fp32/fp16/bf16 (fp64 on the torch backends); the state and all
    accumulation are float32; ``out`` (batch, dim, L) comes back in u's dtype, and with
    ``return_last_state`` also the float32 final state (batch, dim, N). ``reverse`` scans right to left.
    ``backend``: "triton", "chunked" (pure torch, fast on CPU), "reference" (explicit loop),
    "mamba_ssm" (when installed), or "auto" (triton on CUDA, chunked otherwise); "triton_v1" / "triton_v2" /
    "triton_v3" / "triton_v4" run one kernel variant with their default tiles (v4: its forward, the v2 backward).
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    chosen = resolve_backend(backend, u.device)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse)
    if chosen == "reference":
        return selective_scan_ref(*args)
    if chosen == "chunked":
        return selective_scan_chunked(*args)
    if chosen == "mamba_ssm":
        return _mamba_ssm_scan(*args)
    from kernels.selective_scan_triton import selective_scan_triton, variant_configs

    if chosen == "triton":
        return selective_scan_triton(*args)
    configs = variant_configs.__wrapped__ if torch.compiler.is_compiling() else variant_configs  # as launch_configs
    fwd, bwd = configs(chosen.removeprefix("triton_"), A.shape[1], u.shape[-1], u.shape[0] * u.shape[1],
                               u.device)
    return selective_scan_triton(*args, fwd_config=fwd, bwd_config=bwd)
