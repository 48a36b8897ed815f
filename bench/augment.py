"""The training augmentation on the GPU: the fused Triton crop-resize-normalise kernel against affine_grid +
grid_sample, ms per batch (triton.testing.do_bench, median) and output GB/s, same process.

    python -m bench.augment [--case BATCH CHANNELS CANVAS OUT ...] [--json FILE]

Each case is ``gpu_augment`` (RandomResizedCrop + flip, bicubic, normalisation) of uint8 (BATCH, CHANNELS, CANVAS,
CANVAS) batches to OUT px, drawn once (the same boxes for both backends). The default cases: a Vim-S / ViT-B synthetic
step's batch (512 x 3 x 224 -> 224) and the real-loader row's (1536 x 1 x 64 -> 224). CUDA only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

CASES = [(512, 3, 224, 224), (1536, 1, 64, 224)]
BACKENDS = ("torch", "triton")


def case_row(batch: int, channels: int, canvas: int, out: int) -> dict[str, Any]:
    import triton.testing

    from common.data import default_normalization, gpu_augment

    images = torch.randint(0, 256, (batch, channels, canvas, canvas), dtype=torch.uint8, device="cuda")
    sizes = torch.full((batch, 2), canvas, dtype=torch.int32)
    mean, std = default_normalization(channels)
    row: dict[str, Any] = {"case": [batch, channels, canvas, out]}
    results = {}
    for backend in BACKENDS:
        def step(backend: str = backend) -> torch.Tensor:
            return gpu_augment(images, sizes, out, mean, std, generator=torch.Generator().manual_seed(0),
                               backend=backend)

        results[backend] = step()
        ms = triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
        row[f"{backend}_ms"] = ms
        row[f"{backend}_out_GBps"] = results[backend].numel() * 4 / (ms * 1e-3) / 1e9
    row["max_abs_diff"] = (results["triton"] - results["torch"]).abs().max().item()
    row["speedup"] = row["torch_ms"] / row["triton_ms"]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs=4, type=int, action="append", metavar=("BATCH", "CHANNELS", "CANVAS", "OUT"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/augment.py needs a CUDA GPU")
    rows = [case_row(*case) for case in args.case or CASES]
    print(f"{torch.cuda.get_device_name()}: gpu_augment, bicubic, ms per batch (median)")
    print("| batch x channels x canvas -> out | torch | triton | speed-up | max abs diff |")
    print("|---|---|---|---|---|")
    for r in rows:
        b, c, s, o = r["case"]
        print(f"| {b} x {c} x {s} -> {o} | {r['torch_ms']:.3f} | {r['triton_ms']:.3f} | {r['speedup']:.1f}x "
              f"| {r['max_abs_diff']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
