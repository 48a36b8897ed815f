"""Input pipeline alone, no model and no GPU: img/s of ``common.data.build_loader`` over a data path.

    python -m bench.loader --data_path OUT --canvas_size 64 --num_workers 2 --batches 40

Prints two figures: steady img/s (what the workers deliver when the consumer never waits) and the consumer-side
hand-off per batch with a queue filled in advance (what the training process pays per batch even with infinitely
fast workers: unpickling, shared-memory mapping, pinning when ``--pin_memory``). The second was the per-step
ceiling of our GPU loader rows (docs/pretraining.md, Benchmark).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.data import build_dataset, build_loader  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True, help="curated shards or any common.data path")
    p.add_argument("--split", default="train")
    p.add_argument("--in_chans", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--canvas_size", type=int, default=224)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=40, help="timed batches for the steady rate")
    p.add_argument("--prefill_seconds", type=float, default=0.0,
                   help="> 0: also time batches taken from a queue the workers had this long to fill")
    p.add_argument("--pin_memory", action="store_true", help="pin batches (needs CUDA)")
    p.add_argument("--json", default=None, help="also write the figures here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    dataset = build_dataset(args.data_path, split=args.split, in_chans=args.in_chans)

    loader = build_loader(dataset, args.batch_size, num_workers=args.num_workers, infinite=True,
                          canvas_size=args.canvas_size, pin_memory=args.pin_memory)
    it = iter(loader)
    next(it)  # workers started, first batch decoded
    start, images = time.perf_counter(), 0
    for _ in range(args.batches):
        images += next(it)["image"].shape[0]
    seconds = time.perf_counter() - start
    result = {"img_per_s": images / seconds, "ms_per_batch": 1e3 * seconds / args.batches}
    del it
    if args.prefill_seconds > 0 and args.num_workers > 0:
        it = iter(loader)
        next(it)
        time.sleep(args.prefill_seconds)
        queued = args.num_workers * loader.prefetch_factor - 1  # what the workers may hold, minus the one taken
        start = time.perf_counter()
        for _ in range(queued):
            next(it)
        result["handoff_ms_per_batch"] = 1e3 * (time.perf_counter() - start) / queued
        del it
    print(f"{dataset!r}\nworkers {args.num_workers}, batch {args.batch_size}, canvas {args.canvas_size}: "
          + ", ".join(f"{k} {v:.2f}" for k, v in result.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({**vars(args), **result}, indent=1))
    return result


if __name__ == "__main__":
    main()
