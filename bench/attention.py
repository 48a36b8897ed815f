"""Attention block timing at the MAE shapes, per ``scaled_dot_product_attention`` backend (forward + backward of
``models.layers.Attention``, projections included).

    python -m bench.attention [--json out.json]

Each row is one block's attention at one encoder / decoder shape, bf16 autocast, timed with CUDA events (median of
``--reps``), with one SDPA backend left enabled (``default``: torch's own choice), or ``triton``: our kernels on
the packed projection (kernels/triton_attention.py), whose output and input gradient are first compared with the
default backend's at each shape (max abs difference printed). ``--launches`` also times the attention alone (no
projections) per tiling, each launch's output and gradient compared with SDPA's the same way. The seventeenth
session's run of this script (then also comparing two ways of cutting q / k / v from the fused projection) is in
docs/pretrain_benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.report import write_device_rows  # noqa: E402

SDPA_BACKENDS = ("default", "cudnn", "flash", "efficient", "math")
BACKENDS = SDPA_BACKENDS + ("triton",)  # triton: kernels/triton_attention.py on the packed projection

# (name, batch, tokens, dim, heads): the encoders see the 25 % visible tokens plus the class token, the decoders
# every token (MAE decoder: 512 wide, 16 heads of 32).
SHAPES = (("vit_b encoder", 512, 50, 768, 12), ("vit_b/vim_s decoder", 512, 197, 512, 16),
          ("vit_s encoder", 256, 50, 384, 6))


def restrict_sdpa(backend: str) -> None:
    """Leave only ``backend`` enabled for scaled_dot_product_attention in this process ("default": all of them,
    torch's own choice)."""
    every = backend == "default"
    torch.backends.cuda.enable_cudnn_sdp(every or backend == "cudnn")
    torch.backends.cuda.enable_flash_sdp(every or backend == "flash")
    torch.backends.cuda.enable_mem_efficient_sdp(every or backend == "efficient")
    torch.backends.cuda.enable_math_sdp(every or backend == "math")


def time_block(batch: int, tokens: int, dim: int, heads: int, backend: str, reps: int) -> float:
    """Median ms of one forward + backward of an Attention block (bf16 autocast, fp32 weights)."""
    from models.layers import Attention

    restrict_sdpa("default" if backend == "triton" else backend)
    attn = Attention(dim, heads).cuda()
    attn.attention_backend = "triton" if backend == "triton" else "sdpa"
    x = torch.randn(batch, tokens, dim, device="cuda", requires_grad=True)
    grad = torch.randn(batch, tokens, dim, device="cuda", dtype=torch.bfloat16)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = attn(x)
        out.backward(grad)

    for _ in range(3):
        step()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def triton_difference(batch: int, tokens: int, dim: int, heads: int) -> tuple[float, float]:
    """Max abs difference of one block's output and input gradient, triton backend against SDPA's default, bf16
    autocast, same weights and inputs."""
    from models.layers import Attention

    restrict_sdpa("default")
    attn = Attention(dim, heads).cuda()
    x = torch.randn(batch, tokens, dim, device="cuda")
    grad = torch.randn(batch, tokens, dim, device="cuda", dtype=torch.bfloat16)
    results = []
    for backend in ("sdpa", "triton"):
        attn.attention_backend = backend
        inp = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = attn(inp)
        out.backward(grad)
        results.append((out.float(), inp.grad))
    (out_a, grad_a), (out_b, grad_b) = results
    return (out_a - out_b).abs().max().item(), (grad_a - grad_b).abs().max().item()


def sdpa_packed(qkv: torch.Tensor) -> torch.Tensor:
    """SDPA on head-first views of a packed (batch, tokens, 3, heads, head_dim) projection, in our kernels' output
    layout (batch, tokens, heads, head_dim)."""
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def alone_inputs(batch: int, tokens: int, dim: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 packed projection and an output gradient for one shape (CUDA)."""
    head_dim = dim // heads
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(batch, tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    return qkv, dout


def sdpa_reference(qkv: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's output and packed-projection gradient, what ``alone_difference`` compares each launch with."""
    leaf = qkv.detach().requires_grad_(True)
    out = sdpa_packed(leaf)
    (grad,) = torch.autograd.grad(out, leaf, dout)
    return out.detach(), grad


def alone_difference(qkv: torch.Tensor, dout: torch.Tensor, launch: Any,
                     reference: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """Max abs difference of our kernels' output and packed-projection gradient with ``launch`` (an AttentionLaunch;
    None: the default) against ``reference`` (``sdpa_reference`` of the same inputs): a tiling that times well but
    computes something else shows here, not only in the tests (which cannot cover pipelining stages on the CPU)."""
    from kernels.triton_attention import packed_attention_bwd, packed_attention_fwd

    ref_out, ref_grad = reference
    out, lse = packed_attention_fwd(qkv, launch)
    grad = packed_attention_bwd(qkv, out, lse, dout, launch)
    return (out.float() - ref_out.float()).abs().max().item(), (grad.float() - ref_grad.float()).abs().max().item()


def time_attention_alone(qkv: torch.Tensor, dout: torch.Tensor, launch: Any = None) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of the attention alone on a bf16 packed projection (``alone_inputs``),
    median of triton.testing.do_bench: our kernels with ``launch`` (an AttentionLaunch; None: the default), or SDPA's
    default backend on head-first views when ``launch`` is "sdpa"."""
    import triton.testing

    from kernels.triton_attention import packed_attention_bwd, packed_attention_fwd

    if launch == "sdpa":
        leaf = qkv.detach().requires_grad_(True)

        def forward() -> torch.Tensor:
            return sdpa_packed(leaf)

        def both() -> None:
            torch.autograd.grad(forward(), leaf, dout)
    else:
        def forward() -> torch.Tensor:
            return packed_attention_fwd(qkv, launch)[0]

        def both() -> None:
            out, lse = packed_attention_fwd(qkv, launch)
            packed_attention_bwd(qkv, out, lse, dout, launch)

    return triton.testing.do_bench(forward), triton.testing.do_bench(both)


def parse_launch(text: str) -> Any:
    """BLOCK_M:BLOCK_N:WARPS:STAGES[:split] -> AttentionLaunch; "split": the backward's dq and dk / dv kernels even
    where the sequence fits one tile (the one-kernel backward otherwise)."""
    from kernels.triton_attention import AttentionLaunch

    parts = text.split(":")
    split = len(parts) == 5 and parts[4] == "split"
    if len(parts) - split != 4:
        raise argparse.ArgumentTypeError(f"expected BLOCK_M:BLOCK_N:WARPS:STAGES[:split], got {text!r}")
    return AttentionLaunch(*(int(part) for part in parts[:4]), single_tile=not split)


def parse_shape(text: str) -> tuple[str, int, int, int, int]:
    """NAME:BATCH:TOKENS:DIM:HEADS -> a SHAPES row."""
    parts = text.split(":")
    if len(parts) != 5 or not all(part.isdigit() for part in parts[1:]):
        raise argparse.ArgumentTypeError(f"expected NAME:BATCH:TOKENS:DIM:HEADS, got {text!r}")
    return (parts[0], *(int(part) for part in parts[1:]))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--json", default=None)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--launches", nargs="*", default=[], type=parse_launch, metavar="BM:BN:WARPS:STAGES[:split]",
                        help="also time the attention alone (no projections): SDPA, our default tiles and these")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), type=parse_shape,
                        metavar="NAME:BATCH:TOKENS:DIM:HEADS", help="the shapes to time (default: the MAE ones)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/attention.py needs a CUDA GPU")
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; ms per forward+backward of one block's "
          f"attention (median of {args.reps})")
    print("| shape | " + " | ".join(args.backends) + " |")
    print("|---|" + "---|" * len(args.backends))
    for name, batch, tokens, dim, heads in args.shapes:
        if "triton" in args.backends:
            out_diff, grad_diff = triton_difference(batch, tokens, dim, heads)
            print(f"  {name}: triton vs sdpa max abs difference, output {out_diff:.2e}, input gradient "
                  f"{grad_diff:.2e}", flush=True)
        cells = []
        for backend in args.backends:
            try:
                ms = time_block(batch, tokens, dim, heads, backend, args.reps)
            except RuntimeError as exc:  # a backend that refuses the shape is reported, not fatal
                print(f"  {name} {backend}: {str(exc).splitlines()[0][:160]}", flush=True)
                ms = None
            rows.append({"shape": name, "batch": batch, "tokens": tokens, "dim": dim, "heads": heads,
                         "backend": backend, "ms": ms})
            cells.append("n/a" if ms is None else f"{ms:.3f}")
        print(f"| {name} (b{batch}, n{tokens}, {heads}x{dim // heads}) | " + " | ".join(cells) + " |", flush=True)
    if args.launches:
        print("attention alone (bf16 packed projection, no projections), fwd / fwd+bwd ms, triton.testing.do_bench")
        restrict_sdpa("default")
        for name, batch, tokens, dim, heads in args.shapes:
            qkv, dout = alone_inputs(batch, tokens, dim, heads)
            reference = sdpa_reference(qkv, dout)
            for launch in ["sdpa", None, *args.launches]:
                label = "sdpa default" if launch == "sdpa" else f"triton {launch or 'default'}"
                try:
                    fwd, both = time_attention_alone(qkv, dout, launch)
                    out_diff, grad_diff = ((None, None) if launch == "sdpa"
                                           else alone_difference(qkv, dout, launch, reference))
                except Exception as exc:  # a launch that does not compile or fit is reported, not fatal
                    print(f"  {name} {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
                    continue
                rows.append({"shape": name, "batch": batch, "tokens": tokens, "dim": dim, "heads": heads,
                             "alone": label, "fwd_ms": fwd, "fwd_bwd_ms": both, "max_abs_diff_out": out_diff,
                             "max_abs_diff_grad": grad_diff})
                versus = "" if out_diff is None else f" (vs sdpa: output {out_diff:.2e}, gradient {grad_diff:.2e})"
                print(f"  {name} {label}: {fwd:.3f} / {both:.3f}{versus}", flush=True)
    if args.json:
        write_device_rows(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
