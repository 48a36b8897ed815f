"""Forward and backward kernel variants crossed: every (forward variant, backward variant) pair at each shape.

    python -m bench.scan_cross [--variants v2 v3] [--pairs FWD:BWD ...] [--shape B D N L ...] [--layout ...]
                               [--rep-ms 100] [--json FILE]

Every variant saves the chunk states in one layout, so a forward of one variant can feed the backward of another
(``tests/test_scan_triton.py`` and ``tests/test_scan_options.py`` check the mixes). Each variant runs with its own default tiles for the shape and
device (``variant_configs``: v3 with its sequence segments at small batch); the v2 names set layout options
(``V2_LAYOUT_OPTIONS``) or sequence segments (``v2s<k>``). Prints forward ms per forward variant
and forward+backward ms (wall and GPU-busy) per pair, fastest pair marked; the defaults' row for comparison.

``--layout`` says how u, delta and z reach the kernels: ``contiguous`` (batch, dim, L), mamba-ssm's callers' layout;
``channel_last`` (batch, L, dim) memory seen as (batch, dim, L), a Vim block's; ``transposed``: contiguous inputs
copied channel-last inside the timed call (and out copied back; the backward's gradients through autograd's own
copies), the cost of serving the first layout with kernels that read the second.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from bench.scan import SHAPES, time_backend
from kernels.testing import make_scan_inputs, with_channel_last_sequences

LAYOUTS = ("contiguous", "channel_last", "transposed")


# The v2 variants by their layout options (ScanLaunchConfig): "v2" none; "v2t" chunk tiles both ways (tile_io);
# "v2x" the backward on channel-last copies (transpose_io), the forward plain; "v2g" v2x writing its gradients as
# contiguous chunk tiles (tile_grads); "v2b" / "v2tb": v2 / v2t with the chunk states saved in bfloat16 (bf16_states).
V2_LAYOUT_OPTIONS = {
    "v2": ({}, {}),
    "v2t": ({"tile_io": True}, {"tile_io": True}),
    "v2b": ({"bf16_states": True}, {}),
    "v2tb": ({"tile_io": True, "bf16_states": True}, {"tile_io": True}),
    "v2x": ({}, {"transpose_io": True}),
    "v2g": ({}, {"transpose_io": True, "tile_grads": True}),
}
VARIANTS = ["v1", "v3", *V2_LAYOUT_OPTIONS]


SEGMENTED_NAME = re.compile(r"v2s([1-9]\d*)(?:r([1-9]\d*))?")
# "v1d32", "v2d16": v1 / v2 with that forward block_d (the backward's tiles as the plain variant's), to time forward
# tiles behind one backward.
WIDTH_NAME = re.compile(r"v([12])d([1-9]\d*)")


def variant_name(name: str) -> str:
    """A --variants entry: one of VARIANTS, or "v2s<k>[r<registers>]": v2t with its sequences split into k segments
    both ways (ScanLaunchConfig.segments; for grids too small to fill the device), optionally under a register cap
    (ScanLaunchConfig.maxnreg: more resident warps for the split backward)."""
    if name in VARIANTS or SEGMENTED_NAME.fullmatch(name) or WIDTH_NAME.fullmatch(name):
        return name
    raise argparse.ArgumentTypeError(f"unknown variant {name!r}: one of {VARIANTS}, v2s<segments>[r<registers>] "
                                     f"(e.g. v2s4, v2s4r128) or v<1|2>d<forward block_d> (e.g. v2d32)")


def variant_pair(variant: str, n_state: int, length: int, rows: int) -> tuple[Any, Any]:
    """The (forward, backward) configs of a variant name: its kernels' default tiles on this device, v1 / v2 with no
    layout option but the name's (V2_LAYOUT_OPTIONS)."""
    from kernels.selective_scan_triton import variant_configs

    fwd, bwd = variant_configs(variant[:2], n_state, length, rows, torch.device("cuda"))
    if fwd.variant not in ("v1", "v2"):
        return fwd, bwd
    split, width = SEGMENTED_NAME.fullmatch(variant), WIDTH_NAME.fullmatch(variant)
    if width:
        fwd_options, bwd_options = {"block_d": int(width[2])}, {}
    elif split:
        fwd_options = bwd_options = {"tile_io": True, "segments": int(split[1]),
                                     "maxnreg": int(split[2]) if split[2] else None}
    else:
        fwd_options, bwd_options = V2_LAYOUT_OPTIONS.get(variant, ({}, {}))
    plain = {"tile_io": False, "transpose_io": False, "tile_grads": False, "bf16_states": False}
    return (dataclasses.replace(fwd, **{**plain, **fwd_options}), dataclasses.replace(bwd, **{**plain, **bwd_options}))


