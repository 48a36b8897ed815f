"""Selective-scan benchmark: Triton kernels vs mamba-ssm's CUDA kernel vs the naive loop (CUDA only).

    python -m bench.scan [--mamba-src DIR] [--sweep] [--json results.json]

Times forward and forward+backward in bf16 with ``triton.testing.do_bench`` (median), in a Mamba block's
configuration (D, z, delta_bias, softplus). Achieved GB/s and the ratio to the HBM floor count only the
bytes that must move (every input read once, every output written once), against a device-to-device
copy bandwidth measured in the same run. The GPU-busy columns (forward; forward+backward) sum the kernels' own times
from torch.profiler: where one is well below its wall-clock column the shape is bound by the host. ``--mamba-src``
points at an unpacked mamba-ssm sdist whose ``csrc/selective_scan`` is compiled here with
``torch.utils.cpp_extension.load``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.scan_tables import format_sweep, format_table
from kernels.selective_scan_chunked import selective_scan_chunked
from kernels.selective_scan_ref import selective_scan_ref
from kernels.testing import make_scan_inputs, with_channel_last_sequences

# The four shapes (batch, dim, N, L); --shape replaces them (e.g. a Vim-S MAE step's: 256 768 16 50).
SHAPES = [(128, 768, 16, 50), (128, 768, 16, 197), (16, 768, 16, 1024), (16, 768, 16, 4096)]
NAIVE_MAX_L = 1024  # the per-position loop takes seconds beyond this; its time grows linearly anyway


def copy_bandwidth_gbs(n_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    import triton.testing

    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def floor_bytes(batch: int, dim: int, n_state: int, length: int, elem: int = 2) -> tuple[int, int]:
    """(forward, forward+backward) bytes that must move for bf16 tensors with D, z, delta_bias."""
    seq = batch * dim * length * elem
    bc = batch * n_state * length * elem
    params = dim * n_state * 4 + 2 * dim * 4
    fwd = 3 * seq + 2 * bc + params + seq  # read u, delta, z, B, C; write out
    bwd = 4 * seq + 2 * bc + params + 3 * seq + 2 * bc + params  # read u, delta, z, dout, B, C; write grads
    return fwd, fwd + bwd


def load_mamba_ssm_cuda(src_dir: Path) -> Any:
    """Compile mamba-ssm's selective scan extension (sm_90) from its sources; returns the module."""
    from torch.utils.cpp_extension import load

    csrc = src_dir / "csrc" / "selective_scan"
    sources = [str(csrc / "selective_scan.cpp")] + sorted(str(p) for p in csrc.glob("selective_scan_*.cu"))
    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("MAX_JOBS", "16")
    nvcc_flags = [
        "-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
        "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
        f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}",
    ]
    return load(name="selective_scan_cuda", sources=sources, extra_cflags=["-O3", "-std=c++17"],
                extra_cuda_cflags=nvcc_flags, extra_include_paths=[str(csrc)], verbose=False)


