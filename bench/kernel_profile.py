"""Device time of a training step by kernel kind (torch.profiler), for ``bench.pretrain --profile_steps``."""

from __future__ import annotations

from collections.abc import Callable

import torch

# Kernel kinds by name, first match wins: our selective scans (Triton kernels named after their Python functions,
# with no "triton" in the name), attention (before convolutions: cuDNN's SDPA kernels are named
# "cudnn_..._sdpa_..._flash_fprop"), convolutions (cuDNN's forward / data / weight gradient kernels, the native
# depthwise ones and our Triton causal conv's: the Mamba blocks' causal conv), cuBLAS / CUTLASS matrix products,
# the optimizer, other Triton kernels (torch.compile's fused elementwise and reduction code), copies, the rest
# (eager elementwise, norms).
KERNEL_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("scan", ("_scan_fwd_kernel", "_scan_bwd_kernel", "_scan_segment_summary")),
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa")),
    ("conv", ("fprop", "dgrad", "wgrad", "depthwise", "cudnn", "_conv_fwd_kernel", "_conv_bwd_kernel")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "wgmma", "addmm", "aten::mm", "bmm")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("triton", ("triton",)),
    ("copy", ("memcpy", "memset", "copy", "cat", "gather", "scatter", "index")),
)


def kernel_kind(name: str) -> str:
    """The kind of a device kernel (or a CPU operation when profiling on the CPU) from its name."""
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


# Kernels kept per profiled row in the JSON (the table prints the first PRINTED_KERNELS): enough to attribute a
# step's smaller fused kernels, which the twenty-fifth session's top 12 left as a 32 ms lump.
KEPT_KERNELS, PRINTED_KERNELS = 80, 12


def profile_kernels(step: Callable[[], object], steps: int, device: torch.device,
                    top: int = KEPT_KERNELS) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Run ``step`` ``steps`` times under torch.profiler; device ms per step by kernel kind (plus ``total``) and the
    ``top`` kernels by device ms per step. On the CPU the operations' own CPU times stand in for kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        sync()
    per_kernel: dict[str, float] = {}
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0 and (not cuda or event.device_type.name == "CUDA"):
            per_kernel[event.key] = per_kernel.get(event.key, 0.0) + us / 1000 / steps
    by_kind: dict[str, float] = {}
    for name, ms in per_kernel.items():
        kind = kernel_kind(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + ms
    by_kind = {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}
    by_kind["total"] = round(sum(per_kernel.values()), 3)
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]
    return by_kind, [(name[:120], round(ms, 3)) for name, ms in ranked]
