"""Causal depthwise conv1d backends at the Vim shapes: forward and forward+backward, GPU time and achieved bandwidth.

    python -m bench.conv [--backends torch triton] [--launches WARPS:CHUNK ...] [--json out.json]

Each shape is timed as a Vim block hands x over (``channel_last``: a (batch, dim, L) view of the input projection's
(batch, L, 2 * dim) output, its gradient channel-last too) and, for reference, contiguous. The time is the kernels'
own (torch.profiler, ``bench.scan.profiled_ms``: no host gaps, as under CUDA graphs); GB/s counts the bytes the conv
must move in its dtype (forward: x read, out written; backward: x and dout read, dx written).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import torch

from bench.report import write_device_rows
from bench.scan import profiled_ms
from kernels.causal_conv1d import causal_conv1d_fn

if TYPE_CHECKING:
    from kernels.triton_causal_conv1d import ConvLaunch

# (name, batch, dim, L): the Vim-S/16 MAE encoder at 224 px (49 visible patches + the class token), Vim-B/16 at
# 1024 px (every patch: the encoder of a fine-tune, or an MAE at mask ratio 0 as the worst case).
SHAPES = (("Vim-S 224 encoder", 256, 768, 50), ("Vim-B 1024", 16, 1536, 4096))
WIDTH = 4


def make_inputs(batch: int, dim: int, length: int, channel_last: bool, device: str = "cuda",
                dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, weight, bias (leaves needing gradients) and the output's gradient in the layout a Vim block gives them."""
    gen = torch.Generator(device=device).manual_seed(0)
    if channel_last:
        xz = torch.randn(batch, length, 2 * dim, device=device, dtype=dtype, generator=gen)
        x = xz.transpose(1, 2)[:, :dim].requires_grad_(True)  # a leaf with the view's strides
        dout = torch.randn(batch, length, dim, device=device, dtype=dtype, generator=gen).transpose(1, 2)
    else:
        x = torch.randn(batch, dim, length, device=device, dtype=dtype, generator=gen).requires_grad_(True)
        dout = torch.randn(batch, dim, length, device=device, dtype=dtype, generator=gen)
    weight = torch.randn(dim, WIDTH, device=device, generator=gen).requires_grad_(True)
    bias = torch.randn(dim, device=device, generator=gen).requires_grad_(True)
    return x, weight, bias, dout


def time_conv(backend: str, batch: int, dim: int, length: int, channel_last: bool, reverse: bool = False,
              device: bool = True, launch: ConvLaunch | None = None) -> dict[str, float]:
    """Forward and forward+backward ms (kernel time per call) and GB/s of one conv with SiLU, as a Vim mixer runs it.
    ``device=False`` sums CPU time instead (tests on the CPU). ``launch`` (backend "triton" only) times the Triton
    kernels under that tiling instead of ``conv_launch``'s, called directly rather than through autograd."""
    # (Imported here: a baseline revision's tree, which bench/gpu_scan_session.sh conv copies this file into, may
    # predate these functions.)
    from kernels.triton_causal_conv1d import causal_conv1d_triton_bwd, causal_conv1d_triton_fwd

    on = "cuda" if device else "cpu"
    x, weight, bias, dout = make_inputs(batch, dim, length, channel_last, on)

    def forward() -> torch.Tensor:
        if launch is not None:
            return causal_conv1d_triton_fwd(x, weight, bias, True, reverse, launch=launch)
        with torch.autocast(on, dtype=torch.bfloat16):  # as in pretraining: float32 weights, bf16 activations
            return causal_conv1d_fn(x, weight, bias, "silu", backend=backend, reverse=reverse)

    def forward_backward() -> None:
        if launch is not None:
            forward()
            causal_conv1d_triton_bwd(x, weight, bias, dout, True, reverse, launch=launch)
            return
        # autograd.grad, not backward: no gradient accumulation (a copy for a strided leaf) in the timed kernels.
        torch.autograd.grad(forward(), (x, weight, bias), dout)

    iters = 20 if device else 3  # on the CPU a smoke test (the Triton kernels run under the interpreter)
    with torch.no_grad():
        fwd_ms = profiled_ms(forward, iters=iters, device=device)
    fwd_bwd_ms = profiled_ms(forward_backward, iters=iters, device=device)
    elem = x.element_size() * batch * dim * length
    return {"fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "fwd_GBps": 2 * elem / fwd_ms / 1e6,
            "fwd_bwd_GBps": 5 * elem / fwd_bwd_ms / 1e6}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["torch", "triton"])
    parser.add_argument("--launches", nargs="*", default=[], metavar="WARPS:CHUNK",
                        help="also time the Triton kernels with conv_launch(num_warps=WARPS, max_chunk=CHUNK)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    launches = [tuple(int(v) for v in spec.split(":")) for spec in args.launches]
    if launches:
        from kernels.triton_causal_conv1d import conv_launch
    if not torch.cuda.is_available():
        raise SystemExit("bench/conv.py needs a CUDA GPU")
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; bf16, width {WIDTH}, bias, SiLU; kernel ms per "
          "call (torch.profiler)")
    print("| shape (batch, dim, L) | layout | backend | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s |")
    print("|---|---|---|---|---|---|---|")
    for name, batch, dim, length in SHAPES:
        for channel_last in (True, False):
            runs = [(backend, None) for backend in args.backends]
            runs += [(f"triton {warps}w chunk<={chunk}",
                      conv_launch(batch, dim, length, channel_last, num_warps=warps, max_chunk=chunk))
                     for warps, chunk in launches]
            for backend, launch in runs:
                try:
                    times = time_conv("triton" if launch else backend, batch, dim, length, channel_last,
                                      launch=launch)
                except Exception as exc:  # a backend that is missing or refuses the shape is reported, not fatal
                    print(f"  {name} {backend}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
                    continue
                layout = "channel-last" if channel_last else "contiguous"
                rows.append({"shape": name, "batch": batch, "dim": dim, "length": length, "layout": layout,
                             "backend": backend, **times})
                print(f"| {name} ({batch}, {dim}, {length}) | {layout} | {backend} | {times['fwd_ms']:.4f} | "
                      f"{times['fwd_GBps']:.0f} | {times['fwd_bwd_ms']:.4f} | {times['fwd_bwd_GBps']:.0f} |",
                      flush=True)
    if args.json:
        write_device_rows(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
