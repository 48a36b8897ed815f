"""Multi-GPU scaling of MAE pretraining, measured through the command a user runs.

Starts ``accelerate launch --config_file launch/accelerate/<config> pretrain/main.py ...`` once per variant --
``1gpu`` (single_gpu.yaml), ``ddp`` (multi_gpu.yaml) and ``zero2`` (deepspeed_zero2.yaml) by default, and on
request ``1gpu_bf16w`` (one GPU with ``--precision bf16_weights``) -- at the same global batch, reads each run's
``log.jsonl``, and reports steady-state img/s, the speed-up over one GPU against the targets, and whether the loss
curves agree. Writes JSON and a PNG plot; prints a markdown table.

    python -m bench.scaling --data_path SHARDS --model mae_vit_base_patch16 --in_chans 1 \\
        --global_batch 512 --steps 300 --epochs 150 --warmup_epochs 20 --output_dir runs/scaling
    python -m bench.scaling ... -- --compile          # flags after -- go to every pretrain run

``--cpu`` runs the same orchestration on the CPU (gloo, ACCELERATE_USE_CPU=1) for testing; accelerate runs
DeepSpeed on GPUs only, so ``zero2`` needs CUDA. Exit status: 0 when every run finished, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.scaling.analysis import RunLogError, Window, compare_curves, read_windows, steady_throughput  # noqa: E402
from bench.scaling.report import format_table, save_plot  # noqa: E402
from bench.scaling.runner import device_description, run_logged  # noqa: E402
from bench.scaling.variants import (  # noqa: E402
    BASELINE,
    DEFAULT_VARIANTS,
    KINDS,
    REPO_ROOT,
    ScalingConfigError,
    Variant,
    build_variants,
    launch_command,
    pretrain_args,
)
from common.io import atomic_write_text  # noqa: E402
from common.launch import free_port, user_command  # noqa: E402

DEFAULT_TARGETS = {"ddp": 1.9, "zero2": 1.8}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True, help="any pretrain --data_path (curated shards, ImageFolder, ...)")
    p.add_argument("--output_dir", required=True, help="one sub-folder per run, scaling.json, scaling.png")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(KINDS))
    p.add_argument("--gpus", type=int, default=2, help="processes of the multi-GPU variants")
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--in_chans", type=int, default=1)
    p.add_argument("--global_batch", type=int, default=512, help="same for every run (per GPU = this / GPUs)")
    p.add_argument("--micro_batch", type=int, default=None,
                   help="fixed per-GPU batch per forward pass; variants with fewer GPUs accumulate gradients to "
                        "the global batch (default: per GPU = global / GPUs, no accumulation)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run (pretrain --max_steps)")
    p.add_argument("--epochs", type=int, default=400, help="pretrain --epochs (the LR schedule's length)")
    p.add_argument("--warmup_epochs", type=float, default=40)
    p.add_argument("--blr", type=float, default=1.5e-4)
    p.add_argument("--num_workers", type=int, default=10, help="loader workers per process")
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--warmup_steps", type=int, default=None,
                   help="steps left out of the throughput (default: 20%% of --steps, at least one window)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed_precision", default=None, choices=["no", "bf16", "fp16"],
                   help="accelerate --mixed_precision (default: bf16 on GPUs, no with --cpu)")
    p.add_argument("--loss_tolerance", type=float, default=0.02,
                   help="relative loss difference to 1 GPU allowed over the last quarter of the run")
    p.add_argument("--target", action="append", default=[], metavar="VARIANT=X",
                   help="speed-up target over 1gpu (default ddp=1.9, zero2=1.8)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it is killed")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (gloo); for testing the orchestration")
    p.add_argument("--json", default=None, help="results file (default: OUTPUT_DIR/scaling.json)")
    p.add_argument("--plot", default=None, help="PNG (default: OUTPUT_DIR/scaling.png; 'none' to skip)")
    args = p.parse_args(argv)
    return args, extra


def _targets(specs: list[str]) -> dict[str, float]:
    targets = dict(DEFAULT_TARGETS)
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            targets[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or name not in KINDS:
            raise ScalingConfigError(f"--target {spec!r}: expected VARIANT=SPEEDUP with VARIANT in {sorted(KINDS)}")
    return targets


def _environment(cpu: bool) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cpu:  # the DDP launcher then starts gloo ranks on the CPU (accelerate --cpu would start one process)
        env.update({"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")})
    return env


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("torch", "accelerate", "deepspeed", "timm"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def run_variant(variant: Variant, args: argparse.Namespace, extra: list[str], mixed_precision: str,
                env: dict[str, str]) -> tuple[dict[str, Any], list[Window]]:
    """Launch one run and summarise its log (a run killed at the time limit keeps the windows it logged)."""
    out = Path(args.output_dir).resolve() / variant.name
    if (out / "log.jsonl").exists():
        raise ScalingConfigError(f"{out}: holds a previous run (log.jsonl); give a new --output_dir")
    command = launch_command(variant, free_port(), mixed_precision, pretrain_args(
        variant, model=args.model, data_path=args.data_path, output_dir=out, input_size=args.input_size,
        in_chans=args.in_chans, steps=args.steps, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        blr=args.blr, num_workers=args.num_workers, log_every=args.log_every, seed=args.seed, extra=extra))
    print(f"[scaling] {variant.name}: {user_command(command)}", flush=True)
    launched = run_logged(command, env, REPO_ROOT, out / "launcher.log", args.timeout)
    result: dict[str, Any] = {"name": variant.name, "config_file": variant.config_file, "processes": variant.processes,
                              "per_gpu_batch": variant.per_gpu_batch, "accum_iter": variant.accum_iter,
                              "global_batch": variant.global_batch,
                              "command": user_command(command), "status": launched.status,
                              "returncode": launched.returncode, "wall_s": round(launched.wall_s, 1),
                              "log": str(launched.log_path)}
    try:
        windows = read_windows(out / "log.jsonl")
    except RunLogError as exc:
        result.update(error=str(exc), log_tail=launched.log_tail())
        return result, []
    if launched.status != "ok":
        result["log_tail"] = launched.log_tail()
    warmup = args.warmup_steps if args.warmup_steps is not None else max(args.log_every, args.steps // 5)
    rate = steady_throughput(windows, variant.global_batch, warmup)
    result.update(steps_done=windows[-1].step, steps_timed=rate.steps_timed, seconds_timed=round(rate.seconds_timed, 2),
                  img_per_s=round(rate.img_per_s, 1), img_per_s_per_gpu=round(rate.img_per_s / variant.processes, 1),
                  tflops_per_gpu=rate.tflops_per_gpu, mfu=rate.mfu, final_loss=windows[-1].loss,
                  loss_curve=[[w.step, w.loss] for w in windows],
                  img_per_s_curve=[[w.step, w.img_per_s] for w in windows])
    return result, windows


def compare_to_baseline(runs: list[dict[str, Any]], windows: dict[str, list[Window]], targets: dict[str, float],
                        tolerance: float) -> None:
    base = next((r for r in runs if r["name"] == BASELINE and r.get("img_per_s")), None)
    for r in runs:
        if base is None or r is base or not r.get("img_per_s"):
            continue
        r["speedup"] = round(r["img_per_s"] / base["img_per_s"], 3)
        r["scaling_efficiency"] = round(r["speedup"] / r["processes"], 3)
        if r["name"] in targets:
            r["target"] = targets[r["name"]]
            r["target_met"] = r["speedup"] >= targets[r["name"]]
        cmp = compare_curves(windows[r["name"]], windows[BASELINE], tolerance)
        r.update(loss_steps_compared=cmp.steps_compared, loss_rel_diff_mean=round(cmp.rel_diff_mean, 5),
                 loss_rel_diff_max=round(cmp.rel_diff_max, 5),
                 loss_rel_diff_last_quarter=round(cmp.rel_diff_last_quarter, 5), loss_matches=cmp.matches)


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    try:
        targets = _targets(args.target)
        variants = build_variants(args.variants, args.gpus, args.global_batch, args.micro_batch)
        if args.cpu and any(v.deepspeed for v in variants):
            raise ScalingConfigError("zero2 needs CUDA GPUs: accelerate starts DeepSpeed on GPUs only (drop it "
                                     "from --variants with --cpu)")
        if Path(args.data_path).exists():  # the runs start in the repository root
            args.data_path = str(Path(args.data_path).resolve())
        elif "{" not in args.data_path:
            raise ScalingConfigError(f"--data_path {args.data_path}: no such file or folder")
    except ScalingConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mixed_precision = args.mixed_precision or ("no" if args.cpu else "bf16")
    device = "cpu" if args.cpu else device_description()
    env = _environment(args.cpu)
    micro = f" (micro-batch {args.micro_batch} per GPU)" if args.micro_batch else ""
    title = (f"{args.model} {args.input_size}px, global batch {args.global_batch}{micro}, {args.steps} steps, "
             f"{mixed_precision}, {device}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json or out / "scaling.json")
    header = {"device": device, "versions": _versions(), "mixed_precision": mixed_precision,
              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot")}, "extra_args": extra,
              "targets": targets}
    runs: list[dict[str, Any]] = []
    windows: dict[str, list[Window]] = {}
    for variant in variants:
        try:
            run, windows[variant.name] = run_variant(variant, args, extra, mixed_precision, env)
        except ScalingConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        runs.append(run)
        print(f"[scaling] {run['name']}: {run['status']}, {run.get('img_per_s', '-')} img/s, wall {run['wall_s']} s"
              + (f"\n{run.get('error', '')}\n{run.get('log_tail', '')}" if run["status"] != "ok" else ""), flush=True)
        compare_to_baseline(runs, windows, targets, args.loss_tolerance)
        # written after every run, so a benchmark stopped from outside keeps what it measured
        _write_json(json_path, {**header, "table": format_table(runs), "runs": runs})
    table = format_table(runs)
    print(f"\n{title}\n{table}")
    plot = None if args.plot == "none" else save_plot(runs, Path(args.plot or out / "scaling.png"), title)
    _write_json(json_path, {**header, "plot": str(plot) if plot else None, "table": table, "runs": runs})
    print(f"[scaling] wrote {json_path}" + (f" and {plot}" if plot else ""))
    return 0 if all(r["status"] == "ok" for r in runs) else 1


def _write_json(path: Path, result: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
