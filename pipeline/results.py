"""The transfer-results table: MAE pretraining on a curated pool, then linprobe / finetune vs random init.

``python -m pipeline.results run ...`` (on a GPU) pretrains each encoder as an MAE on ``--pool`` (a curated shard
folder), exports a randomly initialised twin, and runs ``linprobe --fast`` and ``finetune`` on each labeled
MedMNIST ``.npz`` for both initialisations; ``--scratch_models`` adds classifiers trained from scratch with the
same finetune recipe. Every stage is a real CLI call, echoed so it can be rerun; ``OUT/runs.json`` collects the
metrics. ``python -m pipeline.results table OUT --benchmarks DIR`` prints the markdown table with the published
MedMNIST v2 and MedMNIST+ rows beside ours.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from pipeline.stages import StageError, python_module_command, run_stage

DATASET_NAMES = {"breastmnist": "BreastMNIST", "pneumoniamnist": "PneumoniaMNIST"}


def export_random_encoder(mae_name: str, input_size: int, in_chans: int, out_dir: Path) -> Path:
    """A randomly initialised encoder, exported exactly like a pretrained one (the 'random init' baseline)."""
    import torch

    import models
    from models.checkpoint import export_encoder

    torch.manual_seed(0)
    mae = models.create_model(mae_name, img_size=input_size, in_chans=in_chans)
    export_encoder(mae, out_dir)
    return out_dir / "encoder.safetensors"


def _metrics(results_path: Path) -> dict:
    r = json.loads(results_path.read_text())
    return {k: r.get(k) for k in ("acc", "balanced_acc", "auc", "f1")} | {"ci95": r.get("ci95", {})}


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else []
    done = {(r["model"], r["init"], r["protocol"], r["dataset"]) for r in runs}

    def record(model: str, init: str, protocol: str, dataset: str, command: list[str], run_dir: Path) -> None:
        if (model, init, protocol, dataset) in done:
            return
        try:
            stage = run_stage(f"{protocol} {model} {init} {dataset}", command, log_path=run_dir / "stage.log",
                              quiet=True)
        except StageError as exc:
            print(f"results: {exc}", file=sys.stderr)
            runs.append({"model": model, "init": init, "protocol": protocol, "dataset": dataset,
                         "error": str(exc)})
        else:
            runs.append({"model": model, "init": init, "protocol": protocol, "dataset": dataset,
                         "seconds": round(stage.seconds, 1), "command": stage.command,
                         **_metrics(run_dir / "results.json")})
        runs_path.write_text(json.dumps(runs, indent=1))

    common_transfer = ["--input_size", str(args.input_size), "--in_chans", str(args.in_chans),
                       "--num_workers", str(args.num_workers)]
    for encoder in args.encoders:
        mae_name = f"mae_{encoder}"
        pre_dir = out / "pretrain" / encoder
        start = time.perf_counter()
        run_stage(f"pretrain {mae_name}", python_module_command(
            "pretrain.main", "--model", mae_name, "--data_path", args.pool, "--input_size", str(args.input_size),
            "--in_chans", str(args.in_chans), "--batch_size", str(args.batch_size), "--epochs",
            str(args.pretrain_epochs), "--warmup_epochs", str(max(1, args.pretrain_epochs // 20)), "--blr", "1.5e-4",
            "--norm_pix_loss", "--num_workers", str(args.num_workers), "--save_every", "100000",
            "--vis_every", "100000", "--output_dir", str(pre_dir)), log_path=pre_dir / "stage.log", quiet=True)
        pretrain_seconds = time.perf_counter() - start
        inits = {"mae": pre_dir / "encoder.safetensors",
                 "random": export_random_encoder(mae_name, args.input_size, args.in_chans, out / "random" / encoder)}
        for init, ckpt in inits.items():
            for npz in args.datasets:
                ds = Path(npz).stem
                lp_dir = out / "linprobe" / encoder / init / ds
                record(encoder, init, "linprobe", ds, python_module_command(
                    "linprobe.main", "--data_path", npz, "--nb_classes", "2", "--finetune", str(ckpt), "--fast",
                    "--global_pool", "--epochs", str(args.probe_epochs), "--output_dir", str(lp_dir),
                    *common_transfer), lp_dir)
                ft_dir = out / "finetune" / encoder / init / ds
                record(encoder, init, "finetune", ds, python_module_command(
                    "finetune.main", "--data_path", npz, "--nb_classes", "2", "--finetune", str(ckpt),
                    "--model", encoder, "--epochs", str(args.ft_epochs), "--warmup_epochs", "2", "--batch_size",
                    "128", "--blr", "5e-4", "--layer_decay", "0.65", "--output_dir", str(ft_dir),
                    *common_transfer), ft_dir)
        for r in runs:
            if r["model"] == encoder and r["init"] == "mae":
                r["pretrain_seconds"] = round(pretrain_seconds, 1)
        runs_path.write_text(json.dumps(runs, indent=1))
    for model in args.scratch_models:
        for npz in args.datasets:
            ds = Path(npz).stem
            ft_dir = out / "scratch" / model / ds
            record(model, "scratch", "finetune", ds, python_module_command(
                "finetune.main", "--data_path", npz, "--nb_classes", "2", "--model", model, "--epochs",
                str(args.ft_epochs), "--warmup_epochs", "2", "--batch_size", "128", "--blr", "5e-4",
                "--layer_decay", "1.0", "--output_dir", str(ft_dir), *common_transfer), ft_dir)
    print(f"results: {len(runs)} runs in {runs_path}")
    return 0


def baseline_rows(benchmarks: Path, dataset: str, input_size: int) -> list[tuple[str, float, float]]:
    """(method, ACC, AUC) rows: MedMNIST v2 ResNets and MedMNIST+ DINO ViT-B/16 linear probe at our size."""
    rows = []
    with open(benchmarks / "medmnist_v2_official_benchmark.csv") as fh:
        for r in csv.DictReader(fh):
            if r["dataset"] == DATASET_NAMES[dataset] and r["method"].startswith("ResNet"):
                rows.append((f"MedMNIST v2 {r['method']}", float(r["ACC"]), float(r["AUC"])))
    plus = benchmarks / f"medmnist_plus_doerrich2024_{dataset}.csv"
    if plus.exists():
        with open(plus) as fh:
            lines = [line for line in fh if not line.startswith("#")]
        for r in csv.DictReader(lines):
            if r["scheme"] == "linear-probing" and r["model"] == "DINO ViT-B/16":
                for size in (28, input_size):
                    acc, auc = r.get(f"ACC_{size}"), r.get(f"AUC_{size}")
                    if acc and auc:
                        rows.append((f"MedMNIST+ DINO ViT-B/16 linear probe ({size})",
                                     float(acc.split("±")[0]) / 100, float(auc.split("±")[0]) / 100))
    return list(dict.fromkeys(rows))


def table(args: argparse.Namespace) -> int:
    runs = json.loads((Path(args.out) / "runs.json").read_text())
    lines = []
    for ds in dict.fromkeys(r["dataset"] for r in runs):
        lines += [f"\n**{DATASET_NAMES.get(ds, ds)}** (test split; ours at {args.input_size} px, 95% bootstrap CI)\n",
                  "| model | init | protocol | ACC | AUC | time (s) |", "|---|---|---|---|---|---|"]
        for r in (r for r in runs if r["dataset"] == ds):
            if "error" in r:
                lines.append(f"| {r['model']} | {r['init']} | {r['protocol']} | failed | | |")
                continue
            ci = r.get("ci95", {})

            def cell(k: str, r: dict = r, ci: dict = ci) -> str:
                v = r.get(k)
                if v is None:
                    return "n/a"
                return f"{v:.3f} [{ci[k][0]:.3f}, {ci[k][1]:.3f}]" if k in ci else f"{v:.3f}"

            lines.append(f"| {r['model']} | {r['init']} | {r['protocol']} | {cell('acc')} | {cell('auc')} | "
                         f"{r.get('seconds', '')} |")
        if args.benchmarks and ds in DATASET_NAMES:
            for method, acc, auc in baseline_rows(Path(args.benchmarks), ds, args.input_size):
                lines.append(f"| {method} | published | | {acc:.3f} | {auc:.3f} | |")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.results", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="pretrain, probe and fine-tune (GPU)")
    r.add_argument("--pool", required=True, help="curated shard folder for MAE pretraining (train split)")
    r.add_argument("--datasets", nargs="+", required=True, help="labeled MedMNIST .npz files")
    r.add_argument("--out", required=True)
    r.add_argument("--encoders", nargs="*", default=["vit_small_patch16", "vim_small_patch16"])
    r.add_argument("--scratch_models", nargs="*", default=[])
    r.add_argument("--input_size", type=int, default=64)
    r.add_argument("--in_chans", type=int, default=1)
    r.add_argument("--batch_size", type=int, default=256)
    r.add_argument("--pretrain_epochs", type=int, default=40)
    r.add_argument("--probe_epochs", type=int, default=90)
    r.add_argument("--ft_epochs", type=int, default=20)
    r.add_argument("--num_workers", type=int, default=12)
    t = sub.add_parser("table", help="markdown table from OUT/runs.json")
    t.add_argument("out")
    t.add_argument("--benchmarks", default="", help="folder with the published benchmark CSVs")
    t.add_argument("--input_size", type=int, default=64)
    args = parser.parse_args(argv)
    return run(args) if args.command == "run" else table(args)


if __name__ == "__main__":
    sys.exit(main())
