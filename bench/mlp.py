"""The transformer MLP with GELU fused into its products (kernels/triton_mlp.py) against the plain one, both under
torch.compile and bf16 autocast as in pretraining: forward+backward ms (triton.testing.do_bench, median), same
process; with ``--sweep``, each fused kernel per launch configuration against cuBLAS's product of the same shape.

    python -m bench.mlp [--case TOKENS DIM HIDDEN ...] [--sweep] [--json FILE]

Default cases: MAE ViT-B's decoder MLP (batch 1536 x 197 tokens, 512 -> 2048) and encoder MLP (1536 x 50 visible
tokens, 768 -> 3072). CUDA only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

CASES = [(1536 * 197, 512, 2048), (1536 * 50, 768, 3072)]
SWEEP = [(128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 3), (128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4),
         (64, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4), (256, 128, 64, 8, 8, 3)]


def _ms(fn: Any) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def module_row(tokens: int, dim: int, hidden: int) -> dict[str, Any]:
    from models.layers import Mlp

    torch.manual_seed(0)
    x = torch.randn(tokens, dim, device="cuda", requires_grad=True)  # float32, as a LayerNorm's output under autocast
    grad = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
    row: dict[str, Any] = {"case": [tokens, dim, hidden]}
    grads = {}
    for backend in ("torch", "triton"):
        mlp = Mlp(dim, hidden).cuda()
        mlp.mlp_backend = backend
        compiled = torch.compile(mlp)

        def step(compiled: Any = compiled) -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = compiled(x)
            out.backward(grad)

        step()
        x.grad = None
        step()
        grads[backend] = (x.grad.clone(), mlp.fc1.bias.grad.clone())
        row[f"{backend}_ms"] = _ms(step)
    row["speedup"] = row["torch_ms"] / row["triton_ms"]
    row["dx_rel_diff"] = ((grads["triton"][0] - grads["torch"][0]).norm() / grads["torch"][0].norm()).item()
    row["db1_rel_diff"] = ((grads["triton"][1] - grads["torch"][1]).norm() / grads["torch"][1].norm()).item()
    return row


def sweep_rows(tokens: int, dim: int, hidden: int) -> list[dict[str, Any]]:
    from kernels.triton_mlp import MlpLaunch, gelu_linear_grad, linear_gelu_fwd

    dtype = torch.bfloat16
    x = torch.randn(tokens, dim, device="cuda", dtype=dtype)
    w1 = torch.randn(hidden, dim, device="cuda", dtype=dtype) / dim ** 0.5
    b1 = torch.randn(hidden, device="cuda", dtype=dtype)
    w2 = torch.randn(dim, hidden, device="cuda", dtype=dtype) / hidden ** 0.5
    pre = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    flops = 2 * tokens * dim * hidden
    rows = [{"case": [tokens, dim, hidden], "kernel": "cublas", "launch": None,
             "fwd_ms": _ms(lambda: torch.addmm(b1, x, w1.t())), "grad_ms": _ms(lambda: x @ w2)}]
    for config in SWEEP:
        launch = MlpLaunch(*config)
        rows.append({"case": [tokens, dim, hidden], "kernel": "fused", "launch": list(config),
                     "fwd_ms": _ms(lambda launch=launch: linear_gelu_fwd(x, w1, b1, launch)),
                     "grad_ms": _ms(lambda launch=launch: gelu_linear_grad(x, w2, pre, launch))})
    for row in rows:
        row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
        row["grad_tflops"] = flops / row["grad_ms"] / 1e9
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs=3, type=int, action="append", metavar=("TOKENS", "DIM", "HIDDEN"))
    parser.add_argument("--sweep", action="store_true", help="time each fused kernel per launch configuration")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/mlp.py needs a CUDA GPU")
    cases = args.case or CASES
    rows = [module_row(*case) for case in cases]
    print(f"{torch.cuda.get_device_name()}: MLP fwd+bwd, compiled, bf16 autocast, ms (median)")
    print("| tokens x dim -> hidden | torch | fused | speed-up | dx rel. diff | fc1 bias grad rel. diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        t, d, h = r["case"]
        print(f"| {t} x {d} -> {h} | {r['torch_ms']:.3f} | {r['triton_ms']:.3f} | {r['speedup']:.2f}x "
              f"| {r['dx_rel_diff']:.1e} | {r['db1_rel_diff']:.1e} |")
    sweep = [row for case in cases for row in sweep_rows(*case)] if args.sweep else []
    if sweep:
        print("\n| case | kernel | BM, BN, BK, group, warps, stages | fwd ms | fwd TFLOP/s | grad ms | grad TFLOP/s |")
        print("|---|---|---|---|---|---|---|")
        for r in sweep:
            print(f"| {r['case']} | {r['kernel']} | {r['launch'] or '-'} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} "
                  f"| {r['grad_ms']:.3f} | {r['grad_tflops']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "modules": rows,
                                               "sweep": sweep}, indent=2))


if __name__ == "__main__":
    main()
