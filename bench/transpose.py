"""The layout copies of kernels/triton_transpose.py against a plain copy: GB/s (bytes read + written) per tile.

    python -m bench.transpose [--shape B D L ...] [--json FILE]

Each shape is a scan input (batch, dim, L) in bf16, copied contiguous -> channel-last (the backward's four copies in)
and back (its three out), per tile of ``TILES`` (rows, columns, warps); beside them torch's copy of the same bytes
(``clone``, the ceiling) and torch's own transposed copy (``x.transpose(1, 2).contiguous()``). CUDA only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

# (rows, columns, warps) per program; DEFAULT_TILE first.
TILES = [(128, 64, 8), (64, 64, 4), (32, 64, 4), (64, 32, 4), (32, 128, 4), (128, 32, 4), (64, 128, 8), (32, 32, 2)]
# The scan's benchmark shapes (batch, dim, L).
SHAPES = [(128, 768, 197), (16, 768, 1024), (16, 768, 4096), (128, 768, 50)]


def gbs(fn: Any, n_bytes: int) -> float:
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return n_bytes / (ms * 1e-3) / 1e9


def shape_rows(shape: tuple[int, int, int]) -> list[dict[str, Any]]:
    from kernels.triton_transpose import transposed_copy

    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    back = x.transpose(1, 2).contiguous()
    moved = 2 * x.numel() * x.element_size()
    rows = [{"shape": list(shape), "what": "clone", "GBps": gbs(x.clone, moved)},
            {"shape": list(shape), "what": "torch transpose", "GBps": gbs(lambda: x.transpose(1, 2).contiguous(),
                                                                           moved)}]
    for tile in TILES:
        rows.append({"shape": list(shape), "what": f"tile {tile}", "tile": list(tile),
                     "GBps": gbs(lambda t=tile: transposed_copy(x, t), moved),
                     "back_GBps": gbs(lambda t=tile: transposed_copy(back, t), moved)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs=3, type=int, action="append", metavar=("BATCH", "DIM", "L"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/transpose.py needs a CUDA GPU")
    rows = []
    for shape in args.shape or SHAPES:
        rows += shape_rows(tuple(shape))
    print(f"{torch.cuda.get_device_name()}, bf16, GB/s (read + written); (rows, columns, warps): to channel-last / back")
    for r in rows:
        back = f" / {r['back_GBps']:.0f}" if "back_GBps" in r else ""
        print(f"{tuple(r['shape'])} {r['what']}: {r['GBps']:.0f}{back}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
