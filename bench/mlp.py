"""The transformer MLP on its fused fc1 + GELU op (kernels/triton_mlp.py) against the plain one, both under
torch.compile and bf16 autocast as in pretraining: forward+backward ms (triton.testing.do_bench, median), same
process, and the fused backward's GELU-gradient kernel alone against inductor's two passes it replaces.

    python -m bench.mlp [--case TOKENS DIM HIDDEN ...] [--json FILE]

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


def _ms(fn: Any) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def case_row(tokens: int, dim: int, hidden: int) -> dict[str, Any]:
    from kernels.triton_mlp import gelu_grad
    from models.layers import Mlp

    torch.manual_seed(0)
    x = torch.randn(tokens, dim, device="cuda", requires_grad=True)  # float32, as a LayerNorm's output under autocast
    grad = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
    row: dict[str, Any] = {"case": [tokens, dim, hidden]}
    grads = {}
    base = Mlp(dim, hidden).cuda()
    for backend in ("torch", "triton"):
        mlp = Mlp(dim, hidden).cuda()
        mlp.load_state_dict(base.state_dict())
        mlp.mlp_backend = backend
        compiled = torch.compile(mlp)

        def step(compiled: Any = compiled, mlp: Mlp = mlp) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = compiled(x)
            return torch.autograd.grad(out, (x, mlp.fc1.bias), grad)

        grads[backend] = step()
        row[f"{backend}_ms"] = _ms(step)
    row["speedup"] = row["torch_ms"] / row["triton_ms"]
    for name, got, want in zip(("dx", "db1"), grads["triton"], grads["torch"]):
        row[f"{name}_rel_diff"] = ((got - want).float().norm() / want.float().norm()).item()
    dact = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    pre = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)

    @torch.compile
    def unfused(dact: torch.Tensor, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dpre = torch.ops.aten.gelu_backward(dact, pre)
        return dpre, dpre.float().sum(0)

    row["grad_pass_torch_ms"] = _ms(lambda: unfused(dact, pre))
    row["grad_pass_fused_ms"] = _ms(lambda: gelu_grad(dact, pre))
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs=3, type=int, action="append", metavar=("TOKENS", "DIM", "HIDDEN"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/mlp.py needs a CUDA GPU")
    rows = [case_row(*case) for case in args.case or CASES]
    print(f"{torch.cuda.get_device_name()}: MLP fwd+bwd compiled, bf16 autocast, and the GELU-gradient pass, ms (median)")
    print("| tokens x dim -> hidden | torch | fused | speed-up | dx rel. diff | fc1 bias grad rel. diff "
          "| grad pass: compiled | fused |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, d, h = r["case"]
        print(f"| {t} x {d} -> {h} | {r['torch_ms']:.3f} | {r['triton_ms']:.3f} | {r['speedup']:.2f}x "
              f"| {r['dx_rel_diff']:.1e} | {r['db1_rel_diff']:.1e} | {r['grad_pass_torch_ms']:.3f} "
              f"| {r['grad_pass_fused_ms']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