def mamba_scan_fn(ext: Any) -> Callable[..., torch.Tensor]:
    """mamba-ssm's selective_scan_fn (its autograd wiring) around the compiled extension."""

    class MambaScan(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u, delta, A, B, C, D, z, delta_bias):
            # mamba-ssm's Python wrapper does this too: its kernel takes (batch, groups, N, L) only.
            B, C = (t.unsqueeze(1) if t.dim() == 3 else t for t in (B, C))
            out, x, *rest = ext.fwd(u, delta, A, B, C, D, z, delta_bias, True)
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, x, out)
            return rest[0] if z is not None else out

        @staticmethod
        def backward(ctx, dout):
            u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
            du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = ext.bwd(
                u, delta, A, B, C, D, z, delta_bias, dout.contiguous(), x, out, None, True, False
            )
            dB, dC = (g.squeeze(1) if g.dim() == 4 and g.shape[1] == 1 else g for g in (dB, dC))
            return du, ddelta, dA, dB, dC, dD, rest[0] if z is not None else None, ddelta_bias

    def run(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
        return MambaScan.apply(u, delta, A, B, C, D, z, delta_bias)

    return run


def profiled_ms(fn: Callable[[], Any], iters: int = 20, device: bool = True) -> float:
    """Milliseconds per call summed over the operations' own times in torch.profiler: on the GPU (``device``) the
    kernels' time without the gaps in which the GPU waits for the host, which do_bench's wall clock includes at
    short shapes (L=50 is host-bound); ``device=False`` sums CPU time instead (tests)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    if device:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if device else ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
        if device:
            torch.cuda.synchronize()
    events = prof.key_averages()
    total_us = sum(e.self_device_time_total if device else e.self_cpu_time_total for e in events)
    return total_us / iters / 1e3


def time_backend(fn: Callable[..., torch.Tensor], inp: dict[str, torch.Tensor], rep_ms: int,
                 forward: bool = True, backward: bool = True, gpu_busy: bool = True) -> dict[str, float]:
    """Median forward and forward+backward milliseconds (fresh autograd graph per iteration); with ``gpu_busy`` also
    the forward's kernel time (``profiled_ms``)."""
    import triton.testing

    times: dict[str, float] = {}
    if forward:
        with torch.no_grad():
            times["fwd_ms"] = triton.testing.do_bench(lambda: fn(**inp, delta_softplus=True),
                                                      warmup=max(25, rep_ms // 4), rep=rep_ms,
                                                      return_mode="median")
    if forward and gpu_busy:
        try:
            with torch.no_grad():
                times["fwd_gpu_ms"] = profiled_ms(lambda: fn(**inp, delta_softplus=True))
        except Exception as exc:  # a diagnostic column: never lose the row for it
            print(f"  (no forward GPU-time column: {type(exc).__name__}: {exc})", flush=True)
    if not backward:
        return times
    leaves = {k: v.detach().requires_grad_() for k, v in inp.items()}
    dout = torch.randn_like(inp["u"])

    def fwd_bwd():
        out = fn(**leaves, delta_softplus=True)
        out.backward(dout)

    grads = [v for v in leaves.values()]
    times["fwd_bwd_ms"] = triton.testing.do_bench(fwd_bwd, warmup=max(25, rep_ms // 4), rep=rep_ms,
                                                  grad_to_none=grads, return_mode="median")

    def fresh_fwd_bwd():
        # As do_bench's grad_to_none: no gradient accumulation kernels in the profiled time.
        for v in grads:
            v.grad = None
        fwd_bwd()

    try:
        times["fwd_bwd_gpu_ms"] = profiled_ms(fresh_fwd_bwd)
    except Exception as exc:  # a diagnostic column: never lose the row for it
        print(f"  (no GPU-time column: {type(exc).__name__}: {exc})", flush=True)
    return times


# Sequence segments swept for v3 (forward and backward alike) at every shape.
SWEEP_SEGMENTS = (2, 4, 8, 16)
SWEEP_VARIANTS = ("v1", "v2", "v3")
# The v3 forward's tile lengths swept beside its default (ScanLaunchConfig.tile_l, 16).
SWEEP_V3_TILES = (4, 8, 32)


def time_forward_config(config: Any, inp: dict[str, torch.Tensor], rep_ms: int) -> float | None:
    """Forward ms of the Triton scan at launch config ``config``, or None (reported) when it fails to compile."""
    from kernels.selective_scan_triton import selective_scan_triton

    def fn(**kw: Any) -> torch.Tensor:
        return selective_scan_triton(**kw, fwd_config=config, bwd_config=None)

    try:
        return time_backend(fn, inp, rep_ms, backward=False, gpu_busy=False)["fwd_ms"]
    except Exception as exc:  # a tile or variant that fails to compile is reported, not fatal
        print(f"    fwd {config}: {type(exc).__name__}: {str(exc)[-200:]}")
        return None


def sweep_tiles(inp: dict[str, torch.Tensor], rep_ms: int,
                variants: tuple[str, ...] = SWEEP_VARIANTS) -> list[dict[str, Any]]:
    """Time the tile options: the forward alone per block_d (4 / 8 / 16 / 32; block_d 4 for batch 16 at long L, where
    a forward warp walks thousands of positions), then forward+backward (behind the default forward) per backward
    option: block_d 16 at maxnreg none / 168 / 200 without and none / 200 with prefetch, and uncapped block_d 8 /
    4 (more programs at small batch). Then the same for the "v2" kernels (ScanLaunchConfig.variant): forward
    block_d 4 / 8 / 16 / 32, and forward+backward behind the v2 default forward at backward block_d 16 with and without
    prefetch (and with prefetch capped at 200 / 168 registers), block_d 8 with and without, and block_d 4. Then the
    "v3" kernels (one lane per channel): forward block_d 16 / 32 / 64 at chunk 4, and forward+backward (behind the v3
    forward of the same block_d and chunk) at block_d 16 / 32 / 64, chunk 2 and 4, with and without prefetch at
    block_d 32, and at block_d 32, chunk 2 capped at 168 registers with and without prefetch; and v3 at block_d 32
    with each sequence split into SWEEP_SEGMENTS segments (forward, and forward+backward with the same count on both
    sides). ``variants`` keeps only those variants' rows."""
    from kernels.selective_scan_triton import launch_configs, selective_scan_triton
    from kernels.triton_scan_common import ScanLaunchConfig, is_channel_last

    rows = []
    fwd_options = [(4, "v1", 1), (8, "v1", 1), (16, "v1", 1), (32, "v1", 1), (4, "v2", 1), (8, "v2", 1),
                   (16, "v2", 1), (32, "v2", 1), (16, "v3", 1), (32, "v3", 1), (64, "v3", 1)] + [
        (32, "v3", segments) for segments in SWEEP_SEGMENTS]
    fwd_configs = [ScanLaunchConfig(block_d, 4, variant=variant, segments=segments)
                   for block_d, variant, segments in fwd_options] + [
        ScanLaunchConfig(32, 4, variant="v3", tile_l=tile_l) for tile_l in SWEEP_V3_TILES]
    for cfg in (c for c in fwd_configs if c.variant in variants):
        ms = time_forward_config(cfg, inp, rep_ms)
        if ms is not None:
            rows.append({"pass": "fwd", "variant": cfg.variant, "block_d": cfg.block_d, "maxnreg": None,
                         "prefetch": False, "segments": cfg.segments,
                         "tile_l": cfg.tile_l if cfg.variant == "v3" else None, "ms": ms})
    # 200 registers: 10 resident warps per multiprocessor and no spills offline (168: 12, with spills).
    bwd_options = [(16, None, False, "v1"), (16, 168, False, "v1"), (16, 200, False, "v1"), (16, None, True, "v1"),
                   (16, 200, True, "v1"), (8, None, False, "v1"), (4, None, False, "v1"),
                   (16, None, False, "v2"), (16, None, True, "v2"), (16, 200, True, "v2"), (16, 168, True, "v2"),
                   (8, None, False, "v2"), (8, None, True, "v2"), (4, None, False, "v2")]
    bwd_options = [opt + (4, 1) for opt in bwd_options] + [
        (32, None, False, "v3", 2, 1), (32, None, True, "v3", 2, 1), (32, None, False, "v3", 4, 1),
        (32, None, True, "v3", 4, 1), (16, None, False, "v3", 2, 1), (16, None, False, "v3", 4, 1),
        (64, None, False, "v3", 2, 1),
        # 168 registers: 12 resident warps instead of 9, without spills offline at chunk 2 (thirteenth session).
        (32, 168, False, "v3", 2, 1), (32, 168, True, "v3", 2, 1),
    ] + [(32, None, False, "v3", 4, segments) for segments in SWEEP_SEGMENTS]
    bwd_options = [opt for opt in bwd_options if opt[3] in variants]
    # Each v1 / v2 backward runs behind the same variant's default forward, a v3 one behind its own tiles.
    default_fwd, _ = launch_configs(inp["A"].shape[1], inp["u"].shape[-1], None, None,
                                   channel_last=is_channel_last(inp["u"]))
    for block_d, maxnreg, prefetch, variant, chunk, segments in bwd_options:
        cfg = ScanLaunchConfig(block_d, chunk, maxnreg=maxnreg, prefetch=prefetch, variant=variant, segments=segments)
        fwd_cfg = dataclasses.replace(default_fwd, variant=variant)
        if variant == "v3":
            fwd_cfg = ScanLaunchConfig(block_d, chunk, variant=variant, segments=segments)
        fn = (lambda f, c: lambda **kw: selective_scan_triton(**kw, fwd_config=f, bwd_config=c))(fwd_cfg, cfg)
        try:
            t = time_backend(fn, inp, rep_ms, forward=False)
        except Exception as exc:  # a variant that fails to compile is reported, not fatal
            print(f"    bwd {cfg}: {type(exc).__name__}: {str(exc)[-200:]}")
            continue
        rows.append({"pass": "fwd+bwd", "variant": variant, "block_d": block_d, "maxnreg": maxnreg,
                     "prefetch": prefetch, "chunk": chunk, "segments": segments, "ms": t["fwd_bwd_ms"],
                     "gpu_ms": t.get("fwd_bwd_gpu_ms")})
    return rows


# v4 forward tiles (channels per program, positions per span) swept at the long-sequence shapes.
V4_SWEEP_TILES = tuple((block_d, block_l) for block_d in (4, 8, 16) for block_l in (128, 256))
V4_SWEEP_MIN_L = 1024


def sweep_v4_tiles(inp: dict[str, torch.Tensor], rep_ms: int) -> list[dict[str, Any]]:
    """Time the v4 forward (parallel over positions) at each of V4_SWEEP_TILES, with the default forward's chunk
    (the chunk states it saves are v1's)."""
    from kernels.selective_scan_triton import launch_configs

    default_fwd, _ = launch_configs(inp["A"].shape[1], inp["u"].shape[-1], None, None)
    rows = []
    for block_d, block_l in V4_SWEEP_TILES:
        cfg = dataclasses.replace(default_fwd, variant="v4", block_d=block_d, block_l=block_l)
        ms = time_forward_config(cfg, inp, rep_ms)
        if ms is not None:
            rows.append({"pass": "fwd", "variant": "v4", "block_d": block_d, "block_l": block_l, "maxnreg": None,
                         "prefetch": False, "segments": 1, "chunk": cfg.chunk, "ms": ms})
    return rows


def triton_variant_fn(variant: str, **options: Any) -> Callable[..., torch.Tensor]:
    """selective_scan_triton with its default tiles (as picked for this device and shape) in ``variant``, with the
    forward's ScanLaunchConfig ``options`` (e.g. bf16_states=True)."""
    from kernels.selective_scan_triton import selective_scan_triton, variant_configs

    def run(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
        fwd, bwd = variant_configs(variant, A.shape[1], u.shape[-1], u.shape[0] * u.shape[1], u.device)
        fwd = dataclasses.replace(fwd, **options) if options else fwd
        return selective_scan_triton(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                     delta_softplus=delta_softplus, fwd_config=fwd, bwd_config=bwd)

    return run


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kernels.selective_scan_triton import selective_scan_triton
    from kernels.triton_scan_common import DEFAULT_VARIANT

    device_name = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth_gbs()
    print(f"device: {device_name}; copy bandwidth {bandwidth:.0f} GB/s (read+write)", flush=True)
    backends: dict[str, Callable[..., torch.Tensor]] = {"triton": selective_scan_triton,  # the default (v2)
                                                        "triton_v1": triton_variant_fn("v1"),
                                                        "triton_v2": triton_variant_fn("v2"),
                                                        "triton_v3": triton_variant_fn("v3"),
                                                        # the v4 forward (parallel over positions), v2 backward
                                                        "triton_v4": triton_variant_fn("v4"),
                                                        # the defaults' kernels, chunk states saved in bfloat16
                                                        "triton_bf16_states": triton_variant_fn(
                                                            DEFAULT_VARIANT, bf16_states=True)}
    mamba_note = "not requested (--mamba-src)"
    if args.mamba_src:
        t0 = time.time()
        try:
            backends["mamba_ssm"] = mamba_scan_fn(load_mamba_ssm_cuda(Path(args.mamba_src)))
            mamba_note = f"compiled from {args.mamba_src} in {time.time() - t0:.0f} s"
        except Exception as exc:  # report the build failure in the table rather than aborting the run
            mamba_note = f"build failed: {type(exc).__name__}: {str(exc)[-400:]}"
        print(f"mamba-ssm: {mamba_note}", flush=True)
    backends["chunked_torch"] = selective_scan_chunked
    backends["naive_loop"] = selective_scan_ref
    if args.backends:
        unknown = set(args.backends) - set(backends) - {"mamba_ssm"}
        if unknown:
            raise SystemExit(f"bench/scan.py: unknown --backends {sorted(unknown)}; known: {sorted(backends)}")
        backends = {k: v for k, v in backends.items() if k in args.backends}

    rows: list[dict[str, Any]] = []
    sweeps: dict[str, list[dict[str, Any]]] = {}
    for batch, dim, n_state, length in args.shape or SHAPES:
        inp = make_scan_inputs(batch, dim, length, n_state, groups=None, dtype=torch.bfloat16, seed=length,
                               device="cuda")
        if args.layout == "channel_last":
            inp = with_channel_last_sequences(inp)
        fwd_bytes, fb_bytes = floor_bytes(batch, dim, n_state, length)
        shape = f"({batch}, {dim}, {n_state}, L={length})" + (" channel-last" if args.layout == "channel_last" else "")
        for name, fn in backends.items():
            if name == "naive_loop" and length > NAIVE_MAX_L:
                continue
            try:
                t = time_backend(fn, inp, args.rep_ms if name != "naive_loop" else 50)
            except Exception as exc:  # keep the other rows when one backend fails
                print(f"  {shape} {name}: failed: {type(exc).__name__}: {str(exc)[-300:]}", flush=True)
                continue
            rows.append({
                "shape": shape, "backend": name, **t,
                "fwd_GBps": fwd_bytes / (t["fwd_ms"] * 1e-3) / 1e9,
                "fwd_bwd_GBps": fb_bytes / (t["fwd_bwd_ms"] * 1e-3) / 1e9,
                "fwd_x_floor": t["fwd_ms"] / (fwd_bytes / (bandwidth * 1e9) * 1e3),
                "fwd_bwd_x_floor": t["fwd_bwd_ms"] / (fb_bytes / (bandwidth * 1e9) * 1e3),
            })
            print(f"  {shape} {name}: fwd {t['fwd_ms']:.3f} ms, fwd+bwd {t['fwd_bwd_ms']:.3f} ms", flush=True)
        # After the backend rows, so that a run cut short still has them.
        if args.sweep is not None:
            sweeps[shape] = sweep_tiles(inp, rep_ms=max(20, args.rep_ms // 4),
                                        variants=tuple(args.sweep) or SWEEP_VARIANTS)
        if args.sweep_v4 and length >= V4_SWEEP_MIN_L:
            sweeps[shape] = sweeps.get(shape, []) + sweep_v4_tiles(inp, rep_ms=max(20, args.rep_ms // 4))
        if shape in sweeps:
            print(f"swept {shape}: " + "; ".join(f"{r['pass']} {r['variant']} bd {r['block_d']} "
                                                 f"reg {r['maxnreg']} prefetch {r['prefetch']} "
                                                 f"seg {r['segments']}: {r['ms']:.3f}"
                                                 for r in sweeps[shape]), flush=True)
        del inp
        torch.cuda.empty_cache()
    for row in rows:
        ref = next((r for r in rows if r["shape"] == row["shape"] and r["backend"] == "mamba_ssm"), None)
        row["fwd_bwd_speedup_vs_mamba"] = ref["fwd_bwd_ms"] / row["fwd_bwd_ms"] if ref else None
        row["fwd_speedup_vs_mamba"] = ref["fwd_ms"] / row["fwd_ms"] if ref else None
    return {
        "device": device_name, "torch": torch.__version__, "triton": __import__("triton").__version__,
        "copy_bandwidth_GBps": bandwidth, "mamba_ssm": mamba_note, "dtype": "bfloat16",
        "config": "D, z, delta_bias, delta_softplus=True", "rows": rows, "sweeps": sweeps,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mamba-src", default=None, help="unpacked mamba-ssm sdist to compile and compare")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="only these rows (triton, triton_v1, triton_v2, triton_v3, triton_v4, mamba_ssm, "
                             "chunked_torch, naive_loop)")
    parser.add_argument("--sweep", nargs="*", default=None, choices=SWEEP_VARIANTS, metavar="VARIANT",
                        help="also time the tile options (forward block_d; backward block_d, maxnreg, prefetch) of "
                             f"these variants (none named: all of {', '.join(SWEEP_VARIANTS)})")
    parser.add_argument("--sweep-v4", action="store_true",
                        help=f"also time the v4 forward's tiles (block_d, block_l) at L >= {V4_SWEEP_MIN_L}")
    parser.add_argument("--shape", nargs=4, type=int, action="append", metavar=("BATCH", "DIM", "N", "L"),
                        help="time this shape instead of the issue's four (repeatable)")
    parser.add_argument("--layout", choices=("contiguous", "channel_last"), default="contiguous",
                        help="u / delta / z as (batch, dim, L) contiguous (mamba-ssm's callers) or channel-last "
                             "(batch, L, dim) memory, a Vim block's: e.g. --shape 768 768 16 50 --layout channel_last "
                             "--sweep v1 v2 sweeps the tiles of a Vim-S batch-768 step's scans")
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per measurement")
    parser.add_argument("--json", default=None, help="write the full results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/scan.py needs a CUDA GPU")
    result = run(args)
    table = format_table(result)
    print(f"\n{result['device']}, copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s, bf16, "
          f"{result['config']}; mamba-ssm: {result['mamba_ssm']}\n{table}")
    if result["sweeps"]:
        print("\ntile sweep (ms; backward rows behind their variant's default forward):\n"
              + format_sweep(result["sweeps"]))
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "table": table}, indent=1))


if __name__ == "__main__":
    main()
