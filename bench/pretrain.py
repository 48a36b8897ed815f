"""Pretraining throughput: full MAE train steps (forward, backward, fused AdamW; bf16 autocast on CUDA, or with
``--precision bf16_weights`` the model in bf16 and float32 master weights, as ``pretrain/main.py`` runs them).

Modes per row (model, input size, batch):
  synthetic  GPU-resident random images: the model alone
  loader     the real input pipeline (``common.data`` loader on ``--data_path`` + ``gpu_augment``) feeding it
  resident   the real images of ``--data_path`` decoded once onto the GPU (``pretrain --data_on_device``), with
             ``gpu_augment``: the small-set path, no loader workers during the steps
  loader_only the pipeline without the model (once per input size): what the loader can deliver

    python bench/pretrain.py --data_path OUT_OF_CURATE --canvas_size 64   # the standard table (~8 min, one H200)
    python bench/pretrain.py --models mae_vit_base_patch16 --input_sizes 224 --steps 30 --compile

Each row times up to ``--steps`` steps but stops after ``--row_seconds`` of timed steps (at least ``--min_steps``),
so big rows cost no more than small ones. Loader rows first take, untimed, the batches the workers queued while the
row was set up (workers x prefetch factor): a 20-step row would otherwise be served from that queue and show the
hand-off, not what the workers sustain. The step mirrors ``pretrain.engine``: pinned batches, crop parameters and
masking noise drawn on the CPU and sent asynchronously, no host sync inside the timed loop. Loader rows read shards
of whatever size they were stored at: ``--canvas_size`` (default: the input size) is the loader canvas and
``gpu_augment`` resizes crops to the input size, as a training run with ``--canvas_size`` does. Prints a table and
writes JSON (``--json``). A row that runs out of memory is retried with half the batch (``--oom_retries``), then
reported as OOM, and the benchmark continues. MFU = counted model FLOPs x img/s / peak bf16 FLOP/s of the GPU
(``--peak_tflops`` overrides the data-sheet value).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.attention import SDPA_BACKENDS, restrict_sdpa  # noqa: E402
from bench.kernel_profile import PRINTED_KERNELS, profile_kernels  # noqa: E402
from common.data import build_dataset, build_loader, default_normalization, gpu_augment  # noqa: E402
from common.data.resident import ResidentLoader, decode_all  # noqa: E402
from common.torch_compile import compile_in_place  # noqa: E402
from kernels.selective_scan_interface import BACKENDS  # noqa: E402
from models.layers import ATTENTION_BACKENDS, set_backend  # noqa: E402
from pretrain.engine import to_device_async  # noqa: E402
from pretrain.flops import peak_flops, train_flops_per_image  # noqa: E402
from pretrain.master_weights import MasterWeights  # noqa: E402
from pretrain.precision import BF16_WEIGHTS  # noqa: E402
from pretrain.schedule import build_optimizer  # noqa: E402

# Batches chosen for ~140 GB (H200) with bf16 autocast; a row that still runs out of memory halves its batch.
DEFAULT_ROWS: list[tuple[str, int, int]] = [
    ("mae_vit_small_patch16", 224, 256),
    ("mae_vit_base_patch16", 224, 256),
    ("mae_vit_large_patch16", 224, 256),
    ("mae_vim_small_patch16", 224, 256),
    ("mae_vim_base_patch16", 224, 256),
    ("mae_vit_base_patch16", 512, 64),
    ("mae_vim_base_patch16", 512, 64),
    ("mae_vit_base_patch16", 1024, 16),
    ("mae_vim_base_patch16", 1024, 16),
]
MODES = ("synthetic", "loader", "resident", "loader_only")


@dataclass
class Row:
    mode: str
    model: str
    input_size: int
    batch_size: int
    status: str = "ok"
    img_per_s: float | None = None
    step_ms: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    peak_mem_gib: float | None = None
    steps: int | None = None  # timed steps actually run (row time cap)
    error: str | None = None
    # --profile_steps: device ms per step by kernel kind, and the kernels with the most device time
    kernel_ms: dict[str, float] | None = None
    top_kernels: list[tuple[str, float]] | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help="MAE model names (default: the standard table)")
    p.add_argument("--input_sizes", nargs="+", type=int, default=None, help="keep only these input sizes")
    p.add_argument("--batch_size", type=int, default=None, help="override every row's batch size")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--data_path", default=None, help="curated shards (or any common.data path) for loader modes")
    p.add_argument("--num_workers", type=int, default=16)
    p.add_argument("--in_chans", type=int, default=3)
    p.add_argument("--canvas_size", type=int, default=0,
                   help="loader canvas (0: the input size); e.g. the stored size of the shards, upsampled on the GPU")
    p.add_argument("--steps", type=int, default=20, help="at most this many timed steps per row")
    p.add_argument("--min_steps", type=int, default=3, help="at least this many timed steps per row")
    p.add_argument("--row_seconds", type=float, default=10.0, help="stop a row's timed steps after this long")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row (compilation, loader start)")
    p.add_argument("--sync_debug", default="default", choices=("default", "warn", "error"),
                   help="torch.cuda.set_sync_debug_mode during the timed steps: 'error' fails a row whose step "
                        "makes the host wait for the GPU (and names the call)")
    p.add_argument("--oom_retries", type=int, default=2, help="halve the batch this many times on OOM")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--compile_mode", default="default", help="torch.compile mode (e.g. reduce-overhead)")
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--scan_backend", default="auto", choices=BACKENDS,
                   help="selective-scan backend of the Mamba models (e.g. triton_v3: an opt-in kernel variant)")
    p.add_argument("--conv_backend", default="auto", choices=["auto", "torch", "causal_conv1d", "triton"],
                   help="the Vim blocks' causal conv (kernels.causal_conv1d_fn backend; triton: our kernels)")
    p.add_argument("--sdpa_backend", default="default", choices=SDPA_BACKENDS,
                   help="the only scaled_dot_product_attention backend left enabled (default: torch's choice)")
    p.add_argument("--attention_backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="the ViT / MAE-decoder attention blocks (pretrain/main.py's flag and default)")
    p.add_argument("--augment_backend", default="auto", choices=["auto", "torch", "triton"],
                   help="gpu_augment's crop-resize: auto = the fused Triton kernel on CUDA, torch = grid_sample")
    p.add_argument("--precision", default="bf16", choices=("bf16", BF16_WEIGHTS),
                   help="bf16 autocast on CUDA (float32 on the CPU), or the model in bf16 with float32 masters")
    p.add_argument("--peak_tflops", type=float, default=0.0)
    p.add_argument("--profile_steps", type=int, default=0,
                   help="after timing, profile this many more steps: device ms per step by kernel kind")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default="bench_pretrain.json", help="where to write the results")
    return p.parse_args(argv)


def select_rows(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """The standard rows filtered by ``--models`` / ``--input_sizes``; requested pairs not in it are added."""
    rows = [r for r in DEFAULT_ROWS if (not args.models or r[0] in args.models)
            and (not args.input_sizes or r[1] in args.input_sizes)]
    if args.models:
        have = {(m, s) for m, s, _ in rows}
        rows += [(m, s, 256 if s <= 224 else 64) for m in args.models for s in (args.input_sizes or [224])
                 if (m, s) not in have]
    if args.batch_size:
        rows = [(m, s, args.batch_size) for m, s, _ in rows]
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Batches:
    """Endless uint8 letterboxed batches + sizes: from the real loader (modes loader, loader_only), from the real
    images decoded onto the device (resident), or random ones on the device (synthetic)."""

    def __init__(self, args: argparse.Namespace, size: int, batch: int, device: torch.device, mode: str):
        self.device, self.real = device, mode != "synthetic"
        self.queue_depth = 0  # batches the workers may hold ready before the first step
        if mode == "resident":
            ds = build_dataset(args.data_path, split="train", in_chans=args.in_chans)
            images, sizes = decode_all(ds, args.canvas_size or size, num_workers=args.num_workers)
            self.it = iter(ResidentLoader(images.to(device), sizes, batch, seed=0))
        elif self.real:
            ds = build_dataset(args.data_path, split="train", in_chans=args.in_chans)
            loader = build_loader(ds, batch, num_workers=args.num_workers, infinite=True,
                                  canvas_size=args.canvas_size or size, pin_memory=device.type == "cuda")
            self.queue_depth = args.num_workers * loader.prefetch_factor
            self.it = iter(loader)
        else:
            gen = torch.Generator().manual_seed(0)
            self.images = torch.randint(0, 256, (batch, args.in_chans, size, size), generator=gen,
                                        dtype=torch.uint8).to(device)
            self.sizes = torch.full((batch, 2), size, dtype=torch.int32)

    def drain(self) -> None:
        """Take the batches queued while the row was set up, so the timed steps see the workers' steady rate
        (with 14 workers x prefetch 4 the queue outlasts a 20-step row)."""
        for _ in range(self.queue_depth):
            next(self.it)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.real:
            return self.images, self.sizes
        b = next(self.it)
        return b["image"].to(self.device, non_blocking=True), b["size"]


def run_row(args: argparse.Namespace, mode: str, name: str, size: int, batch: int, device: torch.device) -> Row:
    """One row; on CUDA out-of-memory the batch is halved up to ``--oom_retries`` times."""
    for _ in range(args.oom_retries + 1):
        row = _measure(args, mode, name, size, batch, device)
        if row.status != "OOM" or batch == 1:
            return row
        batch = max(1, batch // 2)
    return row


def _train_step(batches: Batches, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None,
                size: int, mean: list[float], std: list[float], gen: torch.Generator, autocast: Any,
                mask_ratio: float, device: torch.device, augment_backend: str = "auto",
                masters: MasterWeights | None = None) -> None:
    """One step as ``pretrain.engine`` takes it (without the model: the augmentation alone)."""
    images, sizes = batches.next()
    x = gpu_augment(images, sizes, size, mean, std, generator=gen, backend=augment_backend)
    if model is not None and optimizer is not None:
        noise = to_device_async(torch.rand(x.shape[0], model.num_patches, generator=gen), device)
        with autocast:
            loss, _, _ = model(x, mask_ratio=mask_ratio, noise=noise)
        loss.backward()
        if masters is not None:
            masters.grads_to_masters()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if masters is not None:
            masters.masters_to_model()


def _measure(args: argparse.Namespace, mode: str, name: str, size: int, batch: int, device: torch.device) -> Row:
    import models

    row = Row(mode=mode, model=name if mode != "loader_only" else "-", input_size=size, batch_size=batch)
    mean, std = default_normalization(args.in_chans)
    bf16_weights = args.precision == BF16_WEIGHTS
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and not bf16_weights)
    model = optimizer = batches = step = masters = None
    try:
        batches = Batches(args, size, batch, device, mode)
        flops = None
        if mode != "loader_only":
            model = models.create_model(name, img_size=size, in_chans=args.in_chans, norm_pix_loss=True).to(device)
            set_backend(model, "scan_backend", args.scan_backend)
            set_backend(model, "conv_backend", args.conv_backend)
            set_backend(model, "attention_backend", args.attention_backend)
            flops = train_flops_per_image(model, size, args.in_chans, args.mask_ratio, device)
            masters = MasterWeights(model) if bf16_weights else None  # casts the model
            optimizer = build_optimizer(model, 1e-4, 0.05, fused=device.type == "cuda", masters=masters)
            if args.compile:
                compile_in_place(model, args.compile_mode)
        gen = torch.Generator().manual_seed(0)
        batches.drain()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step = partial(_train_step, batches, model, optimizer, size, mean, std, gen, autocast, args.mask_ratio,
                       device, args.augment_backend, masters)
        steps, start = 0, 0.0
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                _sync(device)
                start = time.perf_counter()
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode(args.sync_debug)
            elif i > args.warmup and steps >= args.min_steps and time.perf_counter() - start > args.row_seconds:
                break  # the host runs at most a few steps ahead of the GPU, so this is a fair time cap
            step()
            steps += i >= args.warmup
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        _sync(device)
        seconds = time.perf_counter() - start
        row.steps = steps
        row.img_per_s = round(steps * batch / seconds, 1)
        row.step_ms = round(1000 * seconds / steps, 2)
        if flops:
            row.tflops = float(f"{flops * row.img_per_s / 1e12:.4g}")
            peak = peak_flops(device, args.peak_tflops)
            row.mfu = round(flops * row.img_per_s / peak, 4) if peak else None
        if device.type == "cuda":
            row.peak_mem_gib = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if args.profile_steps > 0:
            row.kernel_ms, row.top_kernels = profile_kernels(step, args.profile_steps, device)
    except torch.cuda.OutOfMemoryError:
        row.status = "OOM"
    except Exception as exc:  # one broken row (e.g. a missing kernel) must not stop the table
        row.status, row.error = "error", f"{type(exc).__name__}: {exc}"[:300]
    finally:
        del model, optimizer, batches, step, masters
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.empty_cache()
    return row


def format_profiles(rows: list[Row]) -> str:
    """Per profiled row: device ms per step by kernel kind, and the busiest kernels."""
    out = []
    for r in rows:
        if not r.kernel_ms:
            continue
        kinds = ", ".join(f"{k} {v}" for k, v in r.kernel_ms.items())
        out.append(f"{r.mode} {r.model} {r.input_size} px x{r.batch_size}: ms/step by kind: {kinds} "
                   f"(wall {r.step_ms})")
        out += [f"    {ms:9.3f}  {name}" for name, ms in (r.top_kernels or [])[:PRINTED_KERNELS]]
    return "\n".join(out)


def format_table(rows: list[Row]) -> str:
    head = ["mode", "model", "size", "batch", "img/s", "ms/step", "TFLOP/s", "MFU", "mem GiB", "steps", "status"]
    lines = [head]
    for r in rows:
        lines.append([r.mode, r.model, str(r.input_size), str(r.batch_size), _f(r.img_per_s), _f(r.step_ms),
                      _f(r.tflops), _f(r.mfu and round(100 * r.mfu, 1), "%"), _f(r.peak_mem_gib), _f(r.steps),
                      r.status if not r.error else f"{r.status}: {r.error[:60]}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _f(value: Any, suffix: str = "") -> str:
    return "" if value is None else f"{value}{suffix}"


def write_json(args: argparse.Namespace, device: torch.device, rows: list[Row]) -> str:
    """Write ``--json`` with the rows so far (atomically); returns the device's name."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": device_name, "torch": torch.__version__, "args": vars(args), "rows": [asdict(r) for r in rows]}
    path = Path(args.json)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    return device_name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    restrict_sdpa(args.sdpa_backend)
    modes = [m for m in args.modes if m == "synthetic" or args.data_path]
    if len(modes) < len(args.modes):
        print("note: loader modes skipped (no --data_path)")
    rows: list[Row] = []
    loader_sizes_done: set[int] = set()
    for name, size, batch in select_rows(args):
        for mode in modes:
            if mode == "loader_only":
                if size in loader_sizes_done:
                    continue
                loader_sizes_done.add(size)
            row = run_row(args, mode, name, size, batch, device)
            rows.append(row)
            write_json(args, device, rows)  # after every row: a call stopped at its time limit keeps the rows done
            print(f"{row.mode:11s} {row.model:24s} {size:5d} x{row.batch_size:<4d} {row.status:5s} {_f(row.img_per_s)} img/s",
                  flush=True)
    device_name = write_json(args, device, rows)
    print(f"\ndevice: {device_name}, torch {torch.__version__}, compile={args.compile and args.compile_mode}, steps<={args.steps} "
          f"(cap {args.row_seconds} s/row), loader canvas {args.canvas_size or 'input size'}")
    print(format_table(rows))
    profiles = format_profiles(rows)
    if profiles:
        print("\n" + profiles)
    return 0 if any(r.status == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
