"""One forward+backward of the default Triton scan, bracketed for Nsight Compute (CUDA only).

    ncu --profile-from-start off --section WarpStateStats ... python -m bench.scan_ncu --shape 256 768 16 50

The warm-up calls (Triton compiles, the launch cache) run before ``cudaProfilerStart``, so with
``--profile-from-start off`` ncu sees exactly one forward and one backward kernel per direction asked for.
``bash bench/gpu_scan_session.sh ncu`` runs it with the sections that say why warps wait (stall reasons,
issue slots, occupancy, memory throughput).
"""

from __future__ import annotations

import argparse

import torch

from kernels.testing import make_scan_inputs, with_channel_last_sequences


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.scan_ncu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs=4, type=int, default=[256, 768, 16, 50], metavar=("B", "D", "N", "L"),
                   help="batch, dim, states, length (default: a Vim-S MAE step's scan)")
    p.add_argument("--channel_last", action="store_true",
                   help="u / delta / z as a Vim block passes them: (batch, L, dim) memory seen as (batch, dim, L)")
    p.add_argument("--reverse", action="store_true")
    p.add_argument("--variant", default=None, choices=("v1", "v2", "v3", "v4"),
                   help="one kernel variant with its default tiles (default: the default kernels)")
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.scan_ncu needs CUDA")
    from kernels.selective_scan_triton import selective_scan_triton, variant_configs

    batch, dim, n_state, length = args.shape
    configs = {}
    if args.variant is not None:
        fwd, bwd = variant_configs(args.variant, n_state, length, batch * dim, torch.device("cuda"))
        configs = {"fwd_config": fwd, "bwd_config": bwd}
    inp = make_scan_inputs(batch, dim, length, n_state, None, torch.bfloat16, seed=0, device="cuda")
    if args.channel_last:
        inp = with_channel_last_sequences(inp)
    for tensor in inp.values():  # every input a Mamba block trains, so the backward computes every gradient
        tensor.requires_grad_(True)
    grad = torch.randn(batch, dim, length, device="cuda", dtype=torch.bfloat16)

    def step() -> None:
        out = selective_scan_triton(**inp, delta_softplus=True, reverse=args.reverse, **configs)
        out.backward(grad)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled one forward+backward at {tuple(args.shape)}, channel_last={args.channel_last}, "
          f"reverse={args.reverse}, variant={args.variant or 'default'}")


if __name__ == "__main__":
    main()