def cross_rows(shape: tuple[int, int, int, int], variants: list[str], rep_ms: int,
               mamba: Any = None, layout: str = "contiguous",
               pairs: list[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """One row per (forward variant, backward variant), plus the defaults ("default", "default") and, given
    ``mamba`` (bench.scan.mamba_scan_fn's function), mamba-ssm's CUDA scan ("mamba_ssm", "mamba_ssm")."""
    from kernels.selective_scan_triton import selective_scan_triton

    batch, dim, n_state, length = shape
    inp = make_scan_inputs(batch, dim, length, n_state, groups=None, dtype=torch.bfloat16, seed=length,
                           device="cuda")
    if layout == "channel_last":
        inp = with_channel_last_sequences(inp)
    configs = {v: variant_pair(v, n_state, length, batch * dim) for v in variants}
    pairs = pairs or [(f, b) for f in variants for b in variants]
    pairs = pairs + [("default", "default")]
    rows = []
    for fwd_variant, bwd_variant in pairs:
        if fwd_variant == "default":
            fwd_cfg = bwd_cfg = None
        else:
            fwd_cfg = configs[fwd_variant][0]
            bwd_cfg = dataclasses.replace(configs[bwd_variant][1], chunk=fwd_cfg.chunk)

        def fn(f=fwd_cfg, b=bwd_cfg, **kw: Any) -> torch.Tensor:
            if layout == "transposed":
                kw = with_channel_last_sequences(kw)
                return selective_scan_triton(**kw, fwd_config=f, bwd_config=b).contiguous()
            return selective_scan_triton(**kw, fwd_config=f, bwd_config=b)

        times = time_backend(fn, inp, rep_ms)
        rows.append({"shape": list(shape), "layout": layout, "fwd": fwd_variant, "bwd": bwd_variant, **times})
        report(rows[-1])
    if mamba is not None:
        rows.append({"shape": list(shape), "layout": layout, "fwd": "mamba_ssm", "bwd": "mamba_ssm", **time_backend(mamba, inp, rep_ms)})
        report(rows[-1])
    return rows


def report(row: dict[str, Any]) -> None:
    print(f"{tuple(row['shape'])} {row['layout']} fwd {row['fwd']} bwd {row['bwd']}: fwd {row['fwd_ms']:.3f} ms, fwd+bwd "
          f"{row['fwd_bwd_ms']:.3f} ms (GPU-busy {row.get('fwd_bwd_gpu_ms') or float('nan'):.3f})", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["v2", "v3"], type=variant_name,
                        help="kernel variants, every pair timed; v2t / v2x / v2g: v2 with layout options "
                             "(V2_LAYOUT_OPTIONS); v2s<k>[r<regs>]: v2t with k sequence segments "
                             "(and a register cap)")
    parser.add_argument("--pairs", nargs="+", default=None, metavar="FWD:BWD",
                        help="time only these (forward, backward) pairs of --variants, e.g. v2t:v2t v2t:v2x")
    parser.add_argument("--shape", nargs=4, type=int, action="append", metavar=("BATCH", "DIM", "N", "L"),
                        help="time this shape instead of the issue's four (repeatable)")
    parser.add_argument("--layout", nargs="+", default=["contiguous"], choices=LAYOUTS,
                        help="u / delta / z layouts to time, each a set of rows (see the module's docstring)")
    parser.add_argument("--rep-ms", type=int, default=100)
    parser.add_argument("--mamba-src", default=None, help="unpacked mamba-ssm sdist: its CUDA scan as a row")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    pairs = None
    if args.pairs:
        pairs = [tuple(p.split(":")) for p in args.pairs]
        unknown = {v for pair in pairs for v in pair} - set(args.variants)
        if unknown or any(len(pair) != 2 for pair in pairs):
            parser.error(f"--pairs: each FWD:BWD of --variants, got {args.pairs}")
    if not torch.cuda.is_available():
        raise SystemExit("bench/scan_cross.py needs a CUDA GPU")
    mamba = None
    if args.mamba_src:
        from bench.scan import load_mamba_ssm_cuda, mamba_scan_fn

        try:
            mamba = mamba_scan_fn(load_mamba_ssm_cuda(Path(args.mamba_src)))
        except Exception as exc:  # the crossed rows still count without it
            print(f"mamba-ssm: build failed: {type(exc).__name__}: {str(exc)[-300:]}", flush=True)
    rows = []
    for shape in args.shape or SHAPES:
        for layout in args.layout:
            rows += cross_rows(tuple(shape), args.variants, args.rep_ms, mamba if layout == "contiguous" else None,
                               layout, pairs)
            torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}, bf16, ms (fwd+bwd wall / GPU-busy; * fastest of the shape):")
    for shape in dict.fromkeys(tuple(r["shape"]) for r in rows):
        sel = [r for r in rows if tuple(r["shape"]) == shape]
        best = min(r["fwd_bwd_ms"] for r in sel)
        print(f"{shape}: " + "  ".join(
            f"{r['layout'][:2]}:{r['fwd']}->{r['bwd']} {r['fwd_bwd_ms']:.3f}{'*' if r['fwd_bwd_ms'] == best else ''}"
            f"/{r.get('fwd_bwd_gpu_ms') or float('nan'):.3f}" for r in sel))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
